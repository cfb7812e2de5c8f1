"""Benchmarks / hardware check: what the device KV path itself costs per step, at Llama-2-7B size, with no model.

A trivial engine (it only asks profile_for, as the TensorRT backend does) under the real
DeviceKvBackend: a step's time is then all ours — planning, the id/position (and mask) uploads, the
logits download and its stream synchronisation, and, when the set of slots changes, the repack's
device-to-device copies (64 K/V tensors × heads rows per slot at 7B). Slots are fitted against the
device's free memory (cudaMemGetInfo on a GPU), as the GPU backends do. Used by bench/gpu_standin.py.
"""

from __future__ import annotations

import time

from llmpack.export.graph import interface
from llmpack.export.trt_build import optimization_profiles
from llmpack.runtime.backends.device_kv import DeviceKvBackend, KvGeometry, fit_slots
from llmpack.runtime.backends.trt import profile_for
from llmpack.runtime.manifest import BuildManifest, FileDigest, ModelConfig, SourceInfo

SHAPES = {
    "llama2-7b": (ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                              max_position_embeddings=4096, tie_word_embeddings=False), 3072),
    "tiny": (ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=5, num_heads=8,
                         num_kv_heads=4, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=512, tie_word_embeddings=False), 512),
}
RESERVE_BYTES = 1 << 30  # what the GPU backends keep free for activations


def synthetic_manifest(shape: str) -> BuildManifest:
    config, context = SHAPES[shape]
    inputs, outputs = interface(config, "float16")
    return BuildManifest(
        name=f"{shape}-shape", config=config, dtype="fp16", max_context=context, opset=18, bos_token_id=1,
        stop_token_ids=(2,), inputs=inputs, outputs=outputs, source=SourceInfo("(none: no weights)", ()),
        files=(FileDigest("model.onnx", "0" * 64, 0),), build_key="", llmpack_version="", tool_versions={},
        built_at="")


class TrivialBackend(DeviceKvBackend):
    name = "trivial"

    def __init__(self, manifest: BuildManifest, device, slots: int):
        self.profiles = optimization_profiles(manifest.config, manifest.max_context, slots)
        self.max_step_tokens = max(p.seq[2] for p in self.profiles)
        super().__init__(manifest, device, slots)

    def _execute(self, step, bindings) -> None:
        profile_for(self.profiles, len(step.batch.slots), step.seq, step.batch.width)


def _per_step_ms(backend, batches: list[list[int]], steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        slots = batches[i % len(batches)]
        backend.decode(slots, [5] * len(slots))
    return (time.perf_counter() - start) / steps * 1000


def measure(device, shape: str, wanted: int = 4, steps: int = 50, prompt: int = 100) -> dict:
    """Steady decode (no copies) and repacking decode (the batch changes every step), per step."""
    manifest = synthetic_manifest(shape)
    free = device.free_memory()
    slots = fit_slots(manifest, free, wanted, RESERVE_BYTES if free > 4 * RESERVE_BYTES else 0)
    backend = TrivialBackend(manifest, device, slots)
    try:
        for slot in range(slots):
            backend.prefill(slot, [1] * (prompt + 7 * slot))  # unequal lengths: padded rows, as in serving
        everyone = list(range(slots))
        _per_step_ms(backend, [everyone], 5)  # warm-up
        steady = _per_step_ms(backend, [everyone], steps)
        repack = _per_step_ms(backend, [everyone, everyone[:-1] or everyone], steps)
        lengths = [backend.cached_tokens(s) for s in everyone]
    finally:
        backend.close()
    g = KvGeometry.of(manifest, slots)
    return {"shape": shape, "free_gib": free / 2**30, "slots": slots, "steady_ms": steady, "repack_ms": repack,
            "repack_mib": g.tensors * g.kv_heads * sum(lengths) * g.token_bytes / 2**20,
            "kv_gib": g.total_bytes / 2**30}


def lines(result: dict) -> list[str]:
    r = result
    return [f"- device KV path alone ({r['shape']} shape, fp16, trivial engine): {r['slots']} slots fitted in "
            f"{r['free_gib']:.1f} GiB free (KV cache {r['kv_gib']:.1f} GiB); steady decode {r['steady_ms']:.3f} ms "
            f"per step, decode that repacks the batch every step {r['repack_ms']:.3f} ms "
            f"(~{r['repack_mib']:.0f} MiB of copies for the whole batch)"]
