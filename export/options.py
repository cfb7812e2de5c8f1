"""Export stage 0: what a build is asked for — the options of `llm-export build`, each default defined once.

Light on purpose (no torch, no onnx): the CLI reads its option defaults from these dataclasses at import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from llmpack.export.quantize import AUTO_BLOCK, QUANT_BITS, QuantSpec, auto_block_size
from llmpack.runtime import manifest as names
from llmpack.runtime.backends import fused_interface as fused

DTYPES = ("fp32", "fp16")
DEFAULT_MAX_CONTEXT = 3072


@dataclass(frozen=True)
class BuildOptions:
    model: str
    out: Path
    dtype: str = "fp32"
    max_context: int = DEFAULT_MAX_CONTEXT
    force: bool = False
    progress: bool = False
    system_prompt: str | None = None
    graph: str = names.AUTO_GRAPH  # or fused.STANDARD / fused.FLAVOUR; resolve_graph says which auto picks
    quant: str = "none"  # "int8" | "int4": weight-only, block-wise, every Linear
    # Chosen by measurement (README "Quantization"): accuracy level 4 (int8 activations) is the only fast
    # MatMulNBits path on the CPU for either width (level 0 decodes int8 at 2 tok/s, int4 at 21 on
    # bench-110m), symmetric blocks decode fastest, and the block size follows the model's size
    # (export/quantize.py auto_block_size: 32 keeps small models closest to fp32, 128 reads 25 % fewer bytes
    # per token at 7B); resolve_block_size turns "auto" into the number before anything reads quant_spec.
    block_size: int | str = AUTO_BLOCK
    accuracy_level: int = 4
    symmetric: bool = True

    @property
    def quant_spec(self) -> QuantSpec:
        if self.block_size == AUTO_BLOCK:
            raise ValueError("block_size 'auto' is resolved by resolve_block_size before the build reads it")
        return QuantSpec(QUANT_BITS[self.quant], self.block_size, self.accuracy_level, self.symmetric)


def resolve_graph(options: BuildOptions, for_tensorrt: bool = False) -> BuildOptions:
    """`--graph auto`: the fused graph for ONNX Runtime on the CPU (the fastest there, README), the standard
    one for TensorRT (its parser takes plain ONNX ops only) and for fp16 (the GPU route; fused is fp32)."""
    if options.graph != names.AUTO_GRAPH:
        return options
    standard = for_tensorrt or options.dtype != "fp32"
    return dataclasses.replace(options, graph=fused.STANDARD if standard else fused.FLAVOUR)


def resolve_block_size(options: BuildOptions, linear_weights: int) -> BuildOptions:
    """`--block-size auto`: the block for a model with `linear_weights` Linear weights; unquantized builds keep
    QuantSpec's own default (it is part of their build key, which must not move with the model's size)."""
    if options.block_size != AUTO_BLOCK:
        return options
    block = auto_block_size(linear_weights) if options.quant != "none" else QuantSpec().block_size
    return dataclasses.replace(options, block_size=block)


@dataclass(frozen=True)
class EngineBuildOptions:
    max_batch: int = 4
    workspace_gb: float = 8.0
    force: bool = False
    report_dir: str | None = None  # set: TensorRT's verbose build log and its engine inspector's layer JSON go here
