"""Generation stage 3 driver: continuous batching — one decode step serves every active sequence.

A single thread owns the backend. Each iteration it admits waiting sequences into free slots (first
come, first served), runs ONE prefill chunk of the oldest sequence still reading its prompt (so a
long prompt never stalls everyone's decoding for its whole length), then ONE batched decode step
for all sequences that have a token to feed. While others are decoding, the chunk is sized by
`PrefillPacer` to cost about one decode step, so a joining prompt at most doubles their gap.
Finished or cancelled sequences leave at once and their slot (and its KV memory) is reused by the
next in line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from llmpack.runtime.backend import Backend
from llmpack.runtime.errors import BackendError, LlmpackError
from llmpack.runtime.generate import FINISH_CANCELLED, SequenceState, TokenStream
from llmpack.runtime.sampling import SamplingParams

log = logging.getLogger("llmpack.runtime")

DEFAULT_PREFILL_CHUNK = 128
MIN_BUSY_CHUNK = 16  # below this the fixed cost of a pass over the weights dominates a chunk


class PrefillPacer:
    """How many prompt tokens one iteration may prefill.

    With nobody decoding, a prompt goes in chunks of `chunk` tokens: the fastest first token. While
    others decode, each chunk should cost about one decode step of the running batch, so their
    inter-token gap at most doubles while a prompt joins. The cost per prompt token is a running
    average of time / tokens; since a chunk also pays a fixed pass over the weights, sizing by it
    converges (a fixed point) on the chunk whose time equals the decode step. bench/step_costs.py on
    bench-110m fused fp32 (2 cores): prefill ~25 ms + 1.2 ms/token, batch-8 decode step 36-43 ms.
    """

    SMOOTHING = 0.3

    def __init__(self, chunk: int, floor: int = MIN_BUSY_CHUNK):
        self.chunk = chunk
        self.floor = min(floor, chunk)
        self.decode_seconds: float | None = None
        self.seconds_per_token: float | None = None

    def budget(self, others_decoding: bool) -> int:
        if not others_decoding or self.decode_seconds is None or self.seconds_per_token is None:
            return self.chunk
        fitted = int(self.decode_seconds / self.seconds_per_token)
        return max(self.floor, min(self.chunk, fitted))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.seconds_per_token = self._smooth(self.seconds_per_token, seconds / tokens)

    def observe_decode(self, seconds: float) -> None:
        self.decode_seconds = self._smooth(self.decode_seconds, seconds)

    def _smooth(self, average: float | None, value: float) -> float:
        return value if average is None else average + self.SMOOTHING * (value - average)


class BatchScheduler:
    def __init__(self, backend: Backend, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.backend = backend
        self.pacer = PrefillPacer(prefill_chunk)
        self._waiting: deque[SequenceState] = deque()
        self._active: list[SequenceState] = []
        self._free_slots = list(range(backend.max_batch))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams,
               stop_ids: Sequence[int]) -> TokenStream:
        stream = TokenStream(prompt_ids)
        state = SequenceState(stream, max_tokens, sampling, stop_ids, self.backend.vocab_size,
                              self.backend.context_length)
        with self._cond:
            if self._stopping:
                raise BackendError("the engine is shutting down; retry on another instance")
            self._waiting.append(state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmpack-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return stream

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; sequences still waiting or running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for state in [*self._waiting, *self._active]:
            state.finish(FINISH_CANCELLED)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
            self._release_finished()
            self._prefill_step()
            self._decode_step()
            self._release_finished()

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            state = self._waiting.popleft()
            if state.stream.cancelled.is_set():
                state.finish(FINISH_CANCELLED)
                continue
            state.slot = self._free_slots.pop(0)
            self._active.append(state)

    def _release_finished(self) -> None:
        for state in list(self._active):
            if state.stream.cancelled.is_set():
                state.finish(FINISH_CANCELLED)
            if state.done:
                self._active.remove(state)
                self.backend.reset(state.slot)
                self._free_slots.append(state.slot)
                self._free_slots.sort()

    def _prefill_step(self) -> None:
        state = next((s for s in self._active if not s.done and s.prefilled < len(s.prompt_ids)), None)
        if state is None:
            return
        decoding = any(s.pending is not None for s in self._active)
        chunk = state.prompt_ids[state.prefilled : state.prefilled + self.pacer.budget(decoding)]
        started = time.perf_counter()
        try:
            logits = self.backend.prefill(state.slot, chunk)
        except Exception as exc:  # noqa: BLE001 - any backend failure ends only this sequence
            return self._fail([state], exc)
        self.pacer.observe_prefill(len(chunk), time.perf_counter() - started)
        state.prefilled += len(chunk)
        if state.prefilled == len(state.prompt_ids):
            state.advance(logits)

    def _decode_step(self) -> None:
        ready = [s for s in self._active if not s.done and s.pending is not None]
        if not ready:
            return
        started = time.perf_counter()
        try:
            logits = self.backend.decode([s.slot for s in ready], [s.pending for s in ready])
        except Exception as exc:  # noqa: BLE001 - any backend failure ends the sequences of this step
            return self._fail(ready, exc)
        self.pacer.observe_decode(time.perf_counter() - started)
        for row, state in enumerate(ready):
            state.advance(logits[row])

    def _fail(self, states: list[SequenceState], exc: Exception) -> None:
        log.error("generation failed for %d sequence(s): %s", len(states), exc, exc_info=exc)
        error = exc if isinstance(exc, LlmpackError) else BackendError(f"the inference backend failed: {exc}")
        for state in states:
            state.finish("error", error)
