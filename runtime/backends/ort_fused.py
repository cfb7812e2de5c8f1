"""Generation stage 2 (CPU, `ort-fused` artifacts): ONNX Runtime over the fused graph, KV cache in place.

Each layer's K and V cache is ONE preallocated numpy buffer [rows, kv_heads, capacity, head_dim],
bound as both GroupQueryAttention's past and its present: a step writes its new token straight into
the buffer, nothing is concatenated or copied. Slot i is row i. A batched decode runs rows
0..max(slots) in one step, each row with its own seqlens_k, so rows of different lengths share a step
with no repacking; a row not in the step gets a dummy token written one past its end, which is
harmless (its next real token overwrites it) — one spare position of capacity keeps even a full
row's dummy inside the buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.backends import fused_interface as fused
from llmpack.runtime.backends.interface import check_score, check_truncate
from llmpack.runtime.backends.ort_cpu import CpuSessionBackend, load_session
from llmpack.runtime.errors import ArtifactError, BackendError
from llmpack.runtime.manifest import BuildManifest

log = logging.getLogger("llmpack.runtime")

MIN_CAPACITY = 128  # positions allocated up front; grown (one copy each time) as sequences grow
# Not more, and grown by a quarter rather than doubled: GroupQueryAttention's CPU cost grows with the
# capacity, not just the length (bench/step_costs.py on bench-110m, batch 8, 100 tokens: 3.9 ms per step
# at capacity 128, ~9 ms at 256-512, 12 ms at 1024, 27 ms at 2048); doubling left up to 2x the longest
# row. More growths, more copies: amortized, a few times the cache's final size in all.
CAPACITY_GROWTH = 1.25
CAPACITY_ALIGN = 64  # positions
MIXED_BINDINGS_KEPT = 16  # mixed-step bindings cached (each holds (rows + 1) x vocab logits)


class SharedCache:
    """Per layer K and V buffers [rows, kv_heads, capacity, head_dim], each row one slot's cache."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, limit: int, max_rows: int):
        self.count, self.kv_heads, self.head_dim = 2 * layers, kv_heads, head_dim
        self.limit = limit  # capacity never needs to exceed the context + the spare position
        # Every row is allocated at once: growing row by row copied the whole cache each time a
        # request joined (measured: 16-token prefills of joiners took 100-150 ms instead of 44).
        # np.zeros maps zero pages lazily, so rows never used cost address space, not memory.
        self.max_rows = max_rows
        self.used_rows = 0  # rows ever written: the only ones a growth copies
        self.buffers: list[np.ndarray] = []
        self._views: dict[tuple[int, int], list] = {}

    @property
    def rows(self) -> int:
        return self.buffers[0].shape[0] if self.buffers else 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2] if self.buffers else 0

    def ensure(self, rows: int, length: int) -> bool:
        """Make room for `rows` rows of `length` positions: True when it grew (one copy, amortized)."""
        if rows > self.max_rows:
            raise BackendError(f"row {rows - 1} is past the cache's {self.max_rows} rows (max batch)")
        self.used_rows = max(self.used_rows, rows)
        if length <= self.capacity:
            return False
        capacity = self.capacity or MIN_CAPACITY
        while capacity < length:
            capacity = -(-int(capacity * CAPACITY_GROWTH) // CAPACITY_ALIGN) * CAPACITY_ALIGN
        capacity = min(capacity, self.limit)
        grown = []
        for old in self.buffers or [None] * self.count:
            new = np.zeros((self.max_rows, self.kv_heads, capacity, self.head_dim), np.float32)
            if old is not None:
                new[: self.used_rows, :, : old.shape[2]] = old[: self.used_rows]
            grown.append(new)
        self.buffers, self._views = grown, {}
        log.debug("KV cache grown to %d positions", capacity)
        return True

    def views(self, start: int, count: int) -> list:
        """OrtValues over rows start..start+count of every buffer (contiguous: no copy), cached."""
        key = (start, count)
        if key not in self._views:
            from onnxruntime import OrtValue

            self._views[key] = [OrtValue.ortvalue_from_numpy(b[start : start + count]) for b in self.buffers]
        return self._views[key]


class StepBinding:
    """One IO binding for a fixed (rows, seq) shape, reused step after step.

    The token ids, sequence lengths and logits live in numpy arrays that the bound OrtValues share,
    so a decode step writes a few numbers and runs: no binding calls, no per-step allocation
    (measured: the per-call binding cost 0.63 ms of an 8 ms int4 step on bench-110m).
    """

    def __init__(self, session, rows: int, seq: int, vocab: int, logit_rows: int | None = None,
                 num_logits: int | None = 1):
        self.session = session
        self.ids = np.zeros((rows, seq), np.int64)
        self.seqlens = np.zeros(rows, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((logit_rows or rows * (num_logits or 1), vocab), np.float32)
        self.binding = session.io_binding()
        self._bind_inputs(((names.INPUT_IDS, self.ids), (fused.SEQLENS_K, self.seqlens),
                           (fused.TOTAL_SEQUENCE_LENGTH, self.total)))
        if num_logits is not None:  # graphs built before num_logits give the last position only
            self.num_logits = np.array([num_logits], np.int64)
            self._bind_inputs(((fused.NUM_LOGITS, self.num_logits),))
        self.binding.bind_ortvalue_output(names.LOGITS, _ortvalue(self.logits))

    def _bind_inputs(self, arrays) -> None:
        for name, array in arrays:
            self.binding.bind_ortvalue_input(name, _ortvalue(array))

    def bind_cache(self, past: list[str], present: list[str], views: list) -> None:
        for past_name, present_name, value in zip(past, present, views):
            self.binding.bind_ortvalue_input(past_name, value)
            self.binding.bind_ortvalue_output(present_name, value)  # the same buffer: GQA appends in place

    def run(self) -> np.ndarray:
        self.total[...] = self.seqlens.max() + 1
        self.session.run_with_iobinding(self.binding)
        return self.logits


class MixedStepBinding(StepBinding):
    """The mixed graph's binding: decode rows 0..rows-1 plus one prompt chunk of `chunk` tokens, whose
    row's cache the backend binds as a one-row view of the same buffers."""

    def __init__(self, session, rows: int, chunk: int, vocab: int):
        super().__init__(session, rows, 1, vocab, logit_rows=rows + 1, num_logits=None)
        self.chunk_ids = np.zeros((1, chunk), np.int64)
        self.chunk_seqlens = np.zeros(1, np.int32)
        self.chunk_total = np.zeros((), np.int32)
        self._bind_inputs(((fused.CHUNK_IDS, self.chunk_ids), (fused.CHUNK_SEQLENS_K, self.chunk_seqlens),
                           (fused.CHUNK_TOTAL_SEQUENCE_LENGTH, self.chunk_total)))

    def run(self) -> np.ndarray:
        self.chunk_total[...] = self.chunk_seqlens[0] + 1
        return super().run()


def _ortvalue(array: np.ndarray):
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(array)


class OrtFusedBackend(CpuSessionBackend):
    """Slots of sequences on ONNX Runtime's CPU provider over an `ort-fused` artifact."""

    name = "onnxruntime-cpu-fused"

    def __init__(self, artifact: Path, manifest: BuildManifest, threads: int | None = None, max_batch: int = 1,
                 mixed_steps: bool = True):
        if manifest.graph_flavour != fused.FLAVOUR:
            raise ArtifactError(f"{manifest.name} is a {manifest.graph_flavour!r} artifact, not {fused.FLAVOUR!r}")
        mixing = mixed_steps and max_batch > 1 and fused.has_mixed_graph(manifest)
        super().__init__(artifact, manifest, threads, max_batch, spinning=not mixing)
        c = manifest.config
        self.cache = SharedCache(c.num_layers, c.num_kv_heads, fused.kv_head_dim(c),
                                 manifest.max_context + 1, max_batch)
        self._bindings: dict[tuple[int, int, int], StepBinding] = {}
        self._mixed_bindings: dict[tuple[int, int, int], MixedStepBinding] = {}
        # Speculation: a step that returns every fed position's logits (Backend's Speculation capability)
        self.can_score = fused.NUM_LOGITS in {i.name for i in self.session.get_inputs()}
        self.mixed_session = self._open_mixed_session(artifact, threads) if mixing else None

    def _open_mixed_session(self, artifact: Path, threads: int | None):
        """The mixed-step graph as a second session: the weights are held (prepacked) twice, so a
        machine without room for that serves without mixing rather than not at all."""
        try:
            session = load_session(artifact, self.manifest, threads, fused.MIXED_MODEL_FILE, spinning=False)
        except ArtifactError as exc:
            log.warning("serving without mixed steps (%s); --no-mixed-steps skips this attempt", exc)
            return None
        log.info("mixed steps on: a joining prompt's chunks share the decode step's pass over the weights")
        return session

    @property
    def can_mix(self) -> bool:
        """Whether decode_and_prefill runs as one pass (else the scheduler calls decode and prefill)."""
        return self.mixed_session is not None

    def _step(self, first_row: int, rows: int, seq: int, length: int, all_logits: bool = False) -> StepBinding:
        """The binding for rows first_row..first_row+rows fed `seq` tokens, with cache room for `length`;
        `all_logits`: logits for every fed position, not just the last."""
        self._ensure(first_row + rows, length)
        key = (first_row, rows, -seq if all_logits else seq)
        step = self._bindings.get(key)
        if step is None:
            step = StepBinding(self.session, rows, seq, self.vocab_size,
                               num_logits=(seq if all_logits else 1) if self.can_score else None)
            step.bind_cache(self._past_names, self._present_names, self.cache.views(first_row, rows))
            if seq == 1 or all_logits:  # decode shapes repeat every step, speculated ones often; chunks rarely
                self._bindings[key] = step
        return step

    def _ensure(self, rows: int, length: int) -> None:
        """Cache room for `rows` rows of `length` positions; a growth makes every binding stale."""
        if self.cache.ensure(rows, length):
            self._bindings.clear()
            self._mixed_bindings.clear()

    def _mixed_step(self, rows: int, chunk_slot: int, chunk: int, length: int) -> MixedStepBinding:
        """The mixed graph's binding for decode rows 0..rows-1 + `chunk` tokens at chunk_slot, cached
        like the decode ones (a few recent shapes: chunk sizes vary, and each holds its logits)."""
        self._ensure(max(rows, chunk_slot + 1), length)
        key = (rows, chunk_slot, chunk)
        step = self._mixed_bindings.get(key)
        if step is None:
            step = MixedStepBinding(self.mixed_session, rows, chunk, self.vocab_size)
            step.bind_cache(self._past_names, self._present_names, self.cache.views(0, rows))
            step.bind_cache([fused.chunk_name(n) for n in self._past_names],
                            [fused.chunk_name(n) for n in self._present_names], self.cache.views(chunk_slot, 1))
            if len(self._mixed_bindings) >= MIXED_BINDINGS_KEPT:
                del self._mixed_bindings[next(iter(self._mixed_bindings))]  # the oldest: dicts keep order
            self._mixed_bindings[key] = step
        return step

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("prefill needs at least one token")
        total = self._check_room(slot, len(token_ids))
        step = self._step(slot, 1, len(token_ids), total + 1)
        step.ids[0] = token_ids
        step.seqlens[0] = total - 1
        logits = step.run()
        self._lengths[slot] = total
        return logits[0].copy()

    def _check_decodable(self, slots: Sequence[int]) -> None:
        if any(self._lengths[s] == 0 for s in slots):
            raise BackendError("decode called on a slot that was not prefilled")
        for slot in slots:
            self._check_room(slot, 1)

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        self._check_decodable(slots)
        rows = max(slots) + 1
        # Every row appends at its own end; rows outside `slots` append a dummy that is never counted.
        step = self._step(0, rows, 1, max(self._lengths[:rows]) + 1)
        step.ids[:, 0] = 0
        step.ids[list(slots), 0] = token_ids
        step.seqlens[:] = self._lengths[:rows]
        logits = step.run()
        for slot in slots:
            self._lengths[slot] += 1
        return logits[list(slots)]  # a copy: the binding's array is overwritten by the next step

    def decode_and_prefill(self, slots: Sequence[int], token_ids: Sequence[int], chunk_slot: int,
                           chunk_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """decode(slots, token_ids) and prefill(chunk_slot, chunk_ids) in one pass over the weights:
        (logits [len(slots), vocab], the chunk's last logits [vocab])."""
        if self.mixed_session is None:
            raise BackendError("this artifact has no mixed-step graph (mixed.onnx); call decode and prefill")
        if not chunk_ids or chunk_slot in slots:
            raise BackendError("a mixed step needs a non-empty chunk for a slot that is not decoding")
        self._check_decodable(slots)
        total, rows = self._check_room(chunk_slot, len(chunk_ids)), max(slots) + 1
        # The chunk's row may lie among the decode rows: the decode side's dummy token for it goes one
        # past the chunk (overwritten by its next token), never on a position the chunk writes.
        step = self._mixed_step(rows, chunk_slot, len(chunk_ids), max(max(self._lengths[:rows]), total) + 1)
        step.ids[:, 0] = 0
        step.ids[list(slots), 0] = token_ids
        step.seqlens[:] = self._lengths[:rows]
        if chunk_slot < rows:
            step.seqlens[chunk_slot] = total
        step.chunk_ids[0] = chunk_ids
        step.chunk_seqlens[0] = total - 1
        logits = step.run()
        for slot in slots:
            self._lengths[slot] += 1
        self._lengths[chunk_slot] = total
        return logits[list(slots)], logits[rows].copy()

    def score(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot and return the logits after each of them, [len(token_ids), vocab]:
        one pass over the weights checks a speculated continuation (Speculation capability)."""
        check_score(self.can_score, self._lengths[slot], token_ids)
        total = self._check_room(slot, len(token_ids))
        step = self._step(slot, 1, len(token_ids), total + 1, all_logits=True)
        step.ids[0] = token_ids
        step.seqlens[0] = total - 1
        logits = step.run()
        self._lengths[slot] = total
        return logits.copy()

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions: the in-place cache's later ones are overwritten by the
        next tokens written there, so only the length goes back."""
        check_truncate(slot, self._lengths[slot], length)
        self._lengths[slot] = length

    def reset(self, slot: int) -> None:
        self._lengths[slot] = 0

    def kv_bytes(self, tokens: int) -> int:
        """What a copy of `tokens` positions of one slot's cache takes (Backend.export_kv)."""
        c = self.manifest.config
        return self.cache.count * c.num_kv_heads * fused.kv_head_dim(c) * tokens * 4

    def export_kv(self, slot: int, length: int) -> np.ndarray:
        """A copy of the slot's first `length` positions, [buffers, kv_heads, length, head_dim].

        One allocation, not one per buffer: kept copies come and go all day, and copies of a few MB
        each raise glibc's mmap threshold, after which they are carved from the heap instead of
        being mapped and handed back whole."""
        if length > self._lengths[slot]:
            raise BackendError(f"slot {slot} holds {self._lengths[slot]} tokens, not {length}")
        return np.stack([buffer[slot, :, :length] for buffer in self.cache.buffers])

    def import_kv(self, slot: int, kv: np.ndarray, length: int) -> None:
        """Start the (reset) slot from the first `length` positions of an exported copy."""
        self._check_room(slot, length)
        self._ensure(slot + 1, length + 1)
        for buffer, part in zip(self.cache.buffers, kv):
            buffer[slot, :, :length] = part[:, :length]
        self._lengths[slot] = length
