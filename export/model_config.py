"""Export stage 1: config.json → the manifest's ModelConfig, for the Llama family; the rest refused in one line.

Llama (2, 3.x, CodeLlama, TinyLlama, SmolLM), Mistral and Qwen2/2.5 are one decoder: RMSNorm, RoPE, grouped-
query attention, SwiGLU. What differs is read here: rope scaling and theta, an explicit head_dim, q/k/v
biases (Qwen2, or Llama's attention_bias), tied heads, a sliding window. Anything the graphs do not build
(experts, other attention or activation types, MLP biases) is refused naming the config field.
"""

from __future__ import annotations

from pathlib import Path

from llmpack.export.rope import check_rope_scaling, rope_type
from llmpack.runtime.errors import CheckpointError
from llmpack.runtime.manifest import ModelConfig

# model_type → the architectures that may go with it
FAMILIES = {"llama": {"LlamaForCausalLM"}, "mistral": {"MistralForCausalLM"}, "qwen2": {"Qwen2ForCausalLM"}}
# Fields whose presence (a truthy value) means a model the graphs do not build
REFUSED_FIELDS = {
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "mlp_bias": "biases on the MLP projections",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
}


def model_config(raw: dict, where: Path) -> ModelConfig:
    """Translate config.json into ModelConfig, refusing anything that is not a Llama-family decoder."""
    model_type = raw.get("model_type")
    archs = set(raw.get("architectures") or [])
    if model_type not in FAMILIES or (archs and not archs & FAMILIES[model_type]):
        raise CheckpointError(
            f"{where} holds a {model_type or 'unknown'} model ({', '.join(sorted(archs)) or 'no architectures'}); "
            f"llmpack exports the Llama family: model_type {', '.join(map(repr, FAMILIES))} "
            f"({', '.join(sorted(set().union(*FAMILIES.values())))})")
    _refuse_other_layers(raw, where)
    try:
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        rope = dict(raw.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling together here
        scaling = raw.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        max_positions = int(raw.get("max_position_embeddings", 4096))
        check_rope_scaling(scaling, str(where))
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            architecture=sorted(archs & FAMILIES[model_type])[0] if archs else sorted(FAMILIES[model_type])[0],
            rope_scaling=None if rope_type(scaling) == "default" else scaling,
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias")),
            sliding_window=_sliding_window(raw, model_type),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}/config.json lacks a valid {exc} for a {model_type} model") from exc


def _refuse_other_layers(raw: dict, where: Path) -> None:
    for name, what in REFUSED_FIELDS.items():
        if raw.get(name):
            raise CheckpointError(f"{where}: config field {name}={raw[name]!r} means {what}, which llmpack does "
                                  "not export")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: config field hidden_act={act!r}; llmpack builds SiLU (SwiGLU) MLPs only")
    kinds = set(raw.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise CheckpointError(f"{where}: config field layer_types has {', '.join(sorted(kinds))}; llmpack builds "
                              "full (and sliding-window) attention only")


def _sliding_window(raw: dict, model_type: str) -> int | None:
    """The attention window the model was trained with, None when every layer attends to everything.

    Qwen2 carries a sliding_window that only counts with use_sliding_window (and then from layer
    max_window_layers on); Mistral's applies whenever set.
    """
    window = raw.get("sliding_window")
    if not window:
        return None
    if model_type == "qwen2" and not raw.get("use_sliding_window"):
        return None
    if model_type == "llama":
        return None  # LlamaConfig has no window; a stray field does not change its attention
    return int(window)
