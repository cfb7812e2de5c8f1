"""Generation stage 2 (CPU): the ONNX Runtime backend over an artifact's decoder graph.

The KV cache stays inside ONNX Runtime as OrtValues: each step binds the previous step's `present`
outputs as the next `past` inputs through IO binding, so the cache never round-trips through numpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.backends.interface import check_score, check_truncate
from llmpack.runtime.backends.kv_batch import KVBatch, as_array
from llmpack.runtime.backends.ort_install import import_onnxruntime
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


def create_session(model_path: Path, threads: int | None = None, profile_prefix: str | None = None,
                   spinning: bool = True):
    """The CPU session every backend (and bench/step_costs.py, with ORT's profiler on) runs.

    `spinning=False` for sessions that take turns in one process: each session has its own thread
    pool, whose threads spin after a run and then steal the cores from the other session's run
    (measured, bench-110m, 8 streams: decode steps p90 69 ms with spinning, 46 ms without).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Shapes change every step (past grows by one); ORT's memory-pattern planner then keeps a plan
    # per shape and RSS climbs with every token. Measured on the demo model over 3000 tokens:
    # +25 MiB with it, +7 MiB (and flat on every later generation) without it, at equal speed.
    options.enable_mem_pattern = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped failures for bad models
        raise ArtifactError(f"ONNX Runtime cannot load {model_path} ({exc}); rebuild the artifact") from exc


def load_session(artifact: Path, manifest: BuildManifest, threads: int | None, model_file: str = names.MODEL_FILE,
                 spinning: bool = True):
    """Refuse what cannot fit, then open one of the artifact's graphs: how every CPU backend starts."""
    check_memory(manifest, sum(f.size for f in manifest.files if f.path == names.WEIGHTS_FILE))
    return create_session(Path(artifact) / model_file, threads, spinning=spinning)


class CpuSessionBackend:
    """What every ONNX Runtime CPU backend starts with: the session, the limits, the names of the
    cache tensors in layer order (key, value per layer) and one cached length per slot."""

    def __init__(self, artifact: Path, manifest: BuildManifest, threads: int | None, max_batch: int,
                 spinning: bool = True):
        self.manifest = manifest
        self.context_length = manifest.max_context
        self.vocab_size = manifest.config.vocab_size
        self.max_batch = max_batch
        self.session = load_session(artifact, manifest, threads, spinning=spinning)
        layers = range(manifest.config.num_layers)
        self._past_names = [n for i in layers for n in (names.past_key_name(i), names.past_value_name(i))]
        self._present_names = [n for i in layers for n in (names.present_key_name(i), names.present_value_name(i))]
        self._lengths = [0] * max_batch

    def cached_tokens(self, slot: int) -> int:
        return self._lengths[slot]

    def _check_room(self, slot: int, count: int) -> int:
        """The slot's length once `count` tokens are appended; refuses to grow past the context."""
        total = self._lengths[slot] + count
        if total > self.context_length:
            raise BackendError(f"sequence of {total} tokens exceeds the artifact's context of {self.context_length}")
        return total


class OrtBackend(CpuSessionBackend):
    """Slots of sequences on ONNX Runtime's CPU provider; batched decode over left-padded caches.

    Each slot keeps its own cache (OrtValues, never copied between steps). A batched decode stacks
    the listed slots into one left-padded batch once, then keeps feeding the batch's `present`
    back as `past`; it is restacked only when a sequence joins (see kv_batch.py).
    """

    name = "onnxruntime-cpu"

    def __init__(self, artifact: Path, manifest: BuildManifest, threads: int | None = None, max_batch: int = 1):
        super().__init__(artifact, manifest, threads, max_batch)
        c = manifest.config
        self._output_names = [names.LOGITS, *self._present_names]
        self._empty_past = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=manifest.kv_dtype)
        self._pasts: list[list | None] = [None] * max_batch
        self._batch: KVBatch | None = None
        # Speculation: the graph's num_logits input (a default of 1 a run may override; older artifacts lack it)
        session_inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.can_score = names.NUM_LOGITS in {i.name for i in session_inputs}

    def _run(self, token_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence,
             num_logits: int = 1) -> list:
        if num_logits != 1:  # ordinary steps leave the graph's default of 1 and keep their IO binding
            return self._run_overriding(token_ids, mask, positions, past, num_logits)
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

    def _run_overriding(self, token_ids, mask, positions, past: Sequence, num_logits: int) -> list:
        """A step that sets num_logits: IO binding only knows the graph's required inputs, not an initializer
        a run may override, so this one goes through run_with_ort_values (the cache still stays OrtValues)."""
        from onnxruntime import OrtValue

        arrays = {names.INPUT_IDS: token_ids, names.ATTENTION_MASK: mask, names.POSITION_IDS: positions,
                  names.NUM_LOGITS: np.array([num_logits], np.int64)}
        feed = {name: OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        for name, value in zip(self._past_names, past):
            feed[name] = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) \
                else value
        return self.session.run_with_ort_values(self._output_names, feed)

    def _run_slot(self, slot: int, token_ids: Sequence[int], num_logits: int = 1) -> np.ndarray:
        """One slot alone: its own cache, no padding; logits of the last num_logits positions."""
        start, total = self._lengths[slot], self._check_room(slot, len(token_ids))
        past = self._pasts[slot] or [self._empty_past] * len(self._past_names)
        outputs = self._run(
            np.asarray([token_ids], dtype=np.int64),
            np.ones((1, total), dtype=np.int64),
            np.arange(start, total, dtype=np.int64)[None, :],
            past,
            num_logits,
        )
        self._pasts[slot], self._lengths[slot] = outputs[1:], total
        return outputs[0].numpy()

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("prefill needs at least one token")
        if self._batch is not None and slot in self._batch.live:
            self._take_back(slot)
        return self._run_slot(slot, list(token_ids))[0]

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        batch = self._batch
        in_batch = batch.live if batch is not None else set()
        for slot in slots:
            if self._pasts[slot] is None and slot not in in_batch:
                raise BackendError(f"decode called on slot {slot}, which was not prefilled")
            self._check_room(slot, 1)
        if len(slots) == 1 and slots[0] not in in_batch:
            return self._run_slot(slots[0], [token_ids[0]])
        if set(slots) != in_batch or batch.dead > len(in_batch):
            batch = self._restack(slots)
        ids, mask, positions = batch.step_inputs(dict(zip(slots, token_ids)))
        outputs = self._run(ids, mask, positions, batch.past)
        batch.advance(outputs[1:])
        for slot in slots:
            self._lengths[slot] += 1
        return outputs[0].numpy()[batch.rows_of(slots)]

    def score(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot and return the logits after each of them, [len(token_ids), vocab]:
        one pass over the weights checks a speculated continuation (Speculation capability)."""
        check_score(self.can_score, self._lengths[slot], token_ids)
        if self._batch is not None and slot in self._batch.live:
            self._take_back(slot)
        return self._run_slot(slot, list(token_ids), num_logits=len(token_ids))

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions: its present is cut. A copy, which the next step would make
        anyway (a sliced cache is not contiguous, and the standard graph concatenates past and new each step)."""
        check_truncate(slot, self._lengths[slot], length)
        if length == self._lengths[slot]:
            return
        if self._batch is not None and slot in self._batch.live:
            self._take_back(slot)
        # Copied while the OrtValues it comes from are alive: a view of them would outlive their buffers.
        self._pasts[slot] = [np.ascontiguousarray(as_array(value)[:, :, :length]) for value in self._pasts[slot]]
        self._lengths[slot] = length

    def _restack(self, slots: Sequence[int]) -> KVBatch:
        """A new batch of exactly these slots: one copy of each live cache, dead rows dropped."""
        old = self._batch
        caches = [old.row_cache(s) if old is not None and s in old.live else self._pasts[s] for s in slots]
        self._batch = KVBatch.stack(slots, caches)
        for slot in slots:
            self._pasts[slot] = None  # the batch holds them now: never two copies of a cache
        if old is not None:
            for slot in old.live - set(slots):
                self._pasts[slot] = old.row_cache(slot)
        return self._batch

    def _take_back(self, slot: int) -> None:
        """Give a batched slot its own cache again (a view of its row) and make its row dead."""
        self._pasts[slot] = self._batch.row_cache(slot)
        self._drop(slot)

    def _drop(self, slot: int) -> None:
        self._batch.drop(slot)
        if not self._batch.live:
            self._batch = None

    def reset(self, slot: int) -> None:
        if self._batch is not None and slot in self._batch.live:
            self._drop(slot)  # the row stays, dead, until the next sequence joins: leaving costs nothing
        self._pasts[slot], self._lengths[slot] = None, 0

    def kv_bytes(self, tokens: int) -> int:
        """What a copy of `tokens` positions of one slot's cache takes (Backend.export_kv)."""
        c = self.manifest.config
        return len(self._past_names) * c.num_kv_heads * c.head_dim * self._empty_past.itemsize * tokens

    def export_kv(self, slot: int, length: int) -> np.ndarray:
        """A copy of the slot's first `length` positions, [layers x (k, v), 1, kv_heads, length, head_dim],
        in one allocation (see OrtFusedBackend.export_kv)."""
        if length > self._lengths[slot]:
            raise BackendError(f"slot {slot} holds {self._lengths[slot]} tokens, not {length}")
        in_batch = self._batch is not None and slot in self._batch.live
        cache = self._batch.row_cache(slot) if in_batch else self._pasts[slot]
        return np.stack([as_array(value)[:, :, :length] for value in cache])

    def import_kv(self, slot: int, kv: np.ndarray, length: int) -> None:
        """Start the (reset) slot from the first `length` positions of an exported copy."""
        self._check_room(slot, length)
        self._pasts[slot] = [np.ascontiguousarray(part[:, :, :length]) for part in kv]
        self._lengths[slot] = length
