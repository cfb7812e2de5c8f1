"""Export stage 2: write the Llama decoder as an ONNX graph with KV-cache inputs, straight from weights.

One graph serves prefill (seq > 1, empty past) and decode (seq = 1); it outputs the logits of the
last position only. Plain ONNX ops (TensorRT parses them). Precision-sensitive parts run in fp32 even
in an fp16 graph: RMSNorm statistics, the attention mask and the softmax.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from llmpack.export.checkpoint import Checkpoint, WeightReader
from llmpack.export.onnx_writer import NP_TO_ONNX, GraphWriter, value_info
from llmpack.export.progress import GRAPH_PHASE, progress_of
from llmpack.export.quantize import QuantSpec, write_linear
from llmpack.export.rope import inverse_frequencies
from llmpack.runtime import manifest as names
from llmpack.runtime.manifest import ModelConfig, TensorSpec

OPSET = 18
MASK_FILL = -1e9  # added in fp32 before the fp32 softmax: no fp16 overflow
F32 = "float32"


def interface(config: ModelConfig, kv_dtype: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs, as recorded in the manifest."""
    b, s, p, t = names.AXIS_BATCH, names.AXIS_SEQ, names.AXIS_PAST, names.AXIS_TOTAL
    kv_past = (b, config.num_kv_heads, p, config.head_dim)
    kv_present = (b, config.num_kv_heads, t, config.head_dim)
    inputs = [
        TensorSpec(names.INPUT_IDS, "int64", (b, s)),
        TensorSpec(names.ATTENTION_MASK, "int64", (b, t)),
        TensorSpec(names.POSITION_IDS, "int64", (b, s)),
    ]
    outputs = [TensorSpec(names.LOGITS, F32, (b, config.vocab_size))]
    for layer in range(config.num_layers):
        inputs += [
            TensorSpec(names.past_key_name(layer), kv_dtype, kv_past),
            TensorSpec(names.past_value_name(layer), kv_dtype, kv_past),
        ]
        outputs += [
            TensorSpec(names.present_key_name(layer), kv_dtype, kv_present),
            TensorSpec(names.present_value_name(layer), kv_dtype, kv_present),
        ]
    return tuple(inputs), tuple(outputs)


class LlamaGraph:
    """Builds the decoder node by node; weights are streamed from the checkpoint as they are needed."""

    def __init__(self, writer: GraphWriter, weights: WeightReader, config: ModelConfig, dtype: str,
                 quant: QuantSpec = QuantSpec()):
        self.g, self.w, self.c = writer, weights, config
        self.dtype = dtype  # numpy name of the activation and weight dtype
        self.quant = quant  # --quant: every Linear (head included) becomes MatMulNBits

    # --- weights -----------------------------------------------------------------------------

    def _tensor(self, name: str) -> np.ndarray:
        return self.w.get(name).astype(self.dtype, copy=False)

    def linear(self, x: str, name: str, bias: bool = False) -> str:
        """x @ W^T (+ b); W stored as [in, out] so that MatMul(x, W) needs no transpose at run time.

        bias: the projection has one (q/k/v of Qwen2); a `.bias` tensor beside any other weight is used too.
        """
        out = write_linear(self.g, x, name, self.w.get(name), self.quant, self.dtype)
        bias_name = name.removesuffix(".weight") + ".bias"
        if bias or self.w.has(bias_name):
            out = self.g.add("Add", [out, self.g.weight(bias_name, self._tensor(bias_name))])
        return out

    # --- building blocks ---------------------------------------------------------------------

    def cast(self, x: str, dtype: str) -> str:
        """Cast between fp32 and the graph dtype; a no-op in an fp32 graph."""
        return x if self.dtype == F32 else self.g.add("Cast", [x], to=_onnx_type(dtype))

    def rms_norm(self, x: str, weight_name: str) -> str:
        g = self.g
        xf = self.cast(x, F32)
        mean_sq = g.add("ReduceMean", [g.add("Mul", [xf, xf]), g.constant([-1], np.int64)], keepdims=1)
        inv_rms = g.add("Reciprocal", [g.add("Sqrt", [g.add("Add", [mean_sq, g.constant(self.c.rms_norm_eps, F32)])])])
        normed = self.cast(g.add("Mul", [xf, inv_rms]), self.dtype)
        return g.add("Mul", [normed, g.weight(weight_name, self._tensor(weight_name))])

    def rotary(self, position_ids: str) -> tuple[str, str]:
        """cos and sin [batch, 1, seq, head_dim], computed in fp32 like transformers does."""
        g, inv_freq = self.g, inverse_frequencies(self.c)
        pos = g.add("Unsqueeze", [g.add("Cast", [position_ids], to=_onnx_type(F32)), g.constant([2], np.int64)])
        freqs = g.add("Mul", [pos, g.constant(inv_freq.reshape(1, 1, -1), F32)])
        emb = g.add("Unsqueeze", [g.add("Concat", [freqs, freqs], axis=-1), g.constant([1], np.int64)])
        return self.cast(g.add("Cos", [emb]), self.dtype), self.cast(g.add("Sin", [emb]), self.dtype)

    def apply_rotary(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.c.head_dim // 2
        x1 = g.add("Slice", [x, g.constant([0], np.int64), g.constant([half], np.int64), g.constant([3], np.int64)])
        x2 = g.add("Slice", [x, g.constant([half], np.int64), g.constant([2 * half], np.int64), g.constant([3], np.int64)])
        rotated = g.add("Concat", [g.add("Neg", [x2]), x1], axis=3)
        return g.add("Add", [g.add("Mul", [x, cos]), g.add("Mul", [rotated, sin])])

    def attention_bias(self, input_ids: str, attention_mask: str) -> str:
        """Causal + padding mask as an fp32 additive bias [batch, 1, seq, past+seq]."""
        g = self.g
        zero, one = g.constant(0, np.int64), g.constant(1, np.int64)
        total = g.add("Squeeze", [g.add("Shape", [attention_mask], start=1, end=2), g.constant([0], np.int64)])
        seq = g.add("Squeeze", [g.add("Shape", [input_ids], start=1, end=2), g.constant([0], np.int64)])
        key_pos = g.add("Range", [zero, total, one])
        query_pos = g.add("Add", [g.add("Range", [zero, seq, one]), g.add("Sub", [total, seq])])
        causal = g.add("LessOrEqual", [key_pos, g.add("Unsqueeze", [query_pos, g.constant([1], np.int64)])])
        keep = g.add("Unsqueeze", [g.add("Cast", [attention_mask], to=_onnx_type("bool")), g.constant([1, 2], np.int64)])
        allowed = g.add("And", [causal, keep])
        bias = g.add("Where", [allowed, g.constant(0.0, F32), g.constant(MASK_FILL, F32)])
        return self._tile_for_groups(bias)

    def _tile_for_groups(self, bias: str) -> str:
        # Queries are grouped per kv head as [batch, kv, groups*seq, d]; the mask rows repeat per group.
        groups = self.c.num_heads // self.c.num_kv_heads
        if groups == 1:
            return bias
        return self.g.add("Tile", [bias, self.g.constant([1, 1, groups, 1], np.int64)])

    def attention(self, layer: int, x: str, cos: str, sin: str, bias: str) -> str:
        g, c = self.g, self.c
        prefix = f"model.layers.{layer}.self_attn"
        heads_shape = lambda n: g.constant([0, 0, n, c.head_dim], np.int64)  # noqa: E731
        q = self.linear(x, f"{prefix}.q_proj.weight", c.attention_bias)
        k = self.linear(x, f"{prefix}.k_proj.weight", c.attention_bias)
        v = self.linear(x, f"{prefix}.v_proj.weight", c.attention_bias)
        q = g.add("Transpose", [g.add("Reshape", [q, heads_shape(c.num_heads)])], perm=[0, 2, 1, 3])
        k = g.add("Transpose", [g.add("Reshape", [k, heads_shape(c.num_kv_heads)])], perm=[0, 2, 1, 3])
        v = g.add("Transpose", [g.add("Reshape", [v, heads_shape(c.num_kv_heads)])], perm=[0, 2, 1, 3])
        q = self.apply_rotary(q, cos, sin)
        k = self.apply_rotary(k, cos, sin)
        present_k = g.add("Concat", [names.past_key_name(layer), k], name=names.present_key_name(layer), axis=2)
        present_v = g.add("Concat", [names.past_value_name(layer), v], name=names.present_value_name(layer), axis=2)
        # Grouped-query attention without copying K/V: fold each kv head's query group into its rows.
        grouped = g.constant([0, c.num_kv_heads, -1, c.head_dim], np.int64)
        q = g.add("Mul", [q, g.constant(1.0 / math.sqrt(c.head_dim), self.dtype)])
        q = g.add("Reshape", [q, grouped])
        scores = g.add("MatMul", [q, g.add("Transpose", [present_k], perm=[0, 1, 3, 2])])
        scores = g.add("Add", [self.cast(scores, F32), bias])
        probs = self.cast(g.add("Softmax", [scores], axis=-1), self.dtype)
        context = g.add("MatMul", [probs, present_v])
        context = g.add("Reshape", [context, g.constant([0, c.num_heads, -1, c.head_dim], np.int64)])
        context = g.add("Transpose", [context], perm=[0, 2, 1, 3])
        context = g.add("Reshape", [context, g.constant([0, 0, c.num_heads * c.head_dim], np.int64)])
        return self.linear(context, f"{prefix}.o_proj.weight")

    def mlp(self, layer: int, x: str) -> str:
        g, prefix = self.g, f"model.layers.{layer}.mlp"
        gate = self.linear(x, f"{prefix}.gate_proj.weight")
        up = self.linear(x, f"{prefix}.up_proj.weight")
        act = g.add("Mul", [g.add("Mul", [gate, g.add("Sigmoid", [gate])]), up])
        return self.linear(act, f"{prefix}.down_proj.weight")

    def lm_head(self, hidden: str) -> str:
        """Logits of the last num_logits positions, [batch * num_logits, vocab] in fp32: the last one only
        ([batch, vocab]) unless a run overrides the input's default of 1 (a speculation check, ONNX Runtime)."""
        g, c = self.g, self.c
        first = g.add("Neg", [names.NUM_LOGITS])
        last = g.add("Slice", [hidden, first, g.constant([2**62], np.int64), g.constant([1], np.int64)])
        last = g.add("Reshape", [last, g.constant([-1, c.hidden_size], np.int64)])
        if self.quant.enabled:  # tied or not, the head gets its own quantized copy; the Gather keeps fp32
            source = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
            logits = write_linear(g, last, "lm_head.weight", self.w.get(source), self.quant, self.dtype)
            return g.add("Cast", [logits], name=names.LOGITS, to=_onnx_type(F32))
        if c.tie_word_embeddings:
            head = "model.embed_tokens.weight"  # tied: the embedding matrix is the output layer too
        else:
            head = self.g.weight("lm_head.weight", self._tensor("lm_head.weight"))
        logits = g.add("Gemm", [last, head], transB=1)
        return g.add("Cast", [logits], name=names.LOGITS, to=_onnx_type(F32))

    def build(self, progress: bool) -> None:
        g, c = self.g, self.c
        # An initializer that is also a graph input (written by write_decoder_graph): a default a run may override
        g.initializers.append(numpy_helper.from_array(np.array([1], np.int64), names.NUM_LOGITS))
        hidden = g.add("Gather", [g.weight("model.embed_tokens.weight", self._tensor("model.embed_tokens.weight")), names.INPUT_IDS])
        cos, sin = self.rotary(names.POSITION_IDS)
        bias = self.attention_bias(names.INPUT_IDS, names.ATTENTION_MASK)
        for layer in progress_of(range(c.num_layers), c.num_layers, GRAPH_PHASE, "layer", progress):
            prefix = f"model.layers.{layer}"
            normed = self.rms_norm(hidden, f"{prefix}.input_layernorm.weight")
            hidden = g.add("Add", [hidden, self.attention(layer, normed, cos, sin, bias)])
            normed = self.rms_norm(hidden, f"{prefix}.post_attention_layernorm.weight")
            hidden = g.add("Add", [hidden, self.mlp(layer, normed)])
        self.lm_head(self.rms_norm(hidden, "model.norm.weight"))


def _onnx_type(dtype: str) -> int:
    return NP_TO_ONNX[np.dtype(dtype)]


def stream_graph(checkpoint: Checkpoint, folder: Path, specs: tuple, build, doc: str) -> tuple:
    """Stream a decoder into folder: build(writer, weights) adds nodes and weights, then model.onnx is written."""
    inputs, outputs = specs
    writer = GraphWriter(Path(folder) / names.WEIGHTS_FILE)
    try:
        with WeightReader(checkpoint) as weights:
            build(writer, weights)
        writer.finish(
            [value_info(t.name, t.dtype, t.shape) for t in inputs],
            [value_info(t.name, t.dtype, t.shape) for t in outputs],
            OPSET,
            Path(folder) / names.MODEL_FILE,
            doc=doc,
        )
    finally:
        writer.close()
    return inputs, outputs


def write_decoder_graph(checkpoint: Checkpoint, folder: Path, dtype: str, progress: bool = False,
                        quant: QuantSpec = QuantSpec()) -> tuple:
    """Write model.onnx + model.onnx.data into folder; returns the (inputs, outputs) TensorSpecs."""
    np_dtype = "float16" if dtype == "fp16" else F32

    def build(writer: GraphWriter, weights: WeightReader) -> None:
        LlamaGraph(writer, weights, checkpoint.config, np_dtype, quant).build(progress)

    specs = interface(checkpoint.config, np_dtype)
    # num_logits joins the graph's inputs, not the manifest's: with its initializer it is an optional input
    graph_inputs = (*specs[0], TensorSpec(names.NUM_LOGITS, "int64", (1,)))
    stream_graph(checkpoint, folder, (graph_inputs, specs[1]), build,
                 f"llmpack Llama decoder, {dtype}, last-position logits (num_logits: more), KV cache in/out")
    return specs
