"""The artifact contract of the `ort-fused` graph flavour: its extra tensor names and cache geometry.

Export writes the graph with these names and the fused backend binds them; both import them from
here (runtime side, so serving needs no export code). The standard flavour's names stay in manifest.py.
"""

from __future__ import annotations

# Re-exported: the fused contract names its own flavour and the others beside its tensor names.
from llmpack.runtime.manifest import FUSED_GRAPH as FLAVOUR  # noqa: F401
from llmpack.runtime.manifest import GRAPH_FLAVOURS as FLAVOURS  # noqa: F401
from llmpack.runtime.manifest import (
    NUM_LOGITS,  # noqa: F401
    BuildManifest,
    ModelConfig,
)
from llmpack.runtime.manifest import STANDARD_GRAPH as STANDARD  # noqa: F401

# GroupQueryAttention's per-row cache bookkeeping: after a step a row holds seqlens_k + 1 tokens.
SEQLENS_K = "seqlens_k"  # int32 [batch]
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: max over rows of seqlens_k + 1
AXIS_CAPACITY = "capacity"  # the cache buffers' time axis: preallocated, shared by past and present
# int64 [1]: how many last positions get logits (1 for decode and prompt chunks; k + 1 when a step checks k
# speculated tokens). Logits are then [batch * num_logits, vocab]. Artifacts built before it lack the input.
# A required input here (every fused step binds it); the standard graph's same-named input has a default.
AXIS_LOGIT_ROWS = "logit_rows"

# The mixed-step graph (mixed.onnx, beside model.onnx and sharing its weights file): ONE pass over the
# weights runs a decode step for a batch (the inputs above, seq 1) AND a prompt chunk of one more
# sequence. Its logits are [batch + 1, vocab]: the decode rows, then the chunk's last position.
MIXED_MODEL_FILE = "mixed.onnx"
CHUNK_IDS = "chunk_input_ids"  # int64 [1, chunk]
CHUNK_SEQLENS_K = "chunk_seqlens_k"  # int32 [1]
CHUNK_TOTAL_SEQUENCE_LENGTH = "chunk_total_sequence_length"  # int32 scalar
AXIS_CHUNK = "chunk"
CHUNK_PREFIX = "chunk."  # + a past/present name: the chunk row's view of the same cache buffer


def chunk_name(cache_name: str) -> str:
    return CHUNK_PREFIX + cache_name


def has_mixed_graph(manifest: BuildManifest) -> bool:
    """Whether the artifact ships mixed.onnx (fused artifacts built before it do not)."""
    return any(f.path == MIXED_MODEL_FILE for f in manifest.files)


# ONNX Runtime's CPU GroupQueryAttention refuses head sizes that are not a multiple of 16.
HEAD_ALIGN = 16


def kv_head_dim(config: ModelConfig) -> int:
    """The head size the graph runs with: the model's, zero-padded up to a multiple of HEAD_ALIGN."""
    return -(-config.head_dim // HEAD_ALIGN) * HEAD_ALIGN
