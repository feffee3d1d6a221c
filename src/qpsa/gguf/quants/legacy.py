"""The 32-weight types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: one float16 scale d (and min m) per block.

    Q8_0  34:  d | 32 × int8 q                         value = q·d
    Q4_0  18:  d | 16 qs                               value = (q − 8)·d
    Q4_1  20:  d | m | 16 qs                           value = d·q + m
    Q5_0  22:  d | qh (32 high bits) | 16 qs           value = (q − 16)·d
    Q5_1  24:  d | m | qh | 16 qs                      value = d·q + m

Quantizers without importance matrix (ggml's quantize_row_<type>_ref):

    Q8_0         d = amax / 127, code = round-half-away-from-zero(x / d)
    Q4_0, Q5_0   d = (the signed value of largest magnitude) / -8 or -16,
                 stored q = min(trunc(x / d + 8.5 or 16.5), 15 or 31)
    Q4_1, Q5_1   d = (max - min) / 15 or 31, m = min, q = trunc((x - min) / d + 0.5) (Q4_1: at most 15)

With an importance matrix (ggml's quantize_row_<type>_impl), each weight's error counts with
w = imatrix[column] * sqrt(sigma2 + x²), sigma2 the mean of x² over the whole row (not the block):

    Q4_0, Q5_0   the best of 19 candidate scales (make_qx_quants with w, `scale_search`)
    Q4_1, Q5_1   (scale, min) by make_qkx3_quants with w (`scale_min_search`); the codes of the search are stored
    Q8_0         the importance matrix is ignored (ggml's quantize_q8_0 does)
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

import qpsa.gguf.quants.compiled as compiled
from qpsa.gguf.quants.common import (
    F32,
    QuantGrid,
    c_int,
    first_absmax,
    first_max,
    first_min,
    half,
    half_bytes,
    pack,
    read_f16,
    read_f16_torch,
    roundf,
    sum_in_order,
    unpack,
)
from qpsa.gguf.quants.searches import scale_min_search, scale_search

T = GGMLQuantizationType


class Q4_0(QuantGrid):
    """Q4_0, 32 weights in 18 bytes: d f16 (2) | qs (16).

    Weight i < 16 is the low nibble of qs[i], weight i >= 16 the high nibble of qs[i-16];
    nibble q in 0..15, code = q - 8 in -8..7.  value = d * code, step = d.
    """

    qtype = T.Q4_0
    code_min, code_max = -8, 7

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = unpack(blocks[:, 2:18], group_len=16, bits=4).astype(np.int32) + self.code_min  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 2:18] = pack(self._stored(codes), group_len=16, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_symmetric(self, x, weights, n_levels=16)

    def dequantize_torch(self, b):
        q = _nibbles(b[:, 2:]).to(torch.int8) - 8
        return read_f16_torch(b[:, :2]) * q.float()


class Q4_1(QuantGrid):
    """Q4_1, 32 weights in 20 bytes: d f16 (2) | m f16 (2) | qs (16).

    Nibbles as in Q4_0; code = nibble in 0..15.  value = d * code + m, step = d.
    """

    qtype = T.Q4_1
    code_min, code_max = 0, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = unpack(blocks[:, 4:20], group_len=16, bits=4).astype(np.int32)  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 4:20] = pack(self._stored(codes), group_len=16, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_with_min(self, x, weights, n_levels=16, clamp=True)

    def dequantize_torch(self, b):
        return (read_f16_torch(b[:, :2]) * _nibbles(b[:, 4:]).float()) + read_f16_torch(b[:, 2:4])


class Q5_0(QuantGrid):
    """Q5_0, 32 weights in 22 bytes: d f16 (2) | qh (4) | qs (16).

    Low 4 bits as the Q4_0 nibbles in qs; bit 4 of weight i is bit i of qh read as a
    little-endian uint32 (bit i%8 of qh byte i//8). q in 0..31, code = q - 16 in -16..15.
    value = d * code, step = d.
    """

    qtype = T.Q5_0
    code_min, code_max = -16, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        high = unpack(blocks[:, 2:6], group_len=1, bits=1)  # (n_blocks, 32)
        low = unpack(blocks[:, 6:22], group_len=16, bits=4)  # (n_blocks, 32)
        codes = (low | (high << 4)).astype(np.int32) + self.code_min
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 32)
        out = blocks.copy()
        out[:, 2:6] = pack(stored >> 4, group_len=1, bits=1)
        out[:, 6:22] = pack(stored & 0x0F, group_len=16, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_symmetric(self, x, weights, n_levels=32)

    def dequantize_torch(self, b):
        q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
        return read_f16_torch(b[:, :2]) * q.float()


class Q5_1(QuantGrid):
    """Q5_1, 32 weights in 24 bytes: d f16 (2) | m f16 (2) | qh (4) | qs (16).

    Bits as in Q5_0; code = q in 0..31.  value = d * code + m, step = d.
    """

    qtype = T.Q5_1
    code_min, code_max = 0, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        high = unpack(blocks[:, 4:8], group_len=1, bits=1)  # (n_blocks, 32)
        low = unpack(blocks[:, 8:24], group_len=16, bits=4)  # (n_blocks, 32)
        codes = (low | (high << 4)).astype(np.int32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 32)
        out = blocks.copy()
        out[:, 4:8] = pack(stored >> 4, group_len=1, bits=1)
        out[:, 8:24] = pack(stored & 0x0F, group_len=16, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_with_min(self, x, weights, n_levels=32, clamp=False)

    def dequantize_torch(self, b):
        q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
        return (read_f16_torch(b[:, :2]) * q.float()) + read_f16_torch(b[:, 2:4])


class Q8_0(QuantGrid):
    """Q8_0, 32 weights in 34 bytes: d f16 (2) | qs int8 (32).

    code = qs[i] as int8 in -128..127.  value = d * code, step = d.
    """

    qtype = T.Q8_0
    code_min, code_max = -128, 127

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        codes = blocks[:, 2:34].view(np.int8).astype(np.int32)  # (n_blocks, 32)
        return codes, np.repeat(d, 32, axis=1)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 2:34] = codes.astype(np.int8).view(np.uint8)
        return out

    def quantize_blocks(self, x, weights=None):  # ggml's quantize_q8_0 ignores an importance matrix
        amax = np.abs(x).max(axis=1)  # (B,)
        d = amax / F32(127)
        inv = np.where(d != 0, F32(1) / d, F32(0))
        codes = c_int(roundf(x * inv[:, None])).astype(np.int8)  # (B, 32); C stores into int8_t
        blocks = self._zero_blocks(len(x))
        blocks[:, 0:2] = half_bytes(half(d))
        return self.encode(codes, blocks)

    def dequantize_torch(self, b):
        return b[:, 2:].contiguous().view(torch.int8).float() * read_f16_torch(b[:, :2])


# --- shared by the types above --------------------------------------------------------------


def _quantize_symmetric(grid, x, weights, n_levels):
    """Q4_0 (16 levels) and Q5_0 (32): d = -(value of largest magnitude) / (n_levels / 2); with weights, make_qx_quants."""
    if weights is not None:
        d, q = scale_search(x.T, nmax=n_levels // 2, w=_importance(grid, x, weights).T)  # (B,), stored codes (32, B)
        blocks = grid._zero_blocks(len(x))
        blocks[:, 0:2] = half_bytes(half(d))
        return grid.encode(q.T - n_levels // 2, blocks)
    d = first_absmax(x, axis=1) / F32(-(n_levels // 2))  # (B,)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    q = c_int(x * inv[:, None] + F32(n_levels // 2 + 0.5)).astype(np.int8)  # (B, 32), C's int8_t cast
    q = np.minimum(q, n_levels - 1).astype(np.uint8) & (n_levels - 1)  # stored as uint8, bits beyond the code dropped
    blocks = grid._zero_blocks(len(x))
    blocks[:, 0:2] = half_bytes(half(d))
    return grid.encode(q.astype(np.int32) - n_levels // 2, blocks)


def _quantize_with_min(grid, x, weights, n_levels, clamp):
    """Q4_1 (16 levels) and Q5_1 (32): d = (max - min) / (n_levels - 1), m = min; with weights, make_qkx3_quants.

    ggml clamps Q4_1's codes (through an int8_t) but not Q5_1's: `clamp`.
    """
    if weights is not None:
        w = _importance(grid, x, weights).T  # (32, B)
        d, neg_min, q = scale_min_search(x.T, w, n_levels - 1, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        blocks = grid._zero_blocks(len(x))
        blocks[:, 0:2] = half_bytes(half(d))
        blocks[:, 2:4] = half_bytes(half(-neg_min))
        return grid.encode(q.T, blocks)
    lo, hi = first_min(x, axis=1), first_max(x, axis=1)  # (B,)
    d = (hi - lo) / F32(n_levels - 1)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    q = c_int((x - lo[:, None]) * inv[:, None] + F32(0.5))  # (B, 32)
    if clamp:
        q = np.minimum(q.astype(np.int8), n_levels - 1)
    q = q.astype(np.uint8) & (n_levels - 1)
    blocks = grid._zero_blocks(len(x))
    blocks[:, 0:2] = half_bytes(half(d))
    blocks[:, 2:4] = half_bytes(half(lo))
    return grid.encode(q.astype(np.int32), blocks)


def _importance(grid, x, weights):
    """ggml's per-weight error weights with an importance matrix: weights[column] * sqrt(sigma2 + x²), sigma2 the
    mean of x² over the row. x: whole rows of blocks (B, 32), weights (n,) -> (B, 32). Compiled (searches.c)
    where it can be, else numpy."""
    found = compiled.importance(x, weights)
    return _importance_numpy(grid, x, weights) if found is None else found


def _importance_numpy(grid, x, weights):
    rows = x.reshape(-1, weights.size)  # (R, n)
    sigma2 = sum_in_order(np.ascontiguousarray((rows * rows).T)) / F32(weights.size)  # (R,)
    per_block = np.repeat(sigma2, weights.size // grid.block_size)[:, None]  # (B, 1)
    return grid._block_weights(x, weights) * np.sqrt(per_block + x * x)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) packed bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _high_bits(qh: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n, 4) uint8 = one little-endian uint32 -> (n, n_bits) uint8 with bit j of it at column j."""
    bits = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[:, :, None] >> bits) & 1).reshape(qh.shape[0], -1)[:, :n_bits]
