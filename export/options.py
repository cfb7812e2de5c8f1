"""Export stage 0: what a build is asked for — the options of `llm-export build`, each default defined once.

Light on purpose (no torch, no onnx): the CLI reads its option defaults from these dataclasses at import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from llmpack.export.quantize import QUANT_BITS, QuantSpec
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
    # bench-110m), block 32 keeps int4 closest to fp32, symmetric blocks decode fastest.
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True

    @property
    def quant_spec(self) -> QuantSpec:
        return QuantSpec(QUANT_BITS[self.quant], self.block_size, self.accuracy_level, self.symmetric)


def resolve_graph(options: BuildOptions, for_tensorrt: bool = False) -> BuildOptions:
    """`--graph auto`: the fused graph for ONNX Runtime on the CPU (the fastest there, README), the standard
    one for TensorRT (its parser takes plain ONNX ops only) and for fp16 (the GPU route; fused is fp32)."""
    if options.graph != names.AUTO_GRAPH:
        return options
    standard = for_tensorrt or options.dtype != "fp32"
    return dataclasses.replace(options, graph=fused.STANDARD if standard else fused.FLAVOUR)


@dataclass(frozen=True)
class EngineBuildOptions:
    max_batch: int = 4
    workspace_gb: float = 8.0
    force: bool = False
    report_dir: str | None = None  # set: TensorRT's verbose build log and its engine inspector's layer JSON go here
