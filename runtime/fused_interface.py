"""The artifact contract of the `ort-fused` graph flavour: its extra tensor names and cache geometry.

Export writes the graph with these names and the fused backend binds them; both import them from
here (runtime side, so serving needs no export code). The standard flavour's names stay in manifest.py.
"""

from __future__ import annotations

from llmpack.runtime.manifest import FUSED_GRAPH as FLAVOUR
from llmpack.runtime.manifest import GRAPH_FLAVOURS as FLAVOURS
from llmpack.runtime.manifest import STANDARD_GRAPH as STANDARD
from llmpack.runtime.manifest import ModelConfig

# GroupQueryAttention's per-row cache bookkeeping: after a step a row holds seqlens_k + 1 tokens.
SEQLENS_K = "seqlens_k"  # int32 [batch]
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: max over rows of seqlens_k + 1
AXIS_CAPACITY = "capacity"  # the cache buffers' time axis: preallocated, shared by past and present

# ONNX Runtime's CPU GroupQueryAttention refuses head sizes that are not a multiple of 16.
HEAD_ALIGN = 16


def kv_head_dim(config: ModelConfig) -> int:
    """The head size the graph runs with: the model's, zero-padded up to a multiple of HEAD_ALIGN."""
    return -(-config.head_dim // HEAD_ALIGN) * HEAD_ALIGN
