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


class OrtBackend:
    """One sequence at a time on ONNX Runtime's CPU execution provider."""

    name = "onnxruntime-cpu"

    def __init__(self, artifact: Path, manifest: BuildManifest, threads: int | None = None):
        self.manifest = manifest
        self.context_length = manifest.max_context
        self.vocab_size = manifest.config.vocab_size
        check_memory(manifest, sum(f.size for f in manifest.files if f.path == names.WEIGHTS_FILE))
        self.session = create_session(Path(artifact) / names.MODEL_FILE, threads)
        c = manifest.config
        self._layers = c.num_layers
        self._past_names = [n for i in range(c.num_layers) for n in (names.past_key_name(i), names.past_value_name(i))]
        self._output_names = [names.LOGITS] + [
            n for i in range(c.num_layers) for n in (names.present_key_name(i), names.present_value_name(i))
        ]
        self._empty_past = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=manifest.kv_dtype)
        self._ones = np.ones((1, self.context_length), dtype=np.int64)
        self._past: list | None = None
        self._length = 0

    @property
    def cached_tokens(self) -> int:
        return self._length

    def _run(self, token_ids: np.ndarray, past: Sequence) -> np.ndarray:
        count = token_ids.shape[1]
        total = self._length + count
        if total > self.context_length:
            raise BackendError(f"sequence of {total} tokens exceeds the artifact's context of {self.context_length}")
        binding = self.session.io_binding()
        binding.bind_cpu_input(names.INPUT_IDS, token_ids)
        binding.bind_cpu_input(names.ATTENTION_MASK, self._ones[:, :total])
        binding.bind_cpu_input(names.POSITION_IDS, np.arange(self._length, total, dtype=np.int64)[None, :])
        for name, value in zip(self._past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past = outputs[1:]
        self._length = total
        return outputs[0].numpy()[0]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise BackendError("prefill needs at least one token")
        self.reset()
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        return self._run(ids, [self._empty_past] * (2 * self._layers))

    def decode(self, token_id: int) -> np.ndarray:
        if self._past is None:
            raise BackendError("decode called before prefill")
        return self._run(np.array([[token_id]], dtype=np.int64), self._past)

    def reset(self) -> None:
        self._past = None
        self._length = 0
