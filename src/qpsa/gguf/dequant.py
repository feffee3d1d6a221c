"""Fast dequantization in PyTorch, equal bit for bit to the `gguf` package's numpy dequantizers.

The `gguf` package is the reference (`gguf.quants.dequantize`); its numpy code spends most of a
model load on the largest tensors (9 s for Gemma 3's Q8_0 embedding here). These functions do the
same float32 arithmetic, in the same order, as whole-tensor torch operations, so the values are
identical (tests compare every tensor of both bundled models). Types without a function here fall
back to the `gguf` package.

Block layouts (bytes; d, m, dmin are float16; "qs" packs two 4-bit codes per byte, low nibbles
first for the first half of the block):

    Q8_0  34:  d | 32 × int8 q                         value = q·d
    Q4_0  18:  d | 16 qs                               value = (q − 8)·d
    Q4_1  20:  d | m | 16 qs                           value = d·q + m
    Q5_0  22:  d | qh (32 high bits) | 16 qs           value = (q − 16)·d
    Q5_1  24:  d | m | qh | 16 qs                      value = d·q + m
    Q4_K 144:  d | dmin | 12 packed 6-bit (scale, min) × 8 | 128 qs        value = (d·sc)·q − dmin·mn
    Q5_K 176:  d | dmin | 12 scales | 32 qh | 128 qs                        value = (d·sc)·q − dmin·mn
    Q6_K 210:  128 ql | 64 qh | 16 × int8 scale | d                         value = (d·sc)·(q − 32)
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from the raw bytes of one tensor."""
    if qtype == Q.F32:
        return torch.from_numpy(np.array(raw).view(np.float32).reshape(shape))
    if qtype == Q.F16:
        return torch.from_numpy(np.array(raw).view(np.float16)).float().reshape(shape)
    if qtype == Q.BF16:
        return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16).float().reshape(shape)
    fn = _FUNCTIONS.get(qtype)
    if fn is None:
        return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype), dtype=np.float32).reshape(shape))
    blocks = torch.from_numpy(np.array(raw)).view(-1, GGML_QUANT_SIZES[qtype][1])  # (n_blocks, type_size)
    return fn(blocks).reshape(shape)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) packed bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _high_bits(qh: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n, 4) uint8 = one little-endian uint32 -> (n, n_bits) uint8 with bit j of it at column j."""
    bits = torch.arange(8, dtype=torch.uint8)
    return ((qh[:, :, None] >> bits) & 1).reshape(qh.shape[0], -1)[:, :n_bits]


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b):
    return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).float()) + _f16(b[:, 2:4])


def _q5_0(b):
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
    return (_f16(b[:, :2]) * q.float()) + _f16(b[:, 2:4])


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_values(b, q, n_sub):
    """(d·sc)·q − dmin·mn for Q4_K/Q5_K, with q (n, 8, 32) float."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, n_sub, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).view(n, n_sub, 1)
    return (d * q - dm).view(n, -1)


def _q4_k(b):
    n = b.shape[0]
    qs = b[:, 16:].reshape(n, 4, 32)  # 4 chunks of 32 bytes, each two sub-blocks (low, high nibbles)
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32).float()
    return _k_values(b, q, 8)


def _q5_k(b):
    n = b.shape[0]
    qh = b[:, 16:48]  # (n, 32): bit i of byte l is the high bit of element l of sub-block i
    qs = b[:, 48:].reshape(n, 4, 32)
    ql = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    q = (ql | (((qh[:, None, :] >> bits) & 1) << 4)).float()
    return _k_values(b, q, 8)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = (ql >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 0x0F  # (n, 2, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 0x03  # (n, 2, 4, 32)
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    return (d * q.view(n, 16, 16).float()).view(n, -1)


_FUNCTIONS = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
