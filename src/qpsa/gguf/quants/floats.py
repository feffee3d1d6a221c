"""The plain float types F32, F16 and BF16: a "block" is one element, its code the element's bit pattern."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from qpsa.gguf.quants.common import QuantGrid, half

T = GGMLQuantizationType


class FloatGrid(QuantGrid):
    """A plain float format: a "block" is one element, its code is the element's raw bit pattern.

    Floats are sign-magnitude: code + 1 moves the magnitude up by one ulp, so for a negative value
    (sign bit set) code + 1 makes the value more negative, and step is negative. step is one unit
    in the last place in the element's own format, 2**(max(exponent, 1) - bias - mantissa_bits),
    with the element's sign; this is np.spacing of the value except at the largest finite value
    (where np.spacing is inf) and at -0.0 (where np.spacing is +tiny but code + 1 gives -tiny).
    Infinities and NaNs have step NaN. Codes span the full bit range.
    """

    exponent_bits: int
    mantissa_bits: int
    bits_dtype: type  # unsigned integer type of the element's bit pattern

    def __init__(self):
        super().__init__()
        self.code_min, self.code_max = 0, (1 << (8 * self.type_size)) - 1

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        bits = blocks.view(self.bits_dtype)  # (n_blocks, 1)
        exponent = ((bits >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)).astype(np.int32)
        negative = (bits >> (self.exponent_bits + self.mantissa_bits)) != 0
        bias = (1 << (self.exponent_bits - 1)) - 1
        ulp = np.ldexp(np.float32(1), np.maximum(exponent, 1) - bias - self.mantissa_bits).astype(np.float32)
        step = np.where(negative, -ulp, ulp)
        step[exponent == (1 << self.exponent_bits) - 1] = np.nan
        return bits.astype(self.code_dtype), step

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        return np.ascontiguousarray(codes.astype(self.bits_dtype)).view(np.uint8).reshape(blocks.shape)


class F32(FloatGrid):
    """F32: 4 bytes, 8 exponent bits, 23 mantissa bits. Codes 0..2**32-1 held in int64."""

    qtype = T.F32
    exponent_bits, mantissa_bits, bits_dtype = 8, 23, np.uint32
    code_dtype = np.int64

    def quantize_blocks(self, x, weights=None):  # ggml ignores an importance matrix for float types
        return x.view(np.uint8)

    def dequantize_torch(self, b):
        return b.view(torch.float32)


class F16(FloatGrid):
    """F16: 2 bytes, 5 exponent bits, 10 mantissa bits. Codes 0..65535. Quantized by rounding to nearest even."""

    qtype = T.F16
    exponent_bits, mantissa_bits, bits_dtype = 5, 10, np.uint16

    def quantize_blocks(self, x, weights=None):  # ggml ignores an importance matrix for float types
        return half(x).view(np.uint8)

    def dequantize_torch(self, b):
        return b.view(torch.float16).float()


class BF16(FloatGrid):
    """BF16: 2 bytes, 8 exponent bits, 7 mantissa bits (the top half of an F32). Codes 0..65535.

    Quantized as ggml's fp32 -> bf16: round to nearest even on the top 16 bits, no flush of subnormals.
    """

    qtype = T.BF16
    exponent_bits, mantissa_bits, bits_dtype = 8, 7, np.uint16

    def quantize_blocks(self, x, weights=None):  # ggml ignores an importance matrix for float types
        bits = x.view(np.uint32)  # (n, 1); finite input
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16).view(np.uint8)

    def dequantize_torch(self, b):
        return b.view(torch.bfloat16).float()
