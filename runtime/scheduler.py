"""Serving stage 2: the admission queue — bounded, in front of the worker threads that drive the engine.

The HTTP layer submits a validated GenerationRequest and reads the job's events (text pieces, then
one Finished or Failed) on its own event loop; each worker thread drives one engine stream at a
time, between whose tokens cancellation is checked. How many sequences the engine runs together is
the engine's business; this queue only bounds how many requests wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmpack.runtime.errors import BackendError, CapacityExceeded, LlmpackError
from llmpack.runtime.metrics import Metrics
from llmpack.runtime.protocol import GenerationRequest, Usage

log = logging.getLogger("llmpack.server")

FINISH_CANCELLED = "cancelled"
WAITING, RUNNING, DONE = "waiting", "running", "done"


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    usage: Usage
    finish_reason: str  # "stop", "length", or FINISH_CANCELLED


@dataclass(frozen=True)
class Failed:
    error: LlmpackError  # what the client may see; the traceback went to the log


Event = Piece | Finished | Failed


class ShuttingDown(LlmpackError):
    """The server stopped before this request could finish; another instance can serve it."""

    http_status = 503
    api_code = 3040


class Job:
    """One request's generation: the worker thread emits events, the request's coroutine reads them."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[Job], None]):
        self.request = request
        self.submitted_at = time.monotonic()
        self.state = WAITING
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop at the next token boundary; a job still waiting gives its place back at once."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    async def next_event(self) -> Event:
        return await self._events.get()

    async def events(self) -> AsyncIterator[Event]:
        """The remaining events, the terminal Finished or Failed included."""
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Piece):
                return

    def emit(self, event: Event) -> None:
        """Hand an event to the request's loop; safe from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            # The loop is closed (the server is gone): nobody reads this job any more.
            self._cancelled.set()


class Scheduler:
    """Admits at most max_queue waiting jobs beyond the running ones; runs them in worker threads.

    `concurrency` is how many sequences the engine runs at once (its batch slots): each worker
    thread follows one request while the engine's batch scheduler decodes them all together.
    """

    def __init__(self, engine, max_queue: int, metrics: Metrics | None = None, concurrency: int = 1):
        self.engine = engine
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"llmpack-engine-{n}", daemon=True)
                         for n in range(concurrency)]
        self.metrics.gauge("llmpack_queue_depth", "Requests waiting for the engine.", lambda: self.queue_depth)
        self.metrics.gauge("llmpack_requests_in_flight", "Generation requests admitted and not finished "
                           "(waiting or running).", lambda: self.in_flight)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request from the event loop; raise CapacityExceeded when the queue is full."""
        job = Job(request, asyncio.get_running_loop(), self._cancel)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down; send the request again to another instance")
            if self.in_flight >= self.max_queue + self.concurrency:
                raise CapacityExceeded(
                    f"the server is at capacity ({self.in_flight} requests running or queued, the queue holds "
                    f"{self.max_queue}); retry after the time in Retry-After"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def close(self, timeout: float) -> None:
        """Refuse new jobs, cancel every admitted one, and wait up to `timeout` for the worker."""
        with self._cond:
            self._closed = True
            jobs = [*self._waiting, *self._running]
            self._cond.notify_all()
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job.state != WAITING:
                return  # running: the worker sees the flag between tokens
            self._waiting.remove(job)
            job.state = DONE
        job.emit(self._cancelled_event(Usage(0, 0)))
        self.metrics.generation_done(FINISH_CANCELLED, 0, 0)

    def _cancelled_event(self, usage: Usage) -> Event:
        # Cancelled by its client (who is gone), or by close(): then a client may still be waiting for it.
        if self._closed:
            return Failed(ShuttingDown("the server shut down before the request finished; send it again"))
        return Finished(usage, FINISH_CANCELLED)

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            job.state = RUNNING
            self._running.add(job)
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                event = self._generate(job)
                outcome, usage = (FINISH_CANCELLED if job.cancelled else "finished"), event.usage
                if event.finish_reason == FINISH_CANCELLED:
                    event = self._cancelled_event(usage)
            except Exception as exc:  # noqa: BLE001 - one failed generation fails only its own request
                event, outcome, usage = Failed(_client_error(exc)), "failed", Usage(0, 0)
            with self._cond:
                self._running.discard(job)
                job.state = DONE
            self.metrics.generation_done(outcome, usage.prompt_tokens, usage.completion_tokens)
            job.emit(event)

    def _generate(self, job: Job) -> Finished:
        stream = self.engine.stream(job.request)
        pieces = iter(stream)
        timer = _TokenTimer(self.metrics, job.submitted_at)
        try:
            for piece in pieces:
                timer.piece(stream.usage.completion_tokens)
                job.emit(Piece(piece))
                if job.cancelled:
                    break
        finally:
            # Closing the generator releases the engine lock and resets the KV cache now, not at GC.
            pieces.close()
        return Finished(stream.usage, stream.finish_reason or FINISH_CANCELLED)


def _client_error(exc: Exception) -> LlmpackError:
    """The error the request reports; keeping no traceback lets the failed stream's frames go now."""
    if isinstance(exc, LlmpackError):
        log.warning("generation failed: %s", exc.message)
        return exc.with_traceback(None)
    log.error("generation failed; that request gets a 500 and the server keeps serving", exc_info=exc)
    return BackendError("the generation failed inside the engine; the server log has the details")


class _TokenTimer:
    """Feeds TTFT and inter-token latency from the moments text pieces leave the engine."""

    def __init__(self, metrics: Metrics, started: float):
        self.metrics = metrics
        self.last = started
        self.tokens = 0

    def piece(self, tokens_so_far: int) -> None:
        now = time.monotonic()
        new = tokens_so_far - self.tokens
        if self.tokens == 0:
            self.metrics.first_token(now - self.last)
        elif new > 0:
            self.metrics.next_tokens(now - self.last, new)
        self.last, self.tokens = now, tokens_so_far
