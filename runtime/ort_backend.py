"""Generation stage 2 (CPU): the ONNX Runtime backend over an artifact's decoder graph.

The KV cache stays inside ONNX Runtime as OrtValues: each step binds the previous step's `present`
outputs as the next `past` inputs through IO binding, so the cache never round-trips through numpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.errors import ArtifactError, BackendError
from llmpack.runtime.manifest import BuildManifest

log = logging.getLogger("llmpack.runtime")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(manifest: BuildManifest, weights_bytes: int) -> None:
    """Refuse up front what would be OOM-killed: ORT's CPU provider upcasts fp16 weights to fp32."""
    needed = weights_bytes * (2 if manifest.dtype == "fp16" else 1) * 1.1
    free = available_memory()
    if free is not None and needed > free:
        hint = " (ONNX Runtime's CPU provider upcasts fp16 weights to fp32; fp16 artifacts are meant for GPUs)" \
            if manifest.dtype == "fp16" else ""
        raise ArtifactError(
            f"loading {manifest.name} on the CPU needs about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are available{hint}; use a machine with more memory or a smaller artifact"
        )
    if manifest.dtype == "fp16":
        log.warning("fp16 artifact on the CPU backend: ONNX Runtime upcasts its weights to fp32 (twice the memory)")


def create_session(model_path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Shapes change every step (past grows by one); ORT's memory-pattern planner then keeps a plan
    # per shape and RSS climbs with every token. Measured on the demo model over 3000 tokens:
    # +25 MiB with it, +7 MiB (and flat on every later generation) without it, at equal speed.
    options.enable_mem_pattern = False
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped failures for bad models
        raise ArtifactError(f"ONNX Runtime cannot load {model_path} ({exc}); rebuild the artifact") from exc


def _as_array(value) -> np.ndarray:
    """A numpy view of an OrtValue (no copy) or the array itself."""
    return value if isinstance(value, np.ndarray) else value.numpy()


@dataclass
class _Batch:
    """The KV caches of several slots stacked into one left-padded batch, kept across steps."""

    slots: tuple[int, ...]
    past: list  # per layer k/v: OrtValue [batch, kv_heads, width, head_dim]
    width: int  # padded past length shared by every row

    def pad(self, length: int) -> int:
        return self.width - length


class OrtBackend:
    """Slots of sequences on ONNX Runtime's CPU provider; batched decode over left-padded caches.

    Each slot keeps its own cache (OrtValues, never copied between steps). A batched decode stacks
    the listed slots into one left-padded batch once, then keeps feeding the batch's `present`
    back as `past`; the batch is unpacked only when the set of slots changes.
    """

    name = "onnxruntime-cpu"

    def __init__(self, artifact: Path, manifest: BuildManifest, threads: int | None = None, max_batch: int = 1):
        self.manifest = manifest
        self.context_length = manifest.max_context
        self.vocab_size = manifest.config.vocab_size
        self.max_batch = max_batch
        check_memory(manifest, sum(f.size for f in manifest.files if f.path == names.WEIGHTS_FILE))
        self.session = create_session(Path(artifact) / names.MODEL_FILE, threads)
        c = manifest.config
        self._past_names = [n for i in range(c.num_layers) for n in (names.past_key_name(i), names.past_value_name(i))]
        self._output_names = [names.LOGITS] + [
            n for i in range(c.num_layers) for n in (names.present_key_name(i), names.present_value_name(i))
        ]
        self._empty_past = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=manifest.kv_dtype)
        self._pasts: list[list | None] = [None] * max_batch
        self._lengths = [0] * max_batch
        self._batch: _Batch | None = None

    def cached_tokens(self, slot: int) -> int:
        return self._lengths[slot]

    def _run(self, token_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence) -> list:
        binding = self.session.io_binding()
        binding.bind_cpu_input(names.INPUT_IDS, token_ids)
        binding.bind_cpu_input(names.ATTENTION_MASK, mask)
        binding.bind_cpu_input(names.POSITION_IDS, positions)
        for name, value in zip(self._past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))  # unpacked rows are views
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _check_room(self, slot: int, count: int) -> int:
        total = self._lengths[slot] + count
        if total > self.context_length:
            raise BackendError(f"sequence of {total} tokens exceeds the artifact's context of {self.context_length}")
        return total

    def _run_slot(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """One slot alone: its own cache, no padding."""
        start, total = self._lengths[slot], self._check_room(slot, len(token_ids))
        past = self._pasts[slot] or [self._empty_past] * len(self._past_names)
        outputs = self._run(
            np.asarray([token_ids], dtype=np.int64),
            np.ones((1, total), dtype=np.int64),
            np.arange(start, total, dtype=np.int64)[None, :],
            past,
        )
        self._pasts[slot], self._lengths[slot] = outputs[1:], total
        return outputs[0].numpy()

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("prefill needs at least one token")
        self._unpack()
        return self._run_slot(slot, list(token_ids))[0]

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        if any(self._pasts[s] is None and (self._batch is None or s not in self._batch.slots) for s in slots):
            raise BackendError("decode called on a slot that was not prefilled")
        for slot in slots:
            self._check_room(slot, 1)
        if len(slots) == 1:
            self._unpack()
            return self._run_slot(slots[0], [token_ids[0]])
        if self._batch is None or self._batch.slots != tuple(slots):
            self._pack(tuple(slots))
        batch = self._batch
        width = batch.width + 1
        mask = np.ones((len(slots), width), dtype=np.int64)
        for row, slot in enumerate(slots):
            mask[row, : batch.pad(self._lengths[slot])] = 0
        positions = np.array([[self._lengths[s]] for s in slots], dtype=np.int64)
        outputs = self._run(np.asarray(token_ids, dtype=np.int64)[:, None], mask, positions, batch.past)
        batch.past, batch.width = outputs[1:], width
        for slot in slots:
            self._lengths[slot] += 1
        return outputs[0].numpy()

    def _pack(self, slots: tuple[int, ...]) -> None:
        """Stack the slots' caches into one left-padded batch: one copy of each cache, no more."""
        self._unpack()
        width = max(self._lengths[s] for s in slots)
        sources = [[_as_array(v) for v in self._pasts[s]] for s in slots]
        past = []
        for index in range(len(self._past_names)):
            first = sources[0][index]
            stacked = np.zeros((len(slots), first.shape[1], width, first.shape[3]), dtype=first.dtype)
            for row, cache in enumerate(sources):
                stacked[row, :, width - cache[index].shape[2] :, :] = cache[index][0]
            past.append(stacked)
        for slot in slots:
            self._pasts[slot] = None  # the batch holds them now: never two copies of a cache
        self._batch = _Batch(slots, past, width)

    def _unpack(self) -> None:
        """Give each batched slot its own cache back: views of its row without the left padding."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        arrays = [_as_array(value) for value in batch.past]
        for row, slot in enumerate(batch.slots):
            pad = batch.pad(self._lengths[slot])
            self._pasts[slot] = [a[row : row + 1, :, pad:, :] for a in arrays]

    def reset(self, slot: int) -> None:
        if self._batch is not None and slot in self._batch.slots:
            self._unpack()
        self._pasts[slot], self._lengths[slot] = None, 0
