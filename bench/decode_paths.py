"""Benchmark: how the ORT backend should carry the KV cache between decode steps.

Compares, on the same artifact, in the same process and alternating rounds:
  iobinding — past bound as the previous step's OrtValues, outputs left in ORT (what OrtBackend does);
  numpy     — session.run() with numpy feeds; every step copies the whole cache out and back in.
Writes bench/results/decode-paths-<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

from llmpack.runtime import manifest as names  # noqa: E402
from llmpack.runtime.artifact import open_artifact  # noqa: E402
from llmpack.runtime.backends.ort_cpu import OrtBackend  # noqa: E402


class NumpyPath:
    """The naive loop: plain session.run with numpy arrays in and out."""

    def __init__(self, backend: OrtBackend):
        self.b = backend
        c = backend.manifest.config
        self.past_names = [n for i in range(c.num_layers) for n in (names.past_key_name(i), names.past_value_name(i))]

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        b, start = self.b, time.perf_counter()
        feed = {name: b._empty_past for name in self.past_names}
        ids, length = np.array([prompt], dtype=np.int64), 0
        first = None
        for _ in range(new_tokens):
            total = length + ids.shape[1]
            feed |= {names.INPUT_IDS: ids, names.ATTENTION_MASK: np.ones((1, total), np.int64),
                     names.POSITION_IDS: np.arange(length, total, dtype=np.int64)[None]}
            out = b.session.run(None, feed)
            feed |= dict(zip(self.past_names, out[1:]))
            ids, length = np.array([[int(np.argmax(out[0][0]))]], dtype=np.int64), total
            first = first or time.perf_counter() - start
        return first, time.perf_counter() - start


def iobinding_generate(backend: OrtBackend, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    logits = backend.prefill(0, prompt)
    first = time.perf_counter() - start
    for _ in range(new_tokens - 1):
        logits = backend.decode([0], [int(np.argmax(logits))])[0]
    backend.reset(0)
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    artifact = open_artifact(args.artifact, verify_checksums=False)
    backend = OrtBackend(artifact.path, artifact.manifest, threads=args.threads)
    numpy_path = NumpyPath(backend)
    prompt = [1] + list(range(100, 100 + args.prompt_tokens - 1))
    paths = {"iobinding": lambda: iobinding_generate(backend, prompt, args.new_tokens),
             "numpy": lambda: numpy_path.generate(prompt, args.new_tokens)}
    for run in paths.values():
        run()  # warm-up
    results = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            first, total = run()
            results[name].append(((args.new_tokens - 1) / (total - first), first))
    lines = [header("KV-cache path of the ONNX Runtime backend", "onnxruntime", "numpy"),
             f"artifact `{artifact.path.name}` ({artifact.manifest.dtype}), prompt {args.prompt_tokens} tokens, "
             f"{args.new_tokens} new tokens, greedy, {args.threads} threads, {args.rounds} rounds alternating",
             "", "| path | decode tok/s (median) | min–max | TTFT ms (median) |", "|---|---|---|---|"]
    for name, runs in results.items():
        speeds = [s for s, _ in runs]
        lines.append(f"| {name} | {statistics.median(speeds):.1f} | {min(speeds):.1f}–{max(speeds):.1f} | "
                     f"{1000 * statistics.median(f for _, f in runs):.0f} |")
    ratio = statistics.median(s for s, _ in results["iobinding"]) / statistics.median(s for s, _ in results["numpy"])
    lines += ["", f"iobinding / numpy decode speed: {ratio:.2f}×", ""]
    write_results("decode-paths", lines)


if __name__ == "__main__":
    main()
