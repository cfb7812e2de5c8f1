"""Serve wing: one admitted generation seen from its HTTP request — text pieces, cancellation, SSE.

The request waits for its sequence's first text before answering, so a failure before any text (a
bad prompt, a backend error at prefill) still gets a real status code instead of a 200 with a
broken stream. From then on the client's disconnect cancels the sequence between tokens. Tokens are
detokenized here, on the event loop, as they arrive from the batch thread (admission.LoopTokens):
one piece per token that completes text, exactly the pieces `llm-serve infer` prints, handed on in
batches of those that arrived together so a stream writes them to the socket at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmpack.runtime.errors import LlmpackError
from llmpack.runtime.generate import FINISH_CANCELLED
from llmpack.runtime.request import GenerationRequest, Usage
from llmpack.runtime.sampling import TokenLogprobs
from llmpack.runtime.serve.access import request_id_of
from llmpack.runtime.serve.admission import Admission, LoopTokens, ShuttingDown, client_error
from llmpack.runtime.serve.http_edge import error_payload
from llmpack.runtime.serve.metrics import Metrics
from llmpack.runtime.serve.protocol import sse_event


@dataclass(frozen=True)
class Finished:
    usage: Usage
    finish_reason: str  # "stop", "length", or "cancelled"


class Generation:
    """An admitted sequence: iterate `pieces()`, then `finished` holds the usage and why it ended."""

    def __init__(self, tokens: LoopTokens, admission: Admission, tokenizer, watcher: asyncio.Task | None = None,
                 with_logprobs: bool = False):
        self.tokens = tokens
        self._admission = admission
        self._detokenizer = tokenizer.stream_decoder()
        self._watcher = watcher
        self._timer = _TokenTimer(admission.metrics)
        self._generated = 0
        self._held: list[str] = []  # pieces read by first_text() and not yet given out
        self.finished: Finished | None = None
        self.first_text_at: float | None = None  # time.monotonic() when the first text reached the loop
        # With log probabilities asked for: those of the tokens behind each piece, in the order pieces go out
        # (piece_logprobs() hands them over), and those of tokens whose text is not a piece yet.
        self.with_logprobs = with_logprobs
        # A failure that came in the same hand-off as text: raised at the next read, after that text is out.
        self._failure: LlmpackError | None = None
        self._piece_logprobs: deque[list[TokenLogprobs]] = deque()
        self._loose: list[TokenLogprobs] = []

    async def first_text(self) -> None:
        """Wait for the first text or the end; raises the client-facing error of a failed sequence."""
        while not self._held and self.finished is None:
            self._held = await self._next()
        if self._held:
            self.first_text_at = time.monotonic()

    async def _next(self) -> list[str]:
        """The pieces of the tokens that arrived together: one per token that completes text (a token that
        ends inside a UTF-8 character gives none), as TextStream gives them to the CLI."""
        if self._failure is not None:
            raise self._failure
        tokens, logprobs, end = await self.tokens.take()
        if tokens:
            self._generated += len(tokens)
            self._timer.arrived(len(tokens))
        pieces = []
        for token, token_logprobs in zip(tokens, logprobs):
            piece = self._detokenizer.add(token)
            if self.with_logprobs and token_logprobs is not None:
                self._loose.append(token_logprobs)
            if piece:
                pieces.append(self._given_out(piece))
        if end is not None:
            reason, error = end
            failure = client_error(error) if error is not None else None
            if failure is None and reason == FINISH_CANCELLED and self._admission.closed:
                failure = ShuttingDown("the server shut down before the request finished; send it again")
            if failure is not None:
                if pieces:  # the loop took the tokens and the failure together: the text goes out first
                    self._failure = failure
                    return pieces
                raise failure
            tail = self._detokenizer.flush()
            if tail or self._loose:  # tokens that never made text still report their log probabilities
                pieces.append(self._given_out(tail))
            self.finished = Finished(Usage(len(self.tokens.prompt_ids), self._generated), reason)
        return pieces

    def _given_out(self, piece: str) -> str:
        if self.with_logprobs:
            self._piece_logprobs.append(self._loose)
            self._loose = []
        return piece

    def piece_logprobs(self) -> list[TokenLogprobs]:
        """The log probabilities of the tokens behind the next piece read from pieces() / batches()."""
        return self._piece_logprobs.popleft() if self._piece_logprobs else []

    async def batches(self) -> AsyncIterator[list[str]]:
        """The text pieces once, in batches of those that arrived together; raises the client-facing
        LlmpackError if the generation fails midway."""
        held, self._held = self._held, []
        if held:
            yield held
        while self.finished is None:
            pieces = await self._next()
            if pieces:
                yield pieces

    async def pieces(self) -> AsyncIterator[str]:
        async for batch in self.batches():
            for piece in batch:
                yield piece

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def stop(self) -> None:
        """The caller needs no more text (a stop string matched); pieces() still ends with `finished`."""
        self.tokens.cancel()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def close(self) -> None:
        self.stop_watching()
        self.tokens.cancel()  # a no-op once the sequence has ended


async def admit(admission: Admission, request: Request, parsed: GenerationRequest, prompt_ids: list[int],
                tokenizer) -> Generation:
    """Queue the request (429 when full) and wait for its first text while watching for a disconnect."""
    tokens = admission.submit(parsed, prompt_ids)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, tokens))
    generation = Generation(tokens, admission, tokenizer, watcher, parsed.sampling.top_logprobs is not None)
    try:
        await generation.first_text()
    except BaseException:
        generation.close()
        raise
    return generation


async def _cancel_on_disconnect(request: Request, tokens: LoopTokens) -> None:
    # The body has been read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    tokens.cancel()


class _TokenTimer:
    """Feeds TTFT and inter-token latency from the moments tokens reach the request's event loop."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.last = time.monotonic()
        self.first = True

    def arrived(self, tokens: int) -> None:
        now = time.monotonic()
        if self.first:  # tokens that came with the first one arrived with no gap of their own
            self.metrics.first_token(now - self.last)
            self.first, self.last, tokens = False, now, tokens - 1
        if tokens > 0:
            self.metrics.next_tokens(now - self.last, tokens)
        self.last = now


class EventStreamResponse(StreamingResponse):
    """text/event-stream over a Generation; however the response ends, its job is cancelled."""

    media_type = "text/event-stream"

    def __init__(self, generation: Generation, body: AsyncIterator[bytes]):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's own disconnect listener takes over from here; two readers of one receive race.
        self.generation.stop_watching()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def error_event(scope: Scope, error: LlmpackError) -> bytes:
    """The last event of a stream that failed after it started: the route's error shape, no [DONE]."""
    return sse_event(error_payload(scope["path"], error.http_status, error.api_code, error.message,
                                   request_id=request_id_of(scope)))


class StopFilter:
    """Cuts streamed text at the first stop string, holding back text that may be a stop's start."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now."""
        if self.stopped:
            return ""
        self.pending += piece
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((self._overlap(stop) for stop in self.stops), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        """What was held back when the text ended without a stop string."""
        out, self.pending = self.pending, ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest end of `pending` that is a proper beginning of `stop`."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0
