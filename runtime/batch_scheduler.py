"""Engine core: continuous batching — one decode step serves every active sequence.

A single thread owns the backend. Each iteration it admits waiting sequences into free slots (first
come, first served), runs ONE prefill chunk of the oldest sequence still reading its prompt (so a
long prompt never stalls everyone's decoding for its whole length), then ONE batched decode step
for all sequences that have a token to feed. While others are decoding, the chunk is sized by
`PrefillPacer` to cost about one decode step, so a joining prompt at most doubles their gap.
Finished or cancelled sequences leave at once and their slot (and its KV memory) is reused by the
next in line. With a prefix cache, an admitted sequence starts from a copy of the cache of a kept
sequence its prompt begins like, and a sequence is kept once its prompt is read and when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from llmpack.runtime.backends.interface import Backend, kv_copies_of, mixed_steps_of, speculation_of
from llmpack.runtime.errors import BackendError, LlmpackError
from llmpack.runtime.generate import FINISH_CANCELLED, FINISH_ERROR, SequenceState, TokenSink
from llmpack.runtime.manifest import DEFAULT_PREFILL_CHUNK
from llmpack.runtime.prefix_cache import PrefixCache
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.speculation import AcceptancePrior, CheckCosts

log = logging.getLogger("llmpack.runtime")

MIN_BUSY_CHUNK = 16  # below this the fixed cost of a pass over the weights dominates a chunk
MIN_MIXED_CHUNK = 4  # within a decode step a chunk pays no pass of its own: small ones cost little
MIN_TOKEN_SECONDS = 1e-4  # a floor for a mixed step's per-token estimate, which timing noise can drive to 0
# Within a mixed step the chunk may add this share of a decode step: the others' gap grows by at most
# half while a prompt joins (in-process, bench-110m, 8 streams: a share of 1 gave +5 % tokens/s over
# separate steps but a p99 gap 1.3x worse; the weights are read once either way, so small chunks are cheap).
MIXED_STEP_SHARE = 0.5


class PrefillPacer:
    """How many prompt tokens one iteration may prefill.

    With nobody decoding, a prompt goes in chunks of `chunk` tokens: the fastest first token. While
    others decode, a separate chunk should cost about one decode step of the running batch, so their
    inter-token gap at most doubles while a prompt joins. The cost per prompt token is a running
    average of time / tokens; since a chunk also pays a fixed pass over the weights, sizing by it
    converges (a fixed point) on the chunk whose time equals the decode step. bench/step_costs.py on
    bench-110m fused fp32 (2 cores): prefill ~25 ms + 1.2 ms/token, batch-8 decode step 36-43 ms.
    `mixed`: chunks ride inside the decode step (Backend.decode_and_prefill); the cost per token is
    then what a token adds to a decode step of the same batch, and a chunk may add MIXED_STEP_SHARE
    of that step. Decode costs are kept per batch size: a wave of joins grows the batch step by step.
    """

    SMOOTHING = 0.3

    def __init__(self, chunk: int, floor: int | None = None, mixed: bool = False):
        self.chunk, self.mixed = chunk, mixed
        self.floor = min(floor or (MIN_MIXED_CHUNK if mixed else MIN_BUSY_CHUNK), chunk)
        self.decode_seconds: dict[int, float] = {}  # by the number of rows decoding
        self.seconds_per_token: float | None = None

    def decode_cost(self, rows: int) -> float | None:
        """The step time of `rows` decoding: measured, else that of the nearest batch measured."""
        if not self.decode_seconds:
            return None
        return self.decode_seconds[min(self.decode_seconds, key=lambda known: (abs(known - rows), known))]

    def budget(self, decoding: int) -> int:
        """Tokens to prefill this iteration while `decoding` sequences decode (0: none)."""
        if not decoding:
            return self.chunk
        step = self.decode_cost(decoding)
        if step is None or self.seconds_per_token is None:  # not measured yet: a cautious chunk
            return min(self.chunk, MIN_BUSY_CHUNK)
        target = step * (MIXED_STEP_SHARE if self.mixed else 1.0)
        return max(self.floor, min(self.chunk, int(target / self.seconds_per_token)))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if not self.mixed:  # mixed: a separate prefill's fixed weight pass says nothing of a mixed chunk
            self.seconds_per_token = self._smooth(self.seconds_per_token, seconds / tokens)

    def observe_mixed(self, rows: int, tokens: int, seconds: float) -> None:
        """A chunk read within a decode step costs only its own compute: what the step took beyond a
        decode step of the same batch (the weights are read once for both)."""
        if rows not in self.decode_seconds:
            return
        extra = max(seconds - self.decode_seconds[rows], MIN_TOKEN_SECONDS * tokens)
        self.seconds_per_token = self._smooth(self.seconds_per_token, extra / tokens)

    def observe_decode(self, rows: int, seconds: float) -> None:
        self.decode_seconds[rows] = self._smooth(self.decode_seconds.get(rows), seconds)

    def _smooth(self, average: float | None, value: float) -> float:
        return smoothed(average, value, self.SMOOTHING)


def smoothed(average: float | None, value: float, smoothing: float = PrefillPacer.SMOOTHING) -> float:
    """A running average of step times: the first value, then each new one pulls it by `smoothing`."""
    return value if average is None else average + smoothing * (value - average)


class BatchScheduler:
    def __init__(self, backend: Backend, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache: PrefixCache | None = None, context_limit: int | None = None, max_proposed: int = 0):
        self.backend = backend
        # A sequence's prompt + answer never pass this (the backend's capacity, or less when asked)
        self.context_limit = min(context_limit or backend.context_length, backend.context_length)
        self.mixed = mixed_steps_of(backend)
        self.mixing = self.mixed is not None
        # Only a backend that can copy a slot's cache in and out takes part.
        self.copies = kv_copies_of(backend)
        self.prefix_cache = prefix_cache if self.copies is not None else None
        self.pacer = PrefillPacer(prefill_chunk, mixed=self.mixing)
        # Speculative decoding (prompt lookup), at batch 1, up to max_proposed tokens a step (0: off): a wider step
        # pays only while it is memory-bound
        self.max_proposed = max_proposed
        self.acceptance = AcceptancePrior()  # where each new sequence's acceptance estimate starts
        self.speculation = speculation_of(backend) if max_proposed > 0 else None
        if max_proposed > 0 and self.speculation is None:
            # info, not a warning: ngram is the default, and the device backends cannot check yet (docs/speculation.md)
            log.info("speculation off: the %s backend (or this artifact's graph, built before num_logits) cannot "
                     "check several tokens in one step; a CPU backend on a rebuilt artifact can", backend.name)
        self.proposed = self.accepted = 0  # speculated tokens checked and kept, since the start (metrics)
        self.check_costs = CheckCosts()  # a check of k tokens against a batch-1 decode step, whole steps
        self._waiting: deque[SequenceState] = deque()
        self._active: list[SequenceState] = []
        self._free_slots = list(range(backend.max_batch))
        self._cond = threading.Condition()
        self._stopping = False
        self.halted: str | None = None  # set when the loop stopped on an internal error: why, for /ready and submit
        self._thread: threading.Thread | None = None
        self.on_step: Callable[[int], None] | None = None  # an observer of each step's decoded rows (metrics)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, sink: TokenSink, max_tokens: int, sampling: SamplingParams, stop_ids: Sequence[int]) -> None:
        """Queue the sequence of `sink.prompt_ids`; its tokens go to `sink` from the batch thread."""
        state = SequenceState(sink, max_tokens, sampling, stop_ids, self.backend.vocab_size, self.context_limit)
        if self.speculation is not None:
            state.speculate(self.max_proposed, self.acceptance.rate)
        sink.on_cancel = self._wake
        with self._cond:
            if self._stopping:
                raise BackendError(self.halted or "the engine is shutting down; retry on another instance")
            self._waiting.append(state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmpack-batch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; sequences still waiting or running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for state in [*self._waiting, *self._active]:
            state.finish(FINISH_CANCELLED)

    def _wake(self) -> None:
        """A sequence was cancelled: a waiting one leaves the queue at the next iteration, not when a slot frees."""
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                self._drop_cancelled_waiting()
                self._admit()
            try:
                self._release_finished()
                self._step()
                self._release_finished()
            except Exception as exc:  # noqa: BLE001 - a bug outside the backend calls must end requests, not hang them
                self._halt(exc)
                return

    def _halt(self, exc: Exception) -> None:
        """The loop itself failed (the backend's own failures end only their sequences, in _step): every request
        ends with an error now, new ones are refused, and /ready turns false so an orchestrator restarts us."""
        with self._cond:
            self._stopping = True
            self.halted = "the engine stopped after an internal error; restart the server (its log has the details)"
            states = [*self._waiting, *self._active]
            self._waiting.clear()
        self._fail(states, BackendError(self.halted))
        log.error("the batch loop stopped: %s", exc, exc_info=exc)

    def _drop_cancelled_waiting(self) -> None:
        if any(state.sink.cancelled.is_set() for state in self._waiting):
            for state in [s for s in self._waiting if s.sink.cancelled.is_set()]:
                self._waiting.remove(state)
                state.finish(FINISH_CANCELLED)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            state = self._waiting.popleft()
            if state.sink.cancelled.is_set():
                state.finish(FINISH_CANCELLED)
                continue
            state.slot = self._free_slots.pop(0)
            self._active.append(state)
            state.sink.started()
            self._reuse_prefix(state)

    def _release_finished(self) -> None:
        for state in list(self._active):
            if state.sink.cancelled.is_set():
                state.finish(FINISH_CANCELLED)
            if state.done:
                if state.finish_reason != FINISH_ERROR:  # the prompt and the answer, for the next turn of a chat
                    self._keep(state, self.backend.cached_tokens(state.slot))
                self._active.remove(state)  # after the copy: `active` reaching 0 means the cache is settled
                self.backend.reset(state.slot)
                self._free_slots.append(state.slot)
                self._free_slots.sort()

    def _step(self) -> None:
        """One prefill chunk (the oldest prompt still being read) and one decode step for every sequence
        with a token to feed: in one pass over the weights when the backend can mix them."""
        reading = next((s for s in self._active if not s.done and s.prefilled < len(s.prompt_ids)), None)
        ready = [s for s in self._active if not s.done and s.pending is not None]
        if reading is not None and ready and self.mixing:
            return self._mixed_step(reading, ready)
        if reading is not None:
            self._prefill_step(reading, decoding=len(ready))
        ready = [s for s in self._active if not s.done and s.pending is not None]  # + a prompt just read
        if ready:
            self._decode_step(ready)

    def _next_chunk(self, state: SequenceState, decoding: int) -> list[int]:
        return state.prompt_ids[state.prefilled : state.prefilled + self.pacer.budget(decoding)]

    def _prefill_step(self, state: SequenceState, decoding: int) -> None:
        chunk = self._next_chunk(state, decoding)
        started = time.perf_counter()
        try:
            logits = self.backend.prefill(state.slot, chunk)
        except Exception as exc:  # noqa: BLE001 - any backend failure ends only this sequence
            return self._fail([state], exc)
        self.pacer.observe_prefill(len(chunk), time.perf_counter() - started)
        self._read(state, len(chunk), logits)

    def _decode_step(self, ready: list[SequenceState]) -> None:
        step_started = time.perf_counter()  # a batch-1 step in speculation's cost model: the lookup included
        if self.speculation is not None and len(ready) == 1 and self._speculated_step(ready[0]):
            return
        started = time.perf_counter()
        try:
            logits = self.backend.decode([s.slot for s in ready], [s.pending for s in ready])
        except Exception as exc:  # noqa: BLE001 - any backend failure ends the sequences of this step
            return self._fail(ready, exc)
        seconds = time.perf_counter() - started
        self.pacer.observe_decode(len(ready), seconds)
        self._observe(len(ready))
        for row, state in enumerate(ready):
            state.advance(logits[row])
        if len(ready) == 1 and self.speculation is not None:  # what a speculated check is weighed against
            self.check_costs.observe_plain(seconds, time.perf_counter() - step_started)

    def _speculated_step(self, state: SequenceState) -> bool:
        """Check the sequence's proposal in one step (the pending token + k proposed, every position's
        logits), keep what is accepted and drop the rest from the cache; False: no proposal, decode."""
        step_started = time.perf_counter()
        if not self.check_costs.plain_measured:
            return False  # a plain step first: what a check costs is judged against it
        proposal = state.proposal(self._relative_check_cost)
        if not proposal:
            return False
        cached = self.backend.cached_tokens(state.slot)
        emitted = state.generated
        try:
            rows = self.speculation.score(state.slot, [state.pending, *proposal])
            accepted = state.advance_speculated(rows, proposal)
            self.speculation.truncate(state.slot, cached + 1 + accepted)
        except Exception as exc:  # noqa: BLE001 - any backend failure ends only this sequence
            self._fail([state], exc)
            return True
        self._observe(1)
        # The whole step, host work included, with the tokens it emitted: CheckCosts charges the check its own
        # work (pass, lookup, truncate) and each token what handing it out costs after a plain step too.
        self.check_costs.observe_check(len(proposal), time.perf_counter() - step_started, state.generated - emitted)
        state.proposal_length.update(len(proposal), accepted)
        self.acceptance.update(len(proposal), accepted)
        self.proposed, self.accepted = self.proposed + len(proposal), self.accepted + accepted
        return True

    def _relative_check_cost(self, k: int, tokens: float) -> float | None:
        """A check of k speculated tokens yielding `tokens` over one batch-1 decode step (None: not measured)."""
        return self.check_costs.relative(k, tokens)

    def _mixed_step(self, reading: SequenceState, ready: list[SequenceState]) -> None:
        chunk = self._next_chunk(reading, decoding=len(ready))
        started = time.perf_counter()
        try:
            logits, chunk_logits = self.mixed.decode_and_prefill(
                [s.slot for s in ready], [s.pending for s in ready], reading.slot, chunk)
        except Exception as exc:  # noqa: BLE001 - any backend failure ends the sequences of this step
            return self._fail([*ready, reading], exc)
        self.pacer.observe_mixed(len(ready), len(chunk), time.perf_counter() - started)
        self._observe(len(ready))
        self._read(reading, len(chunk), chunk_logits)
        for row, state in enumerate(ready):
            state.advance(logits[row])

    def _observe(self, rows: int) -> None:
        if self.on_step is not None:
            self.on_step(rows)

    def _read(self, state: SequenceState, tokens: int, logits) -> None:
        state.prefilled += tokens
        if state.prefilled == len(state.prompt_ids):
            state.advance(logits)  # the first token goes out before the copy is made
            self._keep(state, state.prefilled)

    def _reuse_prefix(self, state: SequenceState) -> None:
        """Start a newly admitted sequence from the cache of the kept sequence its prompt begins like."""
        found = self.prefix_cache.lookup(state.prompt_ids) if self.prefix_cache is not None else None
        if found is None:
            return
        kept, length = found
        try:
            self.copies.import_kv(state.slot, kept.kv, length)
        except Exception as exc:  # noqa: BLE001 - a failed copy only means reading the prompt in full
            log.warning("prefix cache: reusing %d tokens failed (%s); reading the prompt in full", length, exc)
            self.backend.reset(state.slot)
            return
        state.prefilled = length

    def _keep(self, state: SequenceState, length: int) -> None:
        """Copy the first `length` cached positions of the sequence into the prefix cache, when worth it."""
        if self.prefix_cache is None or length == 0:
            return
        ids = [*state.prompt_ids, *state.output_ids][:length]
        nbytes = self.copies.kv_bytes(length)
        if not self.prefix_cache.worth_keeping(ids, nbytes):
            return
        try:
            kv = self.copies.export_kv(state.slot, length)
        except Exception as exc:  # noqa: BLE001 - not keeping a copy never changes an answer
            log.warning("prefix cache: copying %d tokens failed (%s)", length, exc)
            return
        self.prefix_cache.keep(ids, kv, nbytes)

    def _fail(self, states: list[SequenceState], exc: Exception) -> None:
        log.error("generation failed for %d sequence(s): %s", len(states), exc, exc_info=exc)
        # The exception's own words stay in the log: they may name internals a client should not see.
        error = exc if isinstance(exc, LlmpackError) else BackendError(
            "the generation failed inside the engine; the server log has the details")
        for state in states:
            state.finish(FINISH_ERROR, error)
