"""Benchmarks / hardware check: `make gpu-standin` — the device KV path, step by step against ONNX Runtime on the CPU.

Drives the real DeviceKvBackend with the stand-in engine (bench/standin_engine.py) — on the real
CudaDevice and torch CUDA tensors with `--device cuda`, on host memory with `--device cpu` (what the
default suite runs: tests/test_gpu_standin.py) — and the ONNX Runtime CPU backend with the same
operations on the same artifact (stories260k in fp32 and fp16, the standard graph):
- randomized schedules of prefills (whole, and continued in chunks after a cached part), batched
  decodes of random slot subsets and resets: every step's logits within LOGIT_TOLERANCE (fp32 1e-4,
  fp16 2e-2, relative to the largest) and, in fp32, the same argmax;
- greedy decoding from the same prompt token-identical on both;
- on every step: a TensorRT profile covers it, addresses are 256-byte aligned, the mask spans past +
  seq, outputs have exactly their buffers' shapes;
- the path's own cost per step with a trivial engine (bench/standin_overhead.py): steady decode and
  decode that repacks the batch, at Llama-2-7B size on a GPU, slots fitted against cudaMemGetInfo.
Writes bench/results/gpu-standin-<date>.md (machine, versions, command). Exit 1 on any failure.
Runs from the source tree when llmpack is not installed (the lent GPU machines install nothing).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _import_llmpack() -> None:
    """Map llmpack.{export,runtime,cli} onto the source folders when no install provides them."""
    try:
        import llmpack.runtime  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="llmpack-src-")) / "llmpack"
        shim.mkdir()
        for part in ("export", "runtime", "cli"):
            (shim / part).symlink_to(REPO / part)
        sys.path.insert(0, str(shim.parent))


_import_llmpack()

import standin_overhead  # noqa: E402
from standin_engine import HostDevice, StandinBackend  # noqa: E402

from llmpack.export.verify import LOGIT_TOLERANCE, relative_error  # noqa: E402
from llmpack.runtime.artifact import open_artifact  # noqa: E402
from llmpack.runtime.backends.ort_cpu import OrtBackend  # noqa: E402

SLOTS = 3


@dataclass
class Tally:
    """What one artifact's comparison found."""

    steps: int = 0
    max_rel: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    argmax_differ: int = 0
    failures: list[str] = field(default_factory=list)
    profile_steps: list[int] = field(default_factory=list)  # engine calls per TensorRT profile [prefill, decode]

    def record(self, kind: str, got: np.ndarray, ref: np.ndarray, tolerance: float, exact_argmax: bool, what: str):
        self.steps += 1
        for row in range(ref.shape[0]):
            rel = relative_error(got[row], ref[row])[1]
            self.max_rel[kind] = max(self.max_rel[kind], rel)
            same = int(np.argmax(got[row])) == int(np.argmax(ref[row]))
            self.argmax_differ += not same
            if rel >= tolerance or (exact_argmax and not same):
                self.failures.append(f"{what}: rel {rel:.2e}, argmax {'same' if same else 'differs'}")


def make_device(kind: str):
    if kind == "cpu":
        return HostDevice()
    from llmpack.runtime.backends.cuda_device import CudaDevice

    return CudaDevice()


def open_pair(path: Path, device_kind: str, slots: int = SLOTS):
    artifact = open_artifact(path)
    ref = OrtBackend(artifact.path, artifact.manifest, threads=1, max_batch=slots)
    device = make_device(device_kind)
    return artifact.manifest, StandinBackend(artifact.path, artifact.manifest, device, device_kind, slots), ref


def schedule(rng: random.Random, context: int, vocab: int, operations: int, long_prompt: int):
    """Random (op, slot(s), tokens) with every slot staying within the context; lengths tracked here."""
    lengths = [0] * SLOTS
    for _ in range(operations):
        draw, slot = rng.random(), rng.randrange(SLOTS)
        if draw < 0.08 and lengths[slot]:
            lengths[slot] = 0
            yield "reset", slot, []
        elif draw < 0.35 or not any(lengths):
            room = context - lengths[slot]
            longest = long_prompt if rng.random() < 0.1 else 24
            count = min(room, rng.randint(1, longest))
            if count > 0:  # a new prompt on an empty slot, else the next chunk after its cached part
                lengths[slot] += count
                yield "prefill", slot, [rng.randrange(3, vocab) for _ in range(count)]
        else:
            live = [s for s in range(SLOTS) if 0 < lengths[s] < context]
            chosen = rng.sample(live, rng.randint(1, len(live))) if live else []
            for s in chosen:
                lengths[s] += 1
            if chosen:
                yield "decode", chosen, [rng.randrange(3, vocab) for _ in chosen]


def compare_schedule(path: Path, device_kind: str, seed: int, operations: int, long_prompt: int = 300) -> Tally:
    manifest, standin, ref = open_pair(path, device_kind)
    tally, tolerance = Tally(), LOGIT_TOLERANCE[manifest.dtype]
    exact = manifest.dtype == "fp32"
    try:
        for i, (op, slot, tokens) in enumerate(schedule(random.Random(seed), manifest.max_context,
                                                        manifest.config.vocab_size, operations, long_prompt)):
            what = f"seed {seed} op {i} {op} {slot} ({len(tokens)} tokens)"
            if op == "reset":
                standin.reset(slot)
                ref.reset(slot)
            elif op == "prefill":
                tally.record(op, standin.prefill(slot, tokens)[None], ref.prefill(slot, tokens)[None],
                             tolerance, exact, what)
            else:
                tally.record(op, standin.decode(slot, tokens), ref.decode(slot, tokens), tolerance, exact, what)
            if [standin.cached_tokens(s) for s in range(SLOTS)] != [ref.cached_tokens(s) for s in range(SLOTS)]:
                tally.failures.append(f"{what}: cached lengths differ")
        tally.profile_steps = list(standin.profile_steps)
    finally:
        standin.close()
    return tally


def greedy(backend, prompt: list[int], steps: int) -> list[int]:
    token, tokens = int(np.argmax(backend.prefill(0, prompt))), []
    for _ in range(steps):
        tokens.append(token)
        token = int(np.argmax(backend.decode([0], [token])[0]))
    backend.reset(0)
    return tokens


def compare_greedy(path: Path, device_kind: str, steps: int) -> tuple[list[int], list[int]]:
    manifest, standin, ref = open_pair(path, device_kind, slots=1)
    prompt = [manifest.bos_token_id]  # a story from nothing: what stories260k was trained to write
    try:
        return greedy(standin, prompt, steps), greedy(ref, prompt, steps)
    finally:
        standin.close()


def build_artifacts(stories: str, out: Path) -> dict[str, Path]:
    """stories260k in fp32 and fp16, standard graph; artifacts already in `out` are used as they are (build them
    on another machine and carry the folder where the export packages are missing)."""
    paths = {dtype: out / f"stories260k-{dtype}" for dtype in ("fp32", "fp16")}
    for dtype, path in paths.items():
        if not (path / "manifest.json").is_file():
            from llmpack.export.build import BuildOptions, build

            build(BuildOptions(model=stories, out=path, dtype=dtype, graph="standard"))
    return paths


def run_checks(artifacts: dict[str, Path], device_kind: str, seeds: int, operations: int,
               greedy_steps: int) -> tuple[list[str], bool]:
    lines, ok = [], True
    for dtype, path in artifacts.items():
        for seed in range(seeds):
            start = time.perf_counter()
            tally = compare_schedule(path, device_kind, seed, operations)
            ok &= not tally.failures
            lines.append(f"| {dtype} | schedule seed {seed} | {tally.steps} steps, profiles {tally.profile_steps} | "
                         f"prefill {tally.max_rel['prefill']:.1e}, decode {tally.max_rel['decode']:.1e} "
                         f"(< {LOGIT_TOLERANCE[dtype]:.0e}) | argmax differs {tally.argmax_differ} | "
                         f"{'ok' if not tally.failures else 'FAIL: ' + tally.failures[0]} | "
                         f"{time.perf_counter() - start:.1f} s |")
        got, want = compare_greedy(path, device_kind, greedy_steps)
        same = got == want
        ok &= same
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        lines.append(f"| {dtype} | greedy {greedy_steps} tokens | | | | "
                     f"{'ok: identical' if same else f'FAIL: first differs at {first}'} | |")
    return lines, ok


def device_lines(device_kind: str) -> list[str]:
    if device_kind == "cpu":
        return ["- device: host memory (HostDevice), stand-in engine on torch CPU tensors"]
    import torch

    from llmpack.runtime.backends.cuda_device import CudaDevice, probe_gpu

    device = CudaDevice()
    free = device.free_memory()
    device.close()
    return [f"- device: {probe_gpu()}, torch {torch.__version__} CUDA {torch.version.cuda}; CudaDevice "
            f"(cuda-python), stand-in engine on torch CUDA tensors on the backend's stream",
            f"- cudaMemGetInfo free at start: {free / 2**30:.1f} GiB"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--stories", default="stories260k", help="stories260k checkpoint (default: the shipped copy)")
    parser.add_argument("--artifacts", help="folder for the built artifacts (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--operations", type=int, default=120, help="operations per randomized schedule")
    parser.add_argument("--greedy-steps", type=int, default=64)
    parser.add_argument("--overhead-shape", choices=sorted(standin_overhead.SHAPES),
                        help="shape of the trivial-engine overhead run (default: llama2-7b on cuda, tiny on cpu)")
    parser.add_argument("--results", help="results file (default bench/results/gpu-standin-<date>-<device>.md)")
    args = parser.parse_args(argv)
    from machine import header

    out = Path(args.artifacts or tempfile.mkdtemp(prefix="standin-"))
    start = time.perf_counter()
    artifacts = build_artifacts(args.stories, out)
    rows, ok = run_checks(artifacts, args.device, args.seeds, args.operations, args.greedy_steps)
    shape = args.overhead_shape or ("llama2-7b" if args.device == "cuda" else "tiny")
    overhead = standin_overhead.lines(standin_overhead.measure(make_device(args.device), shape))
    lines = [header(f"Stand-in engine on the device KV path ({args.device}) vs ONNX Runtime CPU", "torch", "onnx",
                    "onnxruntime", "cuda-python", "numpy"), *device_lines(args.device), "",
             "| artifact | check | steps, per profile [prefill, decode] | max rel. error | argmax | result | time |",
             "| --- | --- | --- | --- | --- | --- | --- |", *rows, "", *overhead, "",
             f"{'PASS' if ok else 'FAIL'} in {time.perf_counter() - start:.0f} s"]
    results = Path(args.results) if args.results else \
        REPO / "bench" / "results" / f"gpu-standin-{time.strftime('%Y-%m-%d')}-{args.device}.md"
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines) + f"\n\nwritten to {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
