"""CLI edge of `llm-export build`: the graph-flavour and weight-quantization options, as one decorator.

Kept apart from export_cli.py so the build command gains them with one line; the command receives
them together as `graph_options`, ready for BuildOptions(**graph_options).
"""

from __future__ import annotations

import functools

import click

from llmpack.cli.common import defaults_of
from llmpack.export.options import BuildOptions
from llmpack.export.quantize import AUTO_BLOCK, BLOCK_SIZES, LARGE_MODEL_LINEAR_WEIGHTS, QUANT_BITS
from llmpack.runtime.manifest import AUTO_GRAPH, GRAPH_FLAVOURS

DEFAULTS = defaults_of(BuildOptions)  # each default is defined once, on BuildOptions (the reasons are there)


def graph_options(command):
    @click.option("--graph", type=click.Choice([AUTO_GRAPH, *GRAPH_FLAVOURS]), default=DEFAULTS.graph, show_default=True,
                  help="auto: ort-fused, or standard with --engine trt or --dtype fp16. standard: plain ONNX ops "
                       "(TensorRT parses them); ort-fused: ONNX Runtime's fused contrib ops with an in-place KV "
                       "cache (fastest on the CPU).")
    @click.option("--quant", type=click.Choice(list(QUANT_BITS)), default=DEFAULTS.quant, show_default=True,
                  help="Weight-only block-wise quantization of every Linear, head included (MatMulNBits).")
    @click.option("--block-size", type=click.Choice([AUTO_BLOCK, *(str(size) for size in BLOCK_SIZES)]),
                  default=str(DEFAULTS.block_size), show_default=True,
                  help=f"With --quant: weights per scale. auto: 128 for models with "
                       f"{LARGE_MODEL_LINEAR_WEIGHTS / 1e9:.0f} B Linear weights or more (fewer bytes read per token, "
                       f"where decode waits on memory), else 32 (closest to fp32).")
    @click.option("--accuracy-level", type=click.IntRange(0, 4), default=DEFAULTS.accuracy_level, show_default=True,
                  help="With --quant: MatMulNBits compute type for activations (0 as is, 4 int8).")
    @click.option("--symmetric/--asymmetric", default=DEFAULTS.symmetric, show_default=True,
                  help="With --quant: scales only, or scales and zero points per block.")
    @functools.wraps(command)
    def wrapper(*args, graph, quant, block_size, accuracy_level, symmetric, **kwargs):
        block = block_size if block_size == AUTO_BLOCK else int(block_size)
        options = dict(graph=graph, quant=quant, block_size=block, accuracy_level=accuracy_level, symmetric=symmetric)
        return command(*args, graph_options=options, **kwargs)

    return wrapper
