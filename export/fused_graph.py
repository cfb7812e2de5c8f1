"""Export stage 2, `--graph ort-fused`: the decoder as ONNX Runtime's fused contrib operators.

The graph onnxruntime-genai's model builder writes, straight from weights: (Skip)SimplifiedLayer-
Normalization (the residual add fused into the RMSNorm), ONE QKV projection, GroupQueryAttention with
rotary inside, ONE gate/up projection, and every Linear a MatMul or (--quant) a MatMulNBits. The KV
cache is a preallocated buffer [batch, kv_heads, capacity, head_dim] that the backend binds as both
past and present, so a step appends in place instead of concatenating and copying the cache.
ONNX Runtime only (TensorRT cannot parse com.microsoft ops): the standard graph stays the default.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import helper

from llmpack.export.checkpoint import Checkpoint, WeightReader
from llmpack.export.graph import stream_graph
from llmpack.export.onnx_writer import GraphWriter
from llmpack.export.progress import GRAPH_PHASE, progress_of
from llmpack.export.quantize import CONTRIB_DOMAIN, QuantSpec, write_linear
from llmpack.export.rope import inverse_frequencies
from llmpack.runtime import manifest as names
from llmpack.runtime.backends import fused_interface as fused
from llmpack.runtime.manifest import ModelConfig, TensorSpec

F32 = "float32"
# The head's inputs, named so that mixed_graph.py can widen them to the decode rows + the chunk's last
LAST_HIDDEN, LAST_RESIDUAL = "last_position_hidden", "last_position_residual"


def interface(config: ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs, as recorded in the manifest."""
    b, s = names.AXIS_BATCH, names.AXIS_SEQ
    kv = (b, config.num_kv_heads, fused.AXIS_CAPACITY, fused.kv_head_dim(config))
    inputs = [TensorSpec(names.INPUT_IDS, "int64", (b, s)), TensorSpec(fused.SEQLENS_K, "int32", (b,)),
              TensorSpec(fused.TOTAL_SEQUENCE_LENGTH, "int32", ()), TensorSpec(fused.NUM_LOGITS, "int64", (1,))]
    outputs = [TensorSpec(names.LOGITS, F32, (fused.AXIS_LOGIT_ROWS, config.vocab_size))]
    for layer in range(config.num_layers):
        inputs += [TensorSpec(names.past_key_name(layer), F32, kv), TensorSpec(names.past_value_name(layer), F32, kv)]
        outputs += [TensorSpec(names.present_key_name(layer), F32, kv),
                    TensorSpec(names.present_value_name(layer), F32, kv)]
    return tuple(inputs), tuple(outputs)


def pad_heads(weight: np.ndarray, heads: int, head_dim: int, padded: int, axis: int) -> np.ndarray:
    """Zero-pad each head's two rotary halves from head_dim/2 to padded/2 along `axis`.

    Keeping the halves apart keeps rotate_half pairing dimension i with i + padded/2, so rotary,
    q·k and the context are unchanged; the zero rows/columns only round the head up to what
    GroupQueryAttention accepts (a multiple of 16).
    """
    if padded == head_dim:
        return weight
    moved = np.moveaxis(weight, axis, 0)
    split = moved.reshape(heads, 2, head_dim // 2, *moved.shape[1:])
    widths = [(0, 0), (0, 0), (0, (padded - head_dim) // 2)] + [(0, 0)] * (moved.ndim - 1)
    return np.moveaxis(np.pad(split, widths).reshape(heads * padded, *moved.shape[1:]), 0, axis)


def rotary_cache(config: ModelConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, padded/2]; the padded frequencies get angle 0 (they rotate zeros)."""
    d, half = config.head_dim, fused.kv_head_dim(config) // 2
    inv_freq = np.zeros(half, np.float32)
    # fp32 like transformers: position * inv_freq is rounded the same way before cos/sin.
    inv_freq[: d // 2] = inverse_frequencies(config)
    angles = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class FusedLlamaGraph:
    """Builds the fused decoder; each weight is read, fused/padded/quantized and streamed out in turn."""

    def __init__(self, writer: GraphWriter, weights: WeightReader, config: ModelConfig, quant: QuantSpec,
                 max_context: int):
        self.g, self.w, self.c, self.quant = writer, weights, config, quant
        self.max_context = max_context
        self.padded = fused.kv_head_dim(config)

    def _get(self, name: str) -> np.ndarray:
        return self.w.get(name).astype(F32, copy=False)

    def norm(self, x: str, weight_name: str, skip: str | None = None) -> tuple[str, str]:
        """RMSNorm of x (+ skip): (normed, the residual sum that the next skip-norm adds to)."""
        g, gamma = self.g, self.g.weight(weight_name, self._get(weight_name))
        if skip is None:
            return g.add("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=self.c.rms_norm_eps,
                         stash_type=1), x
        index = len(g.nodes)
        normed, total = f"skipnorm_{index}", f"residual_{index}"
        g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, gamma], [normed, "", "", total],
                                        name=f"n_{normed}", domain=CONTRIB_DOMAIN, epsilon=self.c.rms_norm_eps))
        return normed, total

    def qkv_weight(self, prefix: str) -> np.ndarray:
        c, pad = self.c, self.padded
        parts = [pad_heads(self._get(f"{prefix}.q_proj.weight"), c.num_heads, c.head_dim, pad, 0)]
        parts += [pad_heads(self._get(f"{prefix}.{p}_proj.weight"), c.num_kv_heads, c.head_dim, pad, 0)
                  for p in ("k", "v")]
        return np.concatenate(parts, axis=0)

    def qkv_bias(self, prefix: str) -> np.ndarray:
        c, pad = self.c, self.padded
        parts = [pad_heads(self._get(f"{prefix}.q_proj.bias"), c.num_heads, c.head_dim, pad, 0)]
        parts += [pad_heads(self._get(f"{prefix}.{p}_proj.bias"), c.num_kv_heads, c.head_dim, pad, 0) for p in "kv"]
        return np.concatenate(parts)

    def add_bias(self, x: str, name: str, values: np.ndarray | None = None) -> str:
        """x + b for a projection with a bias (Qwen2's q/k/v, a Llama attention_bias o_proj); x otherwise."""
        if values is None and not self.w.has(name):
            return x
        return self.g.add("Add", [x, self.g.weight(name, self._get(name) if values is None else values)])

    def attention(self, layer: int, x: str, cos: str, sin: str) -> str:
        g, c, prefix = self.g, self.c, f"model.layers.{layer}.self_attn"
        qkv = write_linear(g, x, f"{prefix}.qkv_proj.weight", self.qkv_weight(prefix), self.quant)
        if c.attention_bias:
            qkv = self.add_bias(qkv, f"{prefix}.qkv_proj.bias", self.qkv_bias(prefix))
        past = [names.past_key_name(layer), names.past_value_name(layer)]
        present = [names.present_key_name(layer), names.present_value_name(layer)]
        context = f"attn_{layer}"
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [qkv, "", "", *past, fused.SEQLENS_K, fused.TOTAL_SEQUENCE_LENGTH, cos, sin],
            [context, *present], name=f"n_gqa_{layer}", domain=CONTRIB_DOMAIN, num_heads=c.num_heads,
            kv_num_heads=c.num_kv_heads, do_rotary=1, scale=1.0 / math.sqrt(c.head_dim)))
        o_proj = pad_heads(self._get(f"{prefix}.o_proj.weight"), c.num_heads, c.head_dim, self.padded, 1)
        return self.add_bias(write_linear(g, context, f"{prefix}.o_proj.weight", o_proj, self.quant),
                             f"{prefix}.o_proj.bias")

    def mlp(self, layer: int, x: str) -> str:
        g, prefix = self.g, f"model.layers.{layer}.mlp"
        gate_up = np.concatenate([self._get(f"{prefix}.gate_proj.weight"), self._get(f"{prefix}.up_proj.weight")])
        both = write_linear(g, x, f"{prefix}.gate_up_proj.weight", gate_up, self.quant)
        gate, up = g.add_multi("Split", [both], 2, axis=-1, num_outputs=2)
        act = g.add("Mul", [g.add("Mul", [gate, g.add("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        return write_linear(g, act, f"{prefix}.down_proj.weight", self._get(f"{prefix}.down_proj.weight"), self.quant)

    def lm_head(self, mlp_out: str, residual: str) -> None:
        """Final norm and head on the last num_logits positions: [batch * num_logits, vocab] (num_logits is 1
        but for a step that checks speculated tokens, which needs every fed position's logits)."""
        g, c = self.g, self.c
        last = [g.add("Neg", [fused.NUM_LOGITS]), g.constant([2**62], np.int64), g.constant([1], np.int64)]
        normed, _ = self.norm(g.add("Slice", [mlp_out, *last], name=LAST_HIDDEN), "model.norm.weight",
                              g.add("Slice", [residual, *last], name=LAST_RESIDUAL))
        flat = g.add("Reshape", [normed, g.constant([-1, c.hidden_size], np.int64)])
        if c.tie_word_embeddings and not self.quant.enabled:  # the fp32 Gather table doubles as the head
            g.add("Gemm", [flat, "model.embed_tokens.weight"], name=names.LOGITS, transB=1)
            return
        source = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        logits = write_linear(g, flat, "lm_head.weight", self._get(source), self.quant)
        g.add("Identity", [logits], name=names.LOGITS)

    def build(self, progress: bool) -> None:
        g, c = self.g, self.c
        hidden = g.add("Gather", [g.weight("model.embed_tokens.weight", self._get("model.embed_tokens.weight")),
                                  names.INPUT_IDS])
        # One position past the context: the backend's dummy token for an idle, full row lands there.
        cos_table, sin_table = rotary_cache(c, self.max_context + 1)
        cos, sin = g.weight("rotary.cos_cache", cos_table), g.weight("rotary.sin_cache", sin_table)
        mlp_out = None
        for layer in progress_of(range(c.num_layers), c.num_layers, GRAPH_PHASE, "layer", progress):
            prefix = f"model.layers.{layer}"
            normed, hidden = self.norm(hidden if mlp_out is None else mlp_out, f"{prefix}.input_layernorm.weight",
                                       None if mlp_out is None else hidden)
            attn = self.attention(layer, normed, cos, sin)
            normed, hidden = self.norm(attn, f"{prefix}.post_attention_layernorm.weight", hidden)
            mlp_out = self.mlp(layer, normed)
        self.lm_head(mlp_out, hidden)


def write_fused_graph(checkpoint: Checkpoint, folder: Path, max_context: int, quant: QuantSpec,
                      progress: bool = False) -> tuple:
    """Write model.onnx + model.onnx.data (fused flavour) into folder; returns the (inputs, outputs) specs."""

    def build(writer: GraphWriter, weights: WeightReader) -> None:
        FusedLlamaGraph(writer, weights, checkpoint.config, quant, max_context).build(progress)

    return stream_graph(checkpoint, folder, interface(checkpoint.config), build,
                        f"llmpack Llama decoder, {fused.FLAVOUR} flavour, quant {quant.name}, in-place KV cache")
