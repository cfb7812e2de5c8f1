"""Benchmark: how many bits per weight ONNX Runtime's CPU kernel holds for each MatMulNBits layout.

The measurement behind runtime/backends/mlas_layout.py (`llm-export inspect`'s "read per token" line and
`llm-serve bench`'s roofline): for each bits × block × zero points × accuracy level, a model of four Llama-2-7B
MLP-sized Linears (11008 × 4096) is written by the export's own write_linear; then a fresh process (so no
allocator reuse blurs it) opens it in the runtime's session, runs it once, and reports the growth of its
anonymous resident memory (what the kernel prepacked) and of its file-backed memory (initializers it reads from
the mapped weights file), per weight. Writes bench/results/packed-bits-<date><label>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

N, K, LINEARS = 11008, 4096, 4


def resident() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}


def measure(model: str) -> None:
    """Child process: open the model, run it once, print the resident growth per weight as JSON."""
    from llmpack.runtime.backends.ort_cpu import create_session

    before = resident()
    session = create_session(Path(model), 1)
    session.run(None, {"x": np.ones((1, K), np.float32), "h": np.ones((1, K), np.float32)})
    after = resident()
    print(json.dumps({key: 8 * (after[key] - before[key]) / (LINEARS * N * K) for key in after}))


def write_model(folder: Path, bits: int, block: int, symmetric: bool, level: int) -> float:
    """The four Linears as the export writes them; returns the weights file's bits per weight."""
    from int4_kernel import kernel_model

    from llmpack.export.quantize import QuantSpec

    spec = QuantSpec(bits=bits, block_size=block, symmetric=symmetric, accuracy_level=level)
    _, size = kernel_model(folder, [(f"l{i}", N, K, "x") for i in range(LINEARS)], spec, K, K)
    return 8 * size / (LINEARS * N * K)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child's entry point
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    from llmpack.runtime.backends.mlas_layout import streamed_bits_per_weight

    lines = [header("Bits per weight ONNX Runtime holds for MatMulNBits", "onnxruntime", "numpy"),
             f"- {LINEARS} Linears of {N} × {K}; growth of the process's resident memory per weight after one run",
             "", "| bits | block | zero points | accuracy level | file | anonymous (prepacked) | file-backed | "
             "mlas_layout.py |", "|---|---|---|---|---|---|---|---|"]
    for bits in (4, 8):
        for block in (32, 64, 128):
            for symmetric in (True, False):
                for level in (4, 0):
                    with tempfile.TemporaryDirectory() as folder:
                        file_bits = write_model(Path(folder), bits, block, symmetric, level)
                        argv = [sys.executable, __file__, "--measure", str(Path(folder) / "model.onnx")]
                        child = subprocess.run(argv, capture_output=True, text=True, check=True)
                    grown = json.loads(child.stdout.splitlines()[-1])
                    lines.append(f"| {bits} | {block} | {'no' if symmetric else 'yes'} | {level} | {file_bits:.2f} | "
                                 f"{grown['RssAnon']:.2f} | {grown['RssFile']:.2f} | "
                                 f"{streamed_bits_per_weight(bits, block, level, symmetric):.2f} |")
    lines += ["", "The anonymous column also carries a fixed ~0.4 bits of session buffers (the same in every row), "
              "and the file-backed one ~0.9 of ONNX Runtime's own library pages; what varies with the layout is "
              "the rest."]
    write_results("packed-bits", lines, args.label)


if __name__ == "__main__":
    main()
