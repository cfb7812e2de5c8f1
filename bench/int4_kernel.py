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
import statistics
import sys
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


def kernel_graph(shapes: list[tuple[str, int, int, str]], spec, hidden: int, inter: int) -> tuple[bytes, int]:
    """A model of independent MatMulNBits nodes (serialized) and its bytes of quantized weights."""
    from onnx import TensorProto, helper, numpy_helper

    from llmpack.export.quantize import CONTRIB_DOMAIN, quantize

    rng, nodes, weights = np.random.default_rng(0), [], []
    for name, n, k, source in shapes:
        q = quantize(rng.standard_normal((n, k), dtype=np.float32) * 0.02, spec)
        tensors = {f"{name}.codes": q.codes, f"{name}.scales": q.scales}
        if q.zero_points is not None:
            tensors[f"{name}.zero_points"] = q.zero_points
        weights += [numpy_helper.from_array(array, key) for key, array in tensors.items()]
        nodes.append(helper.make_node("MatMulNBits", [source, *tensors], [f"{name}.y"], domain=CONTRIB_DOMAIN,
                                      K=k, N=n, bits=4, block_size=spec.block_size,
                                      accuracy_level=spec.accuracy_level))
    graph = helper.make_graph(
        nodes, "int4_kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, inter])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None) for node in nodes], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    model.ir_version = 10  # what onnxruntime 1.31 reads
    return model.SerializeToString(), sum(len(w.raw_data) for w in weights)


def open_session(model: bytes, threads: int):
    import onnxruntime as ort

    from llmpack.runtime.huge_pages import back_with_huge_pages, mapped_ranges

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    before = mapped_ranges()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
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
    from llmpack.export.quantize import QuantSpec

    block, kind = text.split(":")
    return QuantSpec(bits=4, block_size=int(block), symmetric=kind == "sym")


def main() -> None:
    from llmpack.export.random_checkpoint import SHAPES

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="stories110m")
    parser.add_argument("--layers", type=int, help="layers in the graph (default: all of the shape's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="block:sym|asym, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    shapes = linear_shapes(shape, args.layers or shape["num_hidden_layers"])
    feeds = {"x": np.random.default_rng(1).random((1, shape["hidden_size"]), dtype=np.float32),
             "h": np.random.default_rng(2).random((1, shape["intermediate_size"]), dtype=np.float32)}
    variants = []
    for text in args.variants.split(","):
        model, weight_bytes = kernel_graph(shapes, parse_variant(text), shape["hidden_size"], shape["intermediate_size"])
        variants.append((text, weight_bytes, open_session(model, args.threads)))
    rounds = {text: [] for text, _, _ in variants}
    for _ in range(args.rounds):
        for text, _, session in variants:
            rounds[text].append(step_ms(session, feeds, args.steps))
    write_results("int4-kernel", report(args, shapes, variants, rounds), args.label)


def report(args, shapes, variants, rounds: dict[str, list[float]]) -> list[str]:
    params = sum(n * k for _, n, k, _ in shapes)
    first = statistics.median(rounds[variants[0][0]])
    lines = [header(f"int4 MatMulNBits kernel by block size: {args.shape}, {len(shapes) - 1} Linears + head",
                    "onnxruntime", "numpy"), f"- {params / 1e6:.0f} M weights, batch 1, {args.threads} threads, "
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
