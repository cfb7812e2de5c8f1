"""CLI edge of `llm-export build`: the graph-flavour and weight-quantization options, as one decorator.

Kept apart from export_cli.py so the build command gains them with one line; the command receives
them together as `graph_options`, ready for BuildOptions(**graph_options).
"""

from __future__ import annotations

import functools

import click

from llmpack.export.quantize import BLOCK_SIZES, QUANT_BITS
from llmpack.runtime.manifest import GRAPH_FLAVOURS, STANDARD_GRAPH

# Defaults chosen by measurement (README "Performance on CPU" and "Quantization quality"): accuracy
# level 4 (int8 activations) is the only fast MatMulNBits path on this CPU for either width (level 0
# decodes int8 at 2 tok/s, int4 at 21 on bench-110m), and block 32 keeps int4 closest to fp32.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4


def graph_options(command):
    @click.option("--graph", type=click.Choice(GRAPH_FLAVOURS), default=STANDARD_GRAPH, show_default=True,
                  help="standard: plain ONNX ops (TensorRT parses them); ort-fused: ONNX Runtime's fused "
                       "contrib ops with an in-place KV cache (fastest on the CPU).")
    @click.option("--quant", type=click.Choice(list(QUANT_BITS)), default="none", show_default=True,
                  help="Weight-only block-wise quantization of every Linear, head included (MatMulNBits).")
    @click.option("--block-size", type=click.Choice([str(size) for size in BLOCK_SIZES]),
                  default=str(DEFAULT_BLOCK_SIZE), show_default=True, help="With --quant: weights per scale.")
    @click.option("--accuracy-level", type=click.IntRange(0, 4), default=DEFAULT_ACCURACY_LEVEL, show_default=True,
                  help="With --quant: MatMulNBits compute type for activations (0 as is, 4 int8).")
    @click.option("--symmetric/--asymmetric", default=True, show_default=True,
                  help="With --quant: scales only, or scales and zero points per block.")
    @functools.wraps(command)
    def wrapper(*args, graph, quant, block_size, accuracy_level, symmetric, **kwargs):
        options = dict(graph=graph, quant=quant, block_size=int(block_size), accuracy_level=accuracy_level,
                       symmetric=symmetric)
        return command(*args, graph_options=options, **kwargs)

    return wrapper
