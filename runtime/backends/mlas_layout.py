"""Backends helper: how many bytes of quantized weights ONNX Runtime's CPU kernel holds, and so reads per token.

A batch-1 decode step streams every Linear weight once, so these bytes bound decode speed. They are not the
file's: for accuracy level 4 (int8 activations, what the export writes by default) MLAS prepacks each
MatMulNBits weight at load into its own buffer — the codes, and per block an fp32 scale, an fp32 block sum (the
zero-point correction term) and one more byte (a zero point, held even for symmetric blocks) — so block 32 holds
4 + 72/32 = 6.25 bits per int4 weight where the file has 5, and block 128 holds 4.56, about the 4.5 of llama.cpp's
q4_0. Other accuracy levels run on the file's own layout: codes, fp32 scales, packed zero points. Measured with
bench/packed_bits.py (the resident memory a session adds per weight; bench/results/packed-bits-2026-12-05.md:
6.24 / 5.12 / 4.55 bits for int4 blocks 32 / 64 / 128 at level 4, 10.24 / 9.12 / 8.55 for int8).
Pure arithmetic: no onnxruntime import.
"""

from __future__ import annotations

INT8_ACTIVATIONS = 4  # MatMulNBits accuracy_level whose CPU kernel prepacks (CompInt8)
_FP32_BITS = 32


def streamed_bits_per_weight(bits: int, block_size: int, accuracy_level: int, symmetric: bool) -> float:
    """Bits held (and read once per decode step) per quantized weight, everything per block included."""
    if accuracy_level == INT8_ACTIVATIONS:
        return bits + (2 * _FP32_BITS + 8) / block_size  # codes + fp32 scale + fp32 block sum + a byte
    zero_points = 0 if symmetric else bits  # one code-width zero point per block
    return bits + (_FP32_BITS + zero_points) / block_size


def linear_weight_bytes(manifest) -> int:
    """Bytes of Linear weights (head included) one decode step reads: what bounds batch-1 decode speed."""
    params = manifest.config.linear_parameters
    quant = manifest.quant
    if quant is None:
        return params * (2 if manifest.dtype == "fp16" else 4)
    bits = streamed_bits_per_weight(quant.bits, quant.block_size, quant.accuracy_level, quant.symmetric)
    return round(params * bits / 8)
