"""Export stage 2 (both graphs): the rotary frequencies a checkpoint's config asks for, baked into the graph.

Every supported `rope_scaling` only changes the inverse frequencies (its attention factor is 1), so one
function serves the standard graph (cos/sin computed from these in the graph) and the fused one (cos/sin
tables). Computed in float32 the way transformers' modeling_rope_utils.py does, so positions round alike.
"""

from __future__ import annotations

import math

import numpy as np

from llmpack.runtime.errors import CheckpointError
from llmpack.runtime.manifest import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_type(scaling: dict | None) -> str:
    return "default" if not scaling else str(scaling.get("rope_type") or scaling.get("type") or "default")


def check_rope_scaling(scaling: dict | None, where: str) -> None:
    """Refuse, in one line naming the field, what the graphs cannot reproduce exactly."""
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{where}: rope_scaling.rope_type {kind!r} is not supported (llmpack bakes "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); this checkpoint cannot be exported")
    needed = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
    missing = [key for key in needed if not isinstance(scaling.get(key), int | float)]
    if missing:
        raise CheckpointError(f"{where}: rope_scaling of type {kind!r} lacks a number for {', '.join(missing)}")
    if float((scaling or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor {scaling['partial_rotary_factor']} is not supported")


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """inv_freq [head_dim / 2] in float32, scaled as config.rope_scaling says."""
    d = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
    scaling, kind = config.rope_scaling or {}, rope_type(config.rope_scaling)
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, scaling, config.max_position_embeddings)
    return inv_freq  # default; dynamic up to max_position_embeddings, where build caps every context


def _llama3(inv_freq: np.ndarray, scaling: dict, max_position_embeddings: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (transformers' _compute_llama3_parameters, in float32)."""
    factor = np.float32(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
