"""Benchmark: ONNX Runtime's 4-bit MatMulNBits kernel alone, by block size and zero points, in a model's shapes.

The measurement behind `--quant int4`'s block size and symmetric default (README, quantization): a
graph of only the MatMulNBits nodes that one batch-1 decode step runs (the fused QKV, output,
gate/up and down projections of `--layers` layers, and the head), random weights quantized by
llmpack.export.quantize, one session per variant in this one process, its weights moved onto huge
pages as the runtime moves them, the variants timed in turn over several rounds. The rest of a
decode step (attention, norms) does not depend on the block size, so this isolates what the choice
costs. Writes bench/results/int4-kernel-<date><label>.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

DEFAULT_VARIANTS = "32:sym,64:sym,128:sym,32:asym"


def linear_shapes(shape: dict, layers: int) -> list[tuple[str, int, int, str]]:
    """(name, N, K, input) for every Linear one decode step runs, as `--graph ort-fused` fuses them."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    found = []
    for i in range(layers):
        found += [(f"l{i}.qkv", qkv, hidden, "x"), (f"l{i}.o", hidden, hidden, "x"),
                  (f"l{i}.gate_up", 2 * inter, hidden, "x"), (f"l{i}.down", hidden, inter, "h")]
    return found + [("head", shape["vocab_size"], hidden, "x")]


def kernel_model(folder: Path, shapes: list[tuple[str, int, int, str]], spec, hidden: int, inter: int) -> tuple[Path, int]:
    """A model of independent MatMulNBits nodes, written the way the export writes every Linear
    (export.quantize.write_linear into model.onnx.data); its path and its bytes of quantized weights."""
    from llmpack.export.onnx_writer import GraphWriter, value_info
    from llmpack.export.quantize import write_linear

    rng = np.random.default_rng(0)
    g = GraphWriter(folder / "model.onnx.data")
    outputs = [write_linear(g, source, name, rng.standard_normal((n, k), dtype=np.float32) * 0.02, spec)
               for name, n, k, source in shapes]
    g.finish([value_info("x", "float32", ("rows", hidden)), value_info("h", "float32", ("rows", inter))],
             [value_info(name, "float32", ("rows", n)) for name, (_, n, _, _) in zip(outputs, shapes)],
             opset=17, path=folder / "model.onnx", doc="bench/int4_kernel.py")
    return folder / "model.onnx", (folder / "model.onnx.data").stat().st_size


def open_session(model_path: Path, threads: int):
    """The runtime's own CPU session, its weights moved onto huge pages as open_backend moves them."""
    from llmpack.runtime.backends.huge_pages import back_with_huge_pages, mapped_ranges
    from llmpack.runtime.backends.ort_cpu import create_session

    before = mapped_ranges()
    session = create_session(model_path, threads)
    back_with_huge_pages(before)
    return session


def step_ms(session, feeds: dict, steps: int) -> float:
    """Median ms of one run of every node (one decode step's Linears) over `steps` runs, after a warm-up."""
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_variant(text: str):
    """block:sym|asym[:accN] (accuracy level N, default the export's 4)."""
    from llmpack.export.quantize import QuantSpec

    block, kind, *accuracy = text.split(":")
    level = int(accuracy[0].removeprefix("acc")) if accuracy else QuantSpec().accuracy_level
    return QuantSpec(bits=4, block_size=int(block), symmetric=kind == "sym", accuracy_level=level)


def main() -> None:
    from llmpack.export.random_checkpoint import SHAPES

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="stories110m")
    parser.add_argument("--layers", type=int, help="layers in the graph (default: all of the shape's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="block:sym|asym, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1,
                        help="tokens per step (1: decode; k + 1: a step checking k speculated tokens)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    shapes = linear_shapes(shape, args.layers or shape["num_hidden_layers"])
    feeds = {"x": np.random.default_rng(1).random((args.rows, shape["hidden_size"]), dtype=np.float32),
             "h": np.random.default_rng(2).random((args.rows, shape["intermediate_size"]), dtype=np.float32)}
    variants, folder = [], Path(tempfile.mkdtemp(prefix="int4-kernel-"))
    try:
        for text in args.variants.split(","):
            variant_folder = folder / text.replace(":", "-")
            variant_folder.mkdir()
            model, weight_bytes = kernel_model(variant_folder, shapes, parse_variant(text), shape["hidden_size"],
                                               shape["intermediate_size"])
            variants.append((text, weight_bytes, open_session(model, args.threads)))
    finally:  # the sessions hold their weights in memory; the files are not needed once they are open
        shutil.rmtree(folder)
    rounds = {text: [] for text, _, _ in variants}
    for _ in range(args.rounds):
        for text, _, session in variants:
            rounds[text].append(step_ms(session, feeds, args.steps))
    write_results("int4-kernel", report(args, shapes, variants, rounds), args.label)


def report(args, shapes, variants, rounds: dict[str, list[float]]) -> list[str]:
    params = sum(n * k for _, n, k, _ in shapes)
    first = statistics.median(rounds[variants[0][0]])
    lines = [header(f"int4 MatMulNBits kernel by block size: {args.shape}, {len(shapes) - 1} Linears + head",
                    "onnxruntime", "numpy"), f"- {params / 1e6:.0f} M weights, {args.rows} row(s) per step, {args.threads} threads, "
             f"{args.rounds} rounds x {args.steps} runs, median of the round medians", "",
             "| block:zero points | weight bits (file) | ms per step | round medians | vs first | GB/s of file bytes |",
             "|---|---|---|---|---|---|"]
    for text, weight_bytes, _ in variants:
        ms = statistics.median(rounds[text])
        spread = " ".join(f"{x:.2f}" for x in rounds[text])
        lines.append(f"| {text} | {8 * weight_bytes / params:.2f} | {ms:.2f} | {spread} | {first / ms:.2f}x "
                     f"| {weight_bytes / ms / 1e6:.1f} |")
    return lines


if __name__ == "__main__":
    main()
