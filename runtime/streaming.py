"""Serving stage 3: one admitted generation seen from its HTTP request — text pieces, cancellation, SSE.

The request waits for its job's first event before answering, so a failure before any text (a full
queue, a bad prompt, a backend error at prefill) still gets a real status code instead of a 200 with
a broken stream. From then on the client's disconnect cancels the job between tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmpack.runtime.errors import LlmpackError
from llmpack.runtime.http_edge import error_payload
from llmpack.runtime.protocol import GenerationRequest, sse_event
from llmpack.runtime.scheduler import Failed, Finished, Job, Piece, Scheduler


class Generation:
    """An admitted job: iterate `pieces()`, then `finished` holds the usage and why it ended."""

    def __init__(self, job: Job, first: Piece | Finished, watcher: asyncio.Task):
        self.job = job
        self._first: Piece | Finished | None = first
        self._watcher = watcher
        self.finished: Finished | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """The text, once; raises the client-facing LlmpackError if the generation fails midway."""
        first, self._first = self._first, None
        if isinstance(first, Finished):  # cancelled while it waited, or nothing generated
            self.finished = first
            return
        if first is not None:
            yield first.text
        async for event in self.job.events():
            if isinstance(event, Piece):
                yield event.text
            elif isinstance(event, Failed):
                raise event.error
            else:
                self.finished = event

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def stop(self) -> None:
        """The caller needs no more text (a stop string matched); pieces() still ends with `finished`."""
        self.job.cancel()

    def stop_watching(self) -> None:
        self._watcher.cancel()

    def close(self) -> None:
        self._watcher.cancel()
        self.job.cancel()  # a no-op once the job is done


async def admit(scheduler: Scheduler, request: Request, generation_request: GenerationRequest) -> Generation:
    """Queue the request (429 when full) and wait for its first event while watching for a disconnect."""
    job = scheduler.submit(generation_request)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
    try:
        first = await job.next_event()
    except BaseException:
        watcher.cancel()
        job.cancel()
        raise
    if isinstance(first, Failed):
        watcher.cancel()
        raise first.error
    return Generation(job, first, watcher)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # The body has been read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


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


def error_event(path: str, error: LlmpackError) -> bytes:
    """The last event of a stream that failed after it started: the route's error shape, no [DONE]."""
    return sse_event(error_payload(path, error.http_status, error.api_code, error.message))


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
