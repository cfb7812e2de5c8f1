"""Export stage 2 helper: weight-only block-wise quantization in ONNX Runtime's MatMulNBits layout.

One Linear weight at a time ([out, in] = [N, K] as Hugging Face stores it) becomes the three
initializers of `com.microsoft.MatMulNBits`: codes B uint8 [N, k_blocks, block_size*bits/8] packed
low-bits-first along K, scales [N, k_blocks] in the activation dtype, and (asymmetric only) zero
points uint8, packed like B for 4 bits ([N, ceil(k_blocks/2)]) and one per byte for 8 bits.
The layout was checked against ORT's contrib-operator spec (docs/ContribOperators.md, MatMulNBits)
and is pinned by tests/test_quantize.py against the numpy dequantization below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANT_BITS = {"none": 0, "int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128, 256)
AUTO_BLOCK = "auto"  # `--block-size auto`: auto_block_size below picks by the model's size
# From this many Linear weights on, a batch-1 decode step streams them from DRAM (they are far larger than any
# cache), so the bytes per weight set its speed. Measured at the two ends (docs/performance.md, "Block size"):
# Llama-2-7B shape, block 128 vs 32: 4.5 vs 6 bits held per int4 weight (runtime/backends/mlas_layout.py), the
# kernel 1.10-1.20x and whole decode 1.04x faster, peak RSS 4.1 vs 5.8 GiB; the 110M shape: no speed gain
# (0.97-1.03x) while stories260k's int4 KL grows 0.091 -> 0.106. Group 128 is also the usual 4-bit group at
# 7B (GPTQ's and AWQ's default). Between the two ends nothing was measured: the line sits at 1 B, below
# TinyLlama-1.1B and Llama-3.2-1B.
LARGE_MODEL_LINEAR_WEIGHTS = 1_000_000_000
SMALL_MODEL_BLOCK, LARGE_MODEL_BLOCK = 32, 128
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantSpec:
    """How every Linear is stored; `bits == 0` means plain fp32/fp16 MatMul weights."""

    bits: int = 0
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True  # no zero points: codes centred on 2^(bits-1), what MLAS runs fastest

    @property
    def enabled(self) -> bool:
        return self.bits > 0

    @property
    def file_bits_per_weight(self) -> float:
        """Bits each quantized weight takes in model.onnx.data: codes, fp32 scales, packed zero points."""
        return self.bits + (32 + (0 if self.symmetric else self.bits)) / self.block_size

    @property
    def name(self) -> str:
        return next(k for k, v in QUANT_BITS.items() if v == self.bits)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # [N, k_blocks]
    zero_points: np.ndarray | None  # uint8, packed; None when symmetric
    k: int
    n: int


def auto_block_size(linear_weights: int) -> int:
    """The block `--block-size auto` picks for a model with this many Linear weights (head included)."""
    return LARGE_MODEL_BLOCK if linear_weights >= LARGE_MODEL_LINEAR_WEIGHTS else SMALL_MODEL_BLOCK


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, k_blocks, block_size] in fp32, zero-padding K up to a whole block."""
    n, k = weight.shape
    pad = (-k) % block_size
    w = weight.astype(np.float32, copy=False)
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1)
    return w.reshape(n, -1, block_size)


def _symmetric(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # MLAS's own rule: the signed value of largest magnitude maps to the code 0 (i.e. -2^(bits-1)),
    # so the whole range [-2^(bits-1), 2^(bits-1)-1] is used and the zero point stays implicit.
    half = 1 << (bits - 1)
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]
    scales = extreme / -half
    zero = np.full(scales.shape, half, np.float32)
    return scales, zero, np.where(scales == 0, 1.0, scales).astype(np.float32)


def _asymmetric(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scales = (hi - lo) / top
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    zero = np.clip(np.rint(-lo / safe), 0, top).astype(np.float32)
    return scales, zero, safe


def quantize(weight: np.ndarray, spec: QuantSpec, scale_dtype: str = "float32") -> QuantizedWeight:
    """Quantize one [N, K] weight block-wise along K; peak memory is a few copies of this tensor."""
    n, k = weight.shape
    blocks = _blocks(weight, spec.block_size)
    scales, zero, safe = (_symmetric if spec.symmetric else _asymmetric)(blocks, spec.bits)
    codes = np.rint(blocks / safe[..., None]) + zero[..., None]
    codes = np.clip(codes, 0, (1 << spec.bits) - 1).astype(np.uint8)
    zero_points = None if spec.symmetric else pack(zero.astype(np.uint8), spec.bits)
    return QuantizedWeight(pack(codes, spec.bits), scales.astype(scale_dtype), zero_points, k, n)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, low bits first (element 2j in the low nibble of byte j)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack`: the first `count` codes along the last axis."""
    if bits == 8:
        return packed[..., :count]
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


def dequantize(q: QuantizedWeight, spec: QuantSpec) -> np.ndarray:
    """The reference: (code - zero_point) * scale, back to [N, K] fp32 (what MatMulNBits multiplies by)."""
    k_blocks = q.codes.shape[1]
    codes = unpack(q.codes, spec.bits, spec.block_size).astype(np.float32)
    if q.zero_points is None:
        zero = np.float32(1 << (spec.bits - 1))
    else:
        zero = unpack(q.zero_points, spec.bits, k_blocks).astype(np.float32)[..., None]
    w = (codes - zero) * q.scales.astype(np.float32)[..., None]
    return w.reshape(q.n, -1)[:, : q.k]


def write_linear(g, x: str, name: str, weight: np.ndarray, spec: QuantSpec, dtype: str = "float32") -> str:
    """y = x @ weight.T for an [N, K] weight: a MatMul on [K, N], or MatMulNBits when quantizing."""
    if not spec.enabled:
        return g.add("MatMul", [x, g.weight(name, weight.astype(dtype, copy=False).T)])
    q = quantize(weight, spec, scale_dtype=dtype)
    inputs = [x, g.weight(f"{name}.q{spec.bits}", q.codes), g.weight(f"{name}.scales", q.scales)]
    if q.zero_points is not None:
        inputs.append(g.weight(f"{name}.zero_points", q.zero_points))
    return g.add("MatMulNBits", inputs, domain=CONTRIB_DOMAIN, K=q.k, N=q.n, bits=spec.bits,
                 block_size=spec.block_size, accuracy_level=spec.accuracy_level)
