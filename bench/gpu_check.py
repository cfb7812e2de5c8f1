"""Benchmarks / hardware check: `make gpu-check` — the GPU backends against the CPU reference, on an NVIDIA GPU.

For stories260k (the gate: a trained model, so fp16 and fp32 greedy agree unless something is wrong;
the shipped copy unless --stories names another folder), the random demo model (reported, never
gating: its fp16 greedy tokens may differ from fp32 on near-ties for reasons that are not ours) and
any checkpoint folders given as arguments: builds the fp16 artifact (with a TensorRT engine when
TensorRT is here, its verbose build log and layer JSON written beside it), then for each backend
that can run on this machine (cpu, cuda, tensorrt: each gated on its own) runs `llm-export
verify`'s checks against transformers plus batched-vs-alone, and after a warm-up measures time to
first token, decode tokens/s and GPU memory. Writes bench/results/gpu-check-<date>.md. With no GPU
backend able to run it exits 2 with one line per backend saying what is missing.
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

from llmpack.export.build import BuildOptions, build  # noqa: E402
from llmpack.export.trt_build import EngineBuildOptions, build_engine, require_prerequisites  # noqa: E402
from llmpack.export.verify import (  # noqa: E402
    LOGIT_TOLERANCE,
    Check,
    ParityReport,
    _artifact_greedy,
    _load_reference,
    _reference_greedy,
    parity_checks,
)
from llmpack.runtime.artifact import CUDA_PROVIDER, Probes, open_artifact, open_backend  # noqa: E402
from llmpack.runtime.backends.cuda_device import GPU_EXTRA, cuda_call, cudart  # noqa: E402
from llmpack.runtime.errors import LlmpackError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GATE = "stories260k"


def backend_problems(probes: Probes) -> dict[str, str | None]:
    """Each GPU backend on its own: None when it can run here, else why not (TensorRT missing leaves cuda)."""
    gpu = probes.gpu()
    gpu_problem = gpu if isinstance(gpu, str) else None
    try:
        providers = probes.ort_providers()
    except LlmpackError as exc:  # no onnxruntime, or both builds at once
        providers, gpu_problem = (), gpu_problem or exc.message
    cuda = gpu_problem or (None if CUDA_PROVIDER in providers else
                           f"onnxruntime has no {CUDA_PROVIDER} (pip uninstall onnxruntime, then {GPU_EXTRA})")
    tensorrt = gpu_problem or (None if probes.tensorrt_version() else f"TensorRT is not installed ({GPU_EXTRA})")
    return {"cuda": cuda, "tensorrt": tensorrt}


def models_to_check(stories: str, demo: bool, sources: list[str]) -> dict[str, tuple[str, bool]]:
    """name → (source, gates the exit status)."""
    models = {GATE: (stories, True)}
    if demo:
        models["demo"] = ("demo", False)
    return models | {Path(s).name: (s, True) for s in sources}


def gpu_used_bytes() -> int:
    free, total = cuda_call(cudart().cudaMemGetInfo())
    return int(total) - int(free)


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


def timings(backend, prompt: list[int], steps: int, warmup: int = 3) -> dict[str, float]:
    """TTFT and decode tokens/s, after `warmup` untimed rounds (first calls pay for kernels, arenas, autotuning)."""
    for _ in range(warmup):
        token = int(np.argmax(backend.prefill(0, prompt)))
        for _ in range(4):
            token = int(np.argmax(backend.decode([0], [token])[0]))
        backend.reset(0)
    start = time.perf_counter()
    token = int(np.argmax(backend.prefill(0, prompt)))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(backend.decode([0], [token])[0]))
    single = steps / (time.perf_counter() - start)
    backend.reset(0)
    return {"ttft_ms": ttft * 1000, "decode_tok_s": single}


def build_artifact(name: str, source: str, out_root: Path, with_engine: bool, max_batch: int) -> tuple[Path, list[str]]:
    result = build(BuildOptions(model=source, out=out_root / name, dtype="fp16", graph="standard"))
    if not with_engine:
        return result.path, [f"- {result.path}: fp16 standard graph, no engine (TensorRT not here)"]
    report = out_root / f"{name}-tensorrt-report"
    engine = build_engine(result.path, EngineBuildOptions(max_batch=max_batch, force=True, report_dir=str(report)),
                          *require_prerequisites())
    return result.path, [f"- {engine.summary()}", f"- TensorRT build log and layer JSON: {report}/"]


def check_backend(artifact, backend_name: str, prompt, reference, args) -> tuple[str, list[str], bool]:
    manifest = artifact.manifest
    before = gpu_used_bytes() if backend_name != "cpu" else 0
    try:
        backend = open_backend(artifact, backend_name, max_batch=2)
    except LlmpackError as exc:
        return f"| {backend_name} | FAIL | | | |", [f"{backend_name}: {exc.message}"], False
    try:
        checks = (*parity_checks(backend, prompt, reference, args.steps, LOGIT_TOLERANCE[manifest.dtype]),)
        checks += (batched_check(backend, prompt, _artifact_greedy(backend, prompt, args.steps)[1], args.steps),)
        report = ParityReport(f"{manifest.name} on {backend.name}", manifest.dtype, checks)
        rng = np.random.default_rng(1)
        long_prompt = [manifest.bos_token_id] + rng.integers(3, manifest.config.vocab_size, 127).tolist()
        speed = timings(backend, long_prompt, args.decode_steps)
        used = (gpu_used_bytes() - before) / 2**20 if backend_name != "cpu" else 0.0
    finally:
        getattr(backend, "close", lambda: None)()
    row = (f"| {backend.name} | {'ok' if report.ok else 'FAIL'} | {speed['ttft_ms']:.1f} | "
           f"{speed['decode_tok_s']:.0f} | {used:.0f} |")
    return row, ["```", report.table(), "```", ""], report.ok


def check_model(name: str, source: str, backends: list[str], args) -> tuple[list[str], bool]:
    path, lines = build_artifact(name, source, REPO / "artifacts" / "gpu-check", "tensorrt" in backends,
                                 args.max_batch)
    lines = [f"## {name}", "", *lines, ""]
    artifact = open_artifact(path)
    manifest = artifact.manifest
    prompt = [manifest.bos_token_id] + np.random.default_rng(0).integers(3, manifest.config.vocab_size, 15).tolist()
    reference = _reference_greedy(_load_reference(Path(manifest.source.path)), prompt, args.steps)
    rows, ok = [], True
    for backend_name in ["cpu", *backends]:
        row, text, passed = check_backend(artifact, backend_name, prompt, reference, args)
        rows.append(row)
        lines += text
        ok &= passed
    lines += ["| backend | parity | TTFT 128-token prompt (ms) | decode tok/s (batch 1) | GPU memory (MiB) |",
              "| --- | --- | --- | --- | --- |", *rows, ""]
    return lines, ok


def main(argv: list[str] | None = None, probes: Probes = Probes()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="more Hugging Face Llama checkpoint folders to check (gating)")
    parser.add_argument("--stories", default="stories260k",
                        help="the stories260k checkpoint folder (default: the copy shipped in export/models)")
    parser.add_argument("--no-demo", action="store_true", help="skip the random demo model (never gating)")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens compared with transformers")
    parser.add_argument("--decode-steps", type=int, default=128, help="tokens timed for decode tokens/s")
    args = parser.parse_args(argv)
    problems = backend_problems(probes)
    skipped = [f"{name}: {why}" for name, why in problems.items() if why]
    backends = [name for name, why in problems.items() if why is None]
    if not backends:
        print("gpu-check: no GPU backend can run here; " + "; ".join(skipped), file=sys.stderr)
        return 2
    lines = [header("GPU check: TensorRT and ONNX Runtime CUDA vs the CPU reference", "tensorrt", "tensorrt-cu13",
                    "onnxruntime-gpu", "cuda-python", "torch"), f"- GPU: {probes.gpu()}",
             *(f"- not run: {line}" for line in skipped), ""]
    ok = True
    for name, (source, gates) in models_to_check(args.stories, not args.no_demo, args.sources).items():
        text, passed = check_model(name, source, backends, args)
        lines += text if gates else [*text, "(reported, not gating: random weights, fp16 near-ties)", ""]
        ok &= passed or not gates
    text = "\n".join(lines)
    print(text)
    results = REPO / "bench" / "results" / f"gpu-check-{dt.date.today().isoformat()}.md"
    results.write_text(text + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
