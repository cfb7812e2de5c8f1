"""Serve wing: admission — a bounded number of generations in flight, each fed straight from the batch thread.

There is no worker thread between the engine and a request: a request's `LoopTokens` sink receives its
tokens from the engine's batch thread and wakes the request's event loop once per batch of tokens
ready together (one `call_soon_threadsafe`, however many tokens piled up while the loop was busy). The
loop side detokenizes and writes. Admission only counts: at most `max_queue` requests wait beyond the
engine's batch slots; more get 429. Closing cancels every admitted generation; their clients get 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

from llmpack.runtime.errors import BackendError, CapacityExceeded, LlmpackError
from llmpack.runtime.generate import FINISH_CANCELLED, FINISH_ERROR, TokenSink
from llmpack.runtime.request import GenerationRequest
from llmpack.runtime.sampling import TokenLogprobs
from llmpack.runtime.serve.metrics import Metrics


class ShuttingDown(LlmpackError):
    """The server stopped before this request could finish; another instance can serve it."""

    http_status = 503
    api_code = 3040


class LoopTokens(TokenSink):
    """One request's tokens, handed from the batch thread to the request's event loop.

    `put`/`end` (batch thread) append under a lock and schedule one wake-up of the loop unless one is
    already pending; `take` (the loop) returns everything that arrived since the last take.
    """

    def __init__(self, prompt_ids: Sequence[int], loop: asyncio.AbstractEventLoop, on_end,
                 on_started: Callable[[float], None] | None = None):
        super().__init__(prompt_ids)
        self._loop = loop
        self._on_end = on_end  # batch thread: admission's bookkeeping once the engine is done with it
        self._on_started = on_started  # batch thread: gets the seconds the sequence waited for a slot
        self._submitted = time.monotonic()
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprobs | None] = []  # beside _tokens, one each
        self.generated = 0  # counted on the batch thread, for the metrics when the sequence ends
        self._end: tuple[str, BaseException | None] | None = None
        self._wake_pending = False
        self._ready = asyncio.Event()

    def started(self) -> None:
        if self._on_started is not None:
            self._on_started(time.monotonic() - self._submitted)

    def put(self, token: int, logprobs: TokenLogprobs | None = None) -> None:
        self.generated += 1
        with self._lock:
            self._tokens.append(token)
            self._logprobs.append(logprobs)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            self._wake()

    def end(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            self._end = (reason, error)
            wake, self._wake_pending = not self._wake_pending, True
        self._on_end(self, reason)
        if wake:
            self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed (the server is gone): nobody reads this any more
            self.cancelled.set()

    async def take(self) -> tuple[list[int], list[TokenLogprobs | None], tuple[str, BaseException | None] | None]:
        """(tokens that arrived since the last take, their log probabilities when asked for, (finish reason,
        error) once the sequence ended)."""
        await self._ready.wait()
        with self._lock:
            # A wake-up is scheduled only when none is pending, and one is pending until here: so no
            # call_soon_threadsafe is in flight now, and clearing the event loses nothing.
            self._ready.clear()
            self._wake_pending = False
            tokens, self._tokens = self._tokens, []
            logprobs, self._logprobs = self._logprobs, []
            return tokens, logprobs, self._end


class Admission:
    """Admits at most max_queue waiting requests beyond the engine's batch slots; counts what runs.

    Every method but `close` runs on the event loop; the engine's batch thread reports each sequence's
    end through `_ended`, which only touches what the lock guards.
    """

    def __init__(self, engine, max_queue: int, metrics: Metrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._live: set[LoopTokens] = set()
        self._closed = False
        self.metrics.gauge("llmpack_queue_depth", "Requests waiting for a batch slot.",
                           lambda: engine.scheduler.queue_depth)
        self.metrics.gauge("llmpack_requests_in_flight", "Generation requests admitted and not finished "
                           "(waiting or running).", lambda: self.in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, request: GenerationRequest, prompt_ids: list[int]) -> LoopTokens:
        """Queue a request whose ids were computed when it was read; CapacityExceeded when full."""
        tokens = LoopTokens(prompt_ids, asyncio.get_running_loop(), self._ended, self.metrics.queued)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; send the request again to another instance")
            capacity = self.max_queue + self.engine.max_batch
            if len(self._live) >= capacity:
                raise CapacityExceeded(
                    f"the server is at capacity ({len(self._live)} requests running or queued, the queue holds "
                    f"{self.max_queue}); retry after the time in Retry-After"
                )
            self._live.add(tokens)
        try:
            self.engine.submit(tokens, request.max_tokens, request.sampling)
        except BaseException:
            with self._lock:
                self._live.discard(tokens)
            raise
        return tokens

    def _ended(self, tokens: LoopTokens, reason: str) -> None:
        """The batch thread is done with a sequence, whether or not its client still reads it."""
        outcome = {FINISH_CANCELLED: "cancelled", FINISH_ERROR: "failed"}.get(reason, "finished")
        self.metrics.generation_done(outcome, len(tokens.prompt_ids), tokens.generated)
        with self._lock:
            self._live.discard(tokens)
            self._lock.notify_all()

    def close(self, timeout: float) -> None:
        """Refuse new requests, cancel every admitted one, and wait up to `timeout` for the engine to let go."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for tokens in live:
            tokens.cancel()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._live and time.monotonic() < deadline:
                self._lock.wait(max(0.0, deadline - time.monotonic()))


def client_error(error: BaseException) -> LlmpackError:
    """What the request reports for a failed sequence (the batch scheduler logged the traceback)."""
    if isinstance(error, LlmpackError):
        return error.with_traceback(None)
    return BackendError("the generation failed inside the engine; the server log has the details")
