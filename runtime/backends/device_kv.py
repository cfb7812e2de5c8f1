"""Generation stage 2 (GPU): the device-resident KV cache shared by the TensorRT and ONNX Runtime CUDA backends.

The graph's `present` is Concat(past, new), a new tensor one step longer than `past`, so a step can
not write its cache in place. Each layer's K and V therefore live in three device buffers: two work
buffers that alternate as past and present (a step reads one and writes the other: swapping them is
the whole hand-over, no copy), and a home buffer where a slot's cache waits while it is not in the
batch. A batch is the listed slots stacked left-padded in one work buffer; it is repacked (device to
device copies, never through the host) only when the set of slots changes. Everything that decides
what goes where is pure and tested on the CPU with a fake device; only cuda_device.py touches CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.backends.cuda_device import ALIGN
from llmpack.runtime.errors import ArtifactError, BackendError
from llmpack.runtime.manifest import BuildManifest

WORK = ("work0", "work1")  # the two buffers that alternate as past and present


# --- sizes ----------------------------------------------------------------------------------------


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class KvGeometry:
    """Sizes of the device KV cache for `slots` sequences of up to `context` tokens."""

    layers: int
    kv_heads: int
    head_dim: int
    itemsize: int
    slots: int
    context: int

    @classmethod
    def of(cls, manifest: BuildManifest, slots: int) -> KvGeometry:
        c = manifest.config
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, np.dtype(manifest.kv_dtype).itemsize, slots,
                   manifest.max_context)

    @property
    def tensors(self) -> int:  # a K and a V per layer
        return 2 * self.layers

    @property
    def token_bytes(self) -> int:  # one token of one head of one tensor
        return self.head_dim * self.itemsize

    @property
    def home_row_bytes(self) -> int:  # one slot of one tensor at full context
        return self.kv_heads * self.context * self.token_bytes

    @property
    def tensor_stride(self) -> int:  # one tensor for every slot, aligned
        return _aligned(self.slots * self.home_row_bytes)

    @property
    def buffer_bytes(self) -> int:  # one of home, work0, work1: every tensor of every layer
        return self.tensors * self.tensor_stride

    @property
    def total_bytes(self) -> int:
        return 3 * self.buffer_bytes


def slots_that_fit(free_bytes: int, per_slot_bytes: int, wanted: int, reserve_bytes: int) -> int:
    """How many sequences' caches fit in free device memory, keeping `reserve_bytes` for activations."""
    return max(0, min(wanted, (free_bytes - reserve_bytes) // per_slot_bytes))


# --- the plan of one step (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """A device-to-device 2D copy, applied to every K/V tensor: `height` rows (heads) of `width` bytes."""

    src: str
    src_offset: int
    src_pitch: int
    dst: str
    dst_offset: int
    dst_pitch: int
    width: int
    height: int


@dataclass(frozen=True)
class Batch:
    """Slots stacked in one work buffer, row i = slots[i], each right-aligned in `width` columns."""

    slots: tuple[int, ...]
    width: int
    buffer: int  # which work buffer holds it


@dataclass(frozen=True)
class Step:
    copies: tuple[Copy, ...]
    batch: Batch  # what the engine reads as past, once the copies are done
    input_ids: np.ndarray  # [n, seq]
    attention_mask: np.ndarray  # [n, width + seq]; 0 over each row's left padding
    position_ids: np.ndarray  # [n, seq]

    @property
    def seq(self) -> int:
        return self.input_ids.shape[1]

    @property
    def after(self) -> Batch:  # the present the engine writes becomes the next past
        return Batch(self.batch.slots, self.batch.width + self.seq, 1 - self.batch.buffer)


def _work_place(g: KvGeometry, row: int, width: int, length: int) -> tuple[int, int]:
    """(offset, pitch) of a slot's `length` tokens right-aligned in row `row` of a [n, kv, width, d] batch."""
    pitch = width * g.token_bytes
    return row * g.kv_heads * pitch + (width - length) * g.token_bytes, pitch


def _home_place(g: KvGeometry, slot: int) -> tuple[int, int]:
    return slot * g.home_row_bytes, g.context * g.token_bytes


def repack(g: KvGeometry, current: Batch | None, lengths: Sequence[int],
           slots: tuple[int, ...]) -> tuple[Batch, tuple[Copy, ...]]:
    """The batch for `slots` and the copies that build it; nothing to copy when the slots did not change."""
    width = max(lengths[s] for s in slots)
    if current is not None and current.slots == slots and current.width == width:
        return current, ()
    old = current or Batch((), 0, 1)
    target, copies = 1 - old.buffer, []
    src_buffer = WORK[old.buffer]
    for row, slot in enumerate(old.slots):  # slots leaving the batch go home
        if slot not in slots and lengths[slot] > 0:
            offset, pitch = _work_place(g, row, old.width, lengths[slot])
            copies.append(Copy(src_buffer, offset, pitch, "home", *_home_place(g, slot),
                               lengths[slot] * g.token_bytes, g.kv_heads))
    for row, slot in enumerate(slots):
        if lengths[slot] == 0:
            continue
        if slot in old.slots:
            src = (src_buffer, *_work_place(g, old.slots.index(slot), old.width, lengths[slot]))
        else:
            src = ("home", *_home_place(g, slot))
        copies.append(Copy(*src, WORK[target], *_work_place(g, row, width, lengths[slot]),
                           lengths[slot] * g.token_bytes, g.kv_heads))
    return Batch(slots, width, target), tuple(copies)


def plan_step(g: KvGeometry, current: Batch | None, lengths: Sequence[int], slots: Sequence[int],
              token_rows: Sequence[Sequence[int]]) -> Step:
    """Everything one engine call needs: the repack, and the ids, mask and positions of each row."""
    slots = tuple(slots)
    batch, copies = repack(g, current, lengths, slots)
    seq = len(token_rows[0])
    mask = np.ones((len(slots), batch.width + seq), dtype=np.int64)
    positions = np.empty((len(slots), seq), dtype=np.int64)
    for row, slot in enumerate(slots):
        mask[row, : batch.width - lengths[slot]] = 0
        positions[row] = np.arange(lengths[slot], lengths[slot] + seq)
    return Step(copies, batch, np.asarray(token_rows, dtype=np.int64), mask, positions)


@dataclass(frozen=True)
class Binding:
    """One engine input or output for this step: where it is and its shape."""

    name: str
    is_input: bool
    address: int
    shape: tuple[int, ...]
    dtype: str


def step_bindings(manifest: BuildManifest, g: KvGeometry, step: Step, io: dict[str, int],
                  work: Sequence[int]) -> list[Binding]:
    """Every tensor of the graph bound for `step`: io holds the id/mask/position/logits buffers."""
    n, width = len(step.batch.slots), step.batch.width
    past, present = work[step.batch.buffer], work[1 - step.batch.buffer]
    kv = manifest.kv_dtype
    bindings = [
        Binding(names.INPUT_IDS, True, io[names.INPUT_IDS], step.input_ids.shape, "int64"),
        Binding(names.ATTENTION_MASK, True, io[names.ATTENTION_MASK], step.attention_mask.shape, "int64"),
        Binding(names.POSITION_IDS, True, io[names.POSITION_IDS], step.position_ids.shape, "int64"),
        Binding(names.LOGITS, False, io[names.LOGITS], (n, manifest.config.vocab_size), "float32"),
    ]
    for layer in range(g.layers):
        pairs = ((names.past_key_name(layer), names.present_key_name(layer)),
                 (names.past_value_name(layer), names.present_value_name(layer)))
        for index, (past_name, present_name) in enumerate(pairs):
            offset = (2 * layer + index) * g.tensor_stride
            bindings.append(Binding(past_name, True, past + offset, (n, g.kv_heads, width, g.head_dim), kv))
            bindings.append(Binding(present_name, False, present + offset,
                                    (n, g.kv_heads, width + step.seq, g.head_dim), kv))
    return bindings


# --- the backend both GPU routes share ---------------------------------------------------------


def fit_slots(manifest: BuildManifest, free_bytes: int, wanted: int, reserve_bytes: int) -> int:
    """Slots to allocate: `wanted`, fewer when the device cannot hold them, an error when not even one."""
    per_slot = KvGeometry.of(manifest, 1).total_bytes
    slots = slots_that_fit(free_bytes, per_slot, wanted, reserve_bytes)
    if slots == 0:
        raise ArtifactError(
            f"the GPU has {free_bytes / 2**30:.1f} GiB free after loading {manifest.name}; one sequence's KV cache "
            f"at context {manifest.max_context} needs {per_slot / 2**30:.2f} GiB (+{reserve_bytes / 2**30:.1f} GiB "
            "reserve); use a GPU with more memory or an artifact with a smaller --max-context"
        )
    return slots


class DeviceKvBackend:
    """The Backend protocol over a device KV cache; subclasses only run the engine (`_execute`)."""

    name = "device"
    max_step_tokens: int | None = None  # longest prefill chunk one engine call takes

    def __init__(self, manifest: BuildManifest, device, max_batch: int):
        self.manifest, self.device, self.max_batch = manifest, device, max_batch
        self.context_length = manifest.max_context
        self.vocab_size = manifest.config.vocab_size
        self.geometry = g = KvGeometry.of(manifest, max_batch)
        self._home = device.alloc(g.buffer_bytes)
        self._work = (device.alloc(g.buffer_bytes), device.alloc(g.buffer_bytes))
        id_bytes = max_batch * self.context_length * 8
        inputs = (names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS)
        self._io = {name: device.alloc(id_bytes) for name in inputs}
        self._io[names.LOGITS] = device.alloc(max_batch * self.vocab_size * 4)
        self._ones = device.alloc(id_bytes)  # an all-ones mask: unpadded steps upload no mask at all
        device.upload(self._ones, np.ones(max_batch * self.context_length, dtype=np.int64))
        self._logits = np.empty((max_batch, self.vocab_size), dtype=np.float32)
        self._lengths = [0] * max_batch
        self._batch: Batch | None = None

    def cached_tokens(self, slot: int) -> int:
        return self._lengths[slot]

    def reset(self, slot: int) -> None:
        self._lengths[slot] = 0  # its rows in a batch become padding; the next repack drops them

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        ids = list(token_ids)
        if not ids:
            raise BackendError("prefill needs at least one token")
        self._check_room([slot], len(ids))
        chunk = self.max_step_tokens or len(ids)
        for start in range(0, len(ids), chunk):
            logits = self._step((slot,), [ids[start : start + chunk]])
        return logits[0]

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        if len(slots) != len(token_ids) or len(set(slots)) != len(slots):
            raise BackendError("decode needs one token for each of distinct slots")
        if any(self._lengths[s] == 0 for s in slots):
            raise BackendError("decode called on a slot that was not prefilled")
        self._check_room(slots, 1)
        return self._step(tuple(slots), [[int(t)] for t in token_ids])

    def _check_room(self, slots: Sequence[int], count: int) -> None:
        for slot in slots:
            if not 0 <= slot < self.max_batch:
                raise BackendError(f"slot {slot} is out of range 0…{self.max_batch - 1}")
            if self._lengths[slot] + count > self.context_length:
                raise BackendError(f"sequence of {self._lengths[slot] + count} tokens exceeds the artifact's "
                                   f"context of {self.context_length}")

    def _step(self, slots: tuple[int, ...], token_rows: list[list[int]]) -> np.ndarray:
        step = plan_step(self.geometry, self._batch, self._lengths, slots, token_rows)
        self._apply(step.copies)
        self._batch = step.batch  # the cache is in the new batch now, even if the engine fails below
        io = dict(self._io)
        for name, array in ((names.INPUT_IDS, step.input_ids), (names.POSITION_IDS, step.position_ids)):
            self.device.upload(io[name], array)
        if step.attention_mask.all():
            io[names.ATTENTION_MASK] = self._ones
        else:
            self.device.upload(io[names.ATTENTION_MASK], step.attention_mask)
        self._execute(step, step_bindings(self.manifest, self.geometry, step, io, self._work))
        logits = self._logits[: len(slots)]
        self.device.download(logits, self._io[names.LOGITS])
        self._batch = step.after
        for slot in slots:
            self._lengths[slot] += step.seq
        return logits.copy()

    def _apply(self, copies: Sequence[Copy]) -> None:
        bases = {"home": self._home, WORK[0]: self._work[0], WORK[1]: self._work[1]}
        for copy in copies:
            for tensor in range(self.geometry.tensors):
                offset = tensor * self.geometry.tensor_stride
                self.device.copy_2d(bases[copy.dst] + offset + copy.dst_offset, copy.dst_pitch,
                                    bases[copy.src] + offset + copy.src_offset, copy.src_pitch,
                                    copy.width, copy.height)

    def _execute(self, step: Step, bindings: list[Binding]) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop what runs the engine (TensorRT contexts, an ONNX Runtime session); subclasses override."""

    def close(self) -> None:
        # The engine's consumers still point at our buffers and stream: wait for its work, release them, and only
        # then free the memory and destroy the stream (the reverse tears them down under a live context).
        self.device.synchronize()
        self._release()
        self.device.close()
