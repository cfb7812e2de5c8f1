"""Benchmarks / hardware check: `make gpu-check` — the GPU backends against the CPU reference, on an NVIDIA GPU.

For the demo model and ../shared/models/stories260k (plus any checkpoint folders given as arguments):
builds the fp16 artifact with a TensorRT engine, then for each backend (cpu, cuda, tensorrt) runs the
checks of `llm-export verify` against transformers (prefill logits, greedy tokens identical, cached
decode vs a full forward), checks that a batched decode gives each sequence's tokens alone, and
measures time to first token, decode tokens/s and GPU memory. Writes bench/results/gpu-check-<date>.md.
On a machine without TensorRT, a GPU or onnxruntime-gpu it exits 2 with one line saying what is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

from llmpack.export.build import BuildOptions  # noqa: E402
from llmpack.export.trt_build import EngineBuildOptions, build_with_engine  # noqa: E402
from llmpack.export.verify import (  # noqa: E402
    LOGIT_TOLERANCE,
    Check,
    ParityReport,
    _artifact_greedy,
    _load_reference,
    _reference_greedy,
    parity_checks,
)
from llmpack.runtime.artifact import CUDA_PROVIDER, open_artifact, open_backend, ort_providers  # noqa: E402
from llmpack.runtime.backends.cuda_device import (  # noqa: E402
    GPU_EXTRA,
    cuda_call,
    cudart,
    probe_gpu,
    tensorrt_version,  # noqa: E402
)

REPO = Path(__file__).resolve().parents[1]
MODELS = {"demo": "demo", "stories260k": str(REPO.parent / "shared" / "models" / "stories260k")}
BACKENDS = ("cpu", "cuda", "tensorrt")


def missing() -> str | None:
    gpu = probe_gpu()
    problems = ([] if tensorrt_version() else [f"TensorRT is not installed ({GPU_EXTRA})"]) + \
        ([gpu] if isinstance(gpu, str) else [])
    if CUDA_PROVIDER not in ort_providers():
        problems.append(f"onnxruntime has no {CUDA_PROVIDER} (pip uninstall onnxruntime, then {GPU_EXTRA})")
    return "needs TensorRT, an NVIDIA GPU and onnxruntime-gpu: " + "; ".join(problems) if problems else None


def gpu_used_bytes() -> int:
    free, total = cuda_call(cudart().cudaMemGetInfo())
    return int(total) - int(free)


def parity(backend, prompt: list[int], reference, steps: int, tolerance: float) -> tuple[Check, ...]:
    """The three rungs of `llm-export verify`, on the given backend, and the batched rung."""
    return (*parity_checks(backend, prompt, reference, steps, tolerance),
            batched_check(backend, prompt, _artifact_greedy(backend, prompt, steps)[1], steps))


def batched_check(backend, prompt: list[int], alone: list[int], steps: int) -> Check:
    """Two sequences decoded in one batch (one left-padded) give the tokens each gives alone."""
    other = prompt[: len(prompt) // 2]
    _, other_alone = _artifact_greedy(backend, other, steps)
    backend.reset(0)
    firsts = [backend.prefill(0, prompt), backend.prefill(1, other)]
    together = [[int(np.argmax(firsts[0]))], [int(np.argmax(firsts[1]))]]
    for _ in range(steps - 1):
        logits = backend.decode([0, 1], [together[0][-1], together[1][-1]])
        for row in range(2):
            together[row].append(int(np.argmax(logits[row])))
    backend.reset(0)
    backend.reset(1)
    ok = together == [alone, other_alone]
    return Check("batch of 2 vs each alone", "identical" if ok else "differ", "identical", ok)


def timings(backend, prompt: list[int], steps: int) -> dict[str, float]:
    start = time.perf_counter()
    token = int(np.argmax(backend.prefill(0, prompt)))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(backend.decode([0], [token])[0]))
    single = steps / (time.perf_counter() - start)
    backend.reset(0)
    return {"ttft_ms": ttft * 1000, "decode_tok_s": single}


def check_model(name: str, source: str, out_root: Path, args) -> list[str]:
    result, engine = build_with_engine(BuildOptions(model=source, out=out_root / name, dtype="fp16"),
                                       EngineBuildOptions(max_batch=args.max_batch))
    lines = [f"## {name}", "", f"- {engine.summary()}", ""]
    artifact = open_artifact(result.path)
    manifest = artifact.manifest
    rng = np.random.default_rng(0)
    prompt = [manifest.bos_token_id] + rng.integers(3, manifest.config.vocab_size, 15).tolist()
    reference = _reference_greedy(_load_reference(Path(manifest.source.path)), prompt, args.steps)
    long_prompt = [manifest.bos_token_id] + rng.integers(3, manifest.config.vocab_size, 127).tolist()
    rows = []
    for backend_name in BACKENDS:
        before = gpu_used_bytes()
        backend = open_backend(artifact, backend_name, max_batch=2)
        report = ParityReport(f"{name} on {backend.name}", manifest.dtype,
                              parity(backend, prompt, reference, args.steps, LOGIT_TOLERANCE[manifest.dtype]))
        speed = timings(backend, long_prompt, args.decode_steps)
        used = (gpu_used_bytes() - before) / 2**20 if backend_name != "cpu" else 0.0
        rows.append(f"| {backend.name} | {'ok' if report.ok else 'FAIL'} | {speed['ttft_ms']:.1f} | "
                    f"{speed['decode_tok_s']:.0f} | {used:.0f} |")
        lines += ["```", report.table(), "```", ""]
        getattr(backend, "close", lambda: None)()
    lines += ["| backend | parity | TTFT 128-token prompt (ms) | decode tok/s (batch 1) | GPU memory (MiB) |",
              "| --- | --- | --- | --- | --- |", *rows, ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="more Hugging Face Llama checkpoint folders to check")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens compared with transformers")
    parser.add_argument("--decode-steps", type=int, default=128, help="tokens timed for decode tokens/s")
    args = parser.parse_args()
    problem = missing()
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    models = {**MODELS, **{Path(s).name: s for s in args.sources}}
    lines = [header("GPU check: TensorRT and ONNX Runtime CUDA vs the CPU reference", "tensorrt", "onnxruntime-gpu",
                    "cuda-python", "torch"), f"- GPU: {probe_gpu()}", ""]
    for name, source in models.items():
        lines += check_model(name, source, REPO / "artifacts" / "gpu-check", args)
    text = "\n".join(lines)
    print(text)
    results = REPO / "bench" / "results" / f"gpu-check-{dt.date.today().isoformat()}.md"
    results.write_text(text + "\n", encoding="utf-8")
    return 0 if "| FAIL |" not in text else 1


if __name__ == "__main__":
    sys.exit(main())
