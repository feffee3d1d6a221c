"""The K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: 256-weight super-blocks of 8 or 16 sub-blocks.

Each super-block stores float16 d (and dmin) and a small integer scale (and min) per sub-block:

    Q2_K  84:  16 × (4-bit sc | 4-bit min) | 64 qs | d | dmin                value = (d·sc)·q − dmin·mn
    Q3_K 110:  32 hmask | 64 qs | 12 packed signed 6-bit scales | d          value = (d·sc)·(q − 4)
    Q4_K 144:  d | dmin | 12 packed 6-bit (scale, min) × 8 | 128 qs         value = (d·sc)·q − dmin·mn
    Q5_K 176:  d | dmin | 12 scales | 32 qh | 128 qs                         value = (d·sc)·q − dmin·mn
    Q6_K 210:  128 ql | 64 qh | 16 × int8 scale | d                          value = (d·sc)·(q − 32)

Quantizers without importance matrix (ggml's quantize_row_<type>_ref; the searches are in searches.py):

    Q2_K, Q4_K, Q5_K   per sub-block a (scale, min) fit by a grid search over candidate scales
                 (ggml's make_qkx2_quants, `scale_min_search`; weights |x| for Q2_K, rms + |x| for
                 Q4_K/Q5_K), then 4- or 6-bit sub-block scales and mins relative to the largest of each
    Q3_K         per sub-block a signed scale refined weight by weight (make_q3_quants, `scale_refine`), 6-bit scales
    Q6_K         per sub-block the best of 19 candidate scales (make_qx_quants, `scale_search`), 8-bit scales

With an importance matrix (ggml's quantize_row_<type>_impl), each weight's error counts with
w = imatrix[column] * sqrt(sigma2 + x²), sigma2 the mean of x² over the 256-weight super-block (twice
it for Q3_K, Q4_K, Q5_K); Q6_K uses imatrix[column] alone:

    Q2_K, Q4_K, Q5_K   (scale, min) by make_qkx3_quants (a finer grid of 37 candidates, squared error),
                 then the sub-block scales and mins themselves fit with weights Σw (make_qp_quants, `scale_fit`)
    Q3_K         the scale by make_qx_quants with w, then the 16 scales fit by make_qx_quants with weights Σw
    Q6_K         make_qx_quants with w instead of x²; the rest as without

In every K-quant the codes are then recomputed from the stored, rounded scales (a sub-block whose
stored scale is 0 keeps the codes of its search).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import QK_K, GGMLQuantizationType

import qpsa.gguf.quants.compiled as compiled
from qpsa.gguf.quants.common import (
    F32,
    GROUP_MAX_EPS,
    QuantGrid,
    first_absmax,
    half,
    half_bytes,
    nearest_int,
    pack,
    read_f16,
    read_f16_torch,
    running_max,
    sum_in_order,
    unpack,
)
from qpsa.gguf.quants.searches import scale_fit, scale_min_search, scale_refine, scale_search

T = GGMLQuantizationType
assert QK_K == 256  # the layouts below are written for 256-weight super-blocks


class Q2_K(QuantGrid):
    """Q2_K, 256 weights in 84 bytes: scales (16) | qs (64) | d f16 (2) | dmin f16 (2).

    16 sub-blocks of 16 weights; scales[s] holds sc (low 4 bits) and min (high 4 bits) of
    sub-block s = i // 16. Weight i = 128*h + 32*k + j is bits 2k..2k+1 of qs[32*h + j];
    code = those 2 bits in 0..3.  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = T.Q2_K
    code_min, code_max = 0, 3

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 80:82])  # (n_blocks, 1)
        sc = blocks[:, 0:16] & 0x0F  # (n_blocks, 16)
        codes = unpack(blocks[:, 16:80], group_len=32, bits=2).astype(np.int32)  # (n_blocks, 256)
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 16:80] = pack(self._stored(codes), group_len=32, bits=2)
        return out

    def quantize_blocks(self, x, weights=None):
        """16 sub-blocks of 16; (scale, min) fit with |x| weights, absolute error; 4-bit scales and mins.
        With weights: make_qkx3_quants with w = weights * sqrt(mean x² + x²), scales and mins by make_qp_quants."""
        n_blocks = len(x)
        xs = _sub_blocks(x, 16)  # (16, S)
        if weights is None:
            scale, mins, codes = scale_min_search(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
            scale, mins = scale.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
            max_scale, max_min = running_max(scale), running_max(mins)  # (B,)
            ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scale), 0)
            lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), 0)
            d, dmin = max_scale / F32(15), max_min / F32(15)
        else:
            w = _sub_blocks(self._block_weights(x, weights) * np.sqrt(_sigma2(x, 1) + x * x), 16)  # (16, S)
            scale, mins, codes = scale_min_search(xs, w, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
            sw = _per_block(sum_in_order(w), n_blocks)  # (16, B)
            d, ls = scale_fit(_per_block(scale, n_blocks), sw, 15)
            dmin, lm = scale_fit(_per_block(mins, n_blocks), sw, 15)
            ls, lm = ls.T.astype(np.int32), lm.T.astype(np.int32)  # (B, 16)
        sc = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # (B, 16): scale low nibble, min high nibble
        d, dmin = half(d), half(dmin)
        d_sub = d.astype(F32)[:, None] * (sc & 0x0F).astype(F32)
        m_sub = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
        codes = _requantize(x.reshape(n_blocks, 16, 16), codes, 0, d_sub, m_sub, 0, 3)
        blocks = self._zero_blocks(n_blocks)
        blocks[:, 0:16] = sc
        blocks[:, 80:82] = half_bytes(d)
        blocks[:, 82:84] = half_bytes(dmin)
        return self.encode(codes, blocks)

    def dequantize_torch(self, b):
        n = b.shape[0]
        sc = b[:, 0:16]
        dl = (read_f16_torch(b[:, 80:82]) * (sc & 0x0F).float()).view(n, 16, 1)
        ml = (read_f16_torch(b[:, 82:84]) * (sc >> 4).float()).view(n, 16, 1)
        q = _two_bit_fields(b[:, 16:80]).view(n, 16, 16).float()
        return (dl * q - ml).view(n, -1)


class Q3_K(QuantGrid):
    """Q3_K, 256 weights in 110 bytes: hmask (32) | qs (64) | scales (12) | d f16 (2).

    Low 2 bits of weight i = 128*h + 32*k + j: bits 2k..2k+1 of qs[32*h + j] (as Q2_K);
    high bit of weight i = 32*b + j: bit b of hmask[j]. u = low | high << 2 in 0..7, and
    code = u - 4 in -4..3 (gguf: low - 4 when the hmask bit is 0, low when it is 1).
    16 sub-blocks of 16 weights with signed 6-bit scales sc = raw - 32 in -32..31; raw scale s
    has its low 4 bits in scales[s] (s < 8, low nibble) or scales[s-8] (high nibble), its
    high 2 bits at bits 2*(s//4) of scales[8 + s%4].
    value = d*sc * code, step = d*sc (negative when sc < 0).
    """

    qtype = T.Q3_K
    code_min, code_max = -4, 3

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 108:110])  # (n_blocks, 1)
        scale_low = unpack(blocks[:, 96:104], group_len=8, bits=4)  # (n_blocks, 16)
        scale_high = unpack(blocks[:, 104:108], group_len=4, bits=2)  # (n_blocks, 16)
        sc = (scale_low | (scale_high << 4)).astype(np.int8) - np.int8(32)  # (n_blocks, 16), -32..31
        low = unpack(blocks[:, 32:96], group_len=32, bits=2)  # (n_blocks, 256)
        high = unpack(blocks[:, 0:32], group_len=32, bits=1)  # (n_blocks, 256)
        codes = (low | (high << 2)).astype(np.int32) + self.code_min
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 0:32] = pack(stored >> 2, group_len=32, bits=1)
        out[:, 32:96] = pack(stored & 0x03, group_len=32, bits=2)
        return out

    def quantize_blocks(self, x, weights=None):
        """16 sub-blocks of 16; signed scale refined per weight; 6-bit signed scales relative to the largest.
        With weights: make_qx_quants with w = weights * sqrt(2 mean x² + x²), the scales by make_qx_quants too."""
        n_blocks = len(x)
        if weights is None:
            scale, codes = scale_refine(_sub_blocks(x, 16), nmax=4)
            scale = scale.reshape(n_blocks, 16)
            peak = first_absmax(np.where(np.isnan(scale), F32(0), scale), axis=1)  # (B,) NaN never wins in ggml's loop
            peak = np.where(np.abs(peak) > 0, peak, F32(0))
            has_scale = peak != 0
            iscale = np.where(has_scale, F32(-32) / peak, F32(0))
            raw = nearest_int(iscale[:, None] * scale).astype(np.int8)  # (B, 16), C keeps it in an int8_t
            raw = np.where(has_scale[:, None], np.clip(raw, -32, 31) + 32, 0).astype(np.uint8)  # 0..63, all 0 when no scale
            d = half(np.where(has_scale, F32(1) / iscale, F32(0)))
        else:
            xs = _sub_blocks(x, 16)  # (16, S)
            w = _sub_blocks(self._block_weights(x, weights) * np.sqrt(_sigma2(x, 2) + x * x), 16)
            scale, codes = scale_search(xs, nmax=4, w=w)
            d, raw = scale_search(_per_block(scale, n_blocks), nmax=32, w=_per_block(sum_in_order(w), n_blocks))
            raw, d = raw.T.astype(np.uint8), half(d)  # (B, 16) stored scales 0..63 (0 for an all-zero block)
        d_sub = d.astype(F32)[:, None] * (raw.astype(np.int32) - 32).astype(F32)
        codes = _requantize(x.reshape(n_blocks, 16, 16), codes, -4, d_sub, None, -4, 3)
        blocks = self._zero_blocks(n_blocks)
        blocks[:, 96:104] = pack(raw & 0x0F, group_len=8, bits=4)  # scale layout: see the class docstring
        blocks[:, 104:108] = pack(raw >> 4, group_len=4, bits=2)
        blocks[:, 108:110] = half_bytes(d)
        return self.encode(codes, blocks)

    def dequantize_torch(self, b):
        n = b.shape[0]
        low = b[:, 96:104].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 2, 1)
        high = b[:, 104:108].reshape(n, 1, 4) >> _SHIFTS_2BIT.to(b.device).view(1, 4, 1)
        raw = (low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 0x03) << 4)  # 6-bit scales, 0..63
        dl = (read_f16_torch(b[:, 108:110]) * (raw.to(torch.int8) - 32).float()).view(n, 16, 1)
        hbits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
        high_bit = ((b[:, 0:32].reshape(n, 1, 32) >> hbits) & 1).reshape(n, 256)  # bit j of hmask: weights 32j..32j+31
        q = _two_bit_fields(b[:, 32:96]).to(torch.int8) - ((high_bit ^ 1) << 2).to(torch.int8)  # -4..3
        return (dl * q.view(n, 16, 16).float()).view(n, -1)


class Q4_K(QuantGrid):
    """Q4_K, 256 weights in 144 bytes: d f16 (2) | dmin f16 (2) | scales (12) | qs (128).

    Weight i = 64*c + 32*k + j is nibble k (0 low, 1 high) of qs[32*c + j]; code in 0..15.
    8 sub-blocks of 32 weights (s = i // 32) with 6-bit sc and min packed in the 12 scale bytes
    (see `_k_scales_mins`).  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = T.Q4_K
    code_min, code_max = 0, 15

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        sc, _ = _k_scales_mins(blocks[:, 4:16])  # (n_blocks, 8)
        codes = unpack(blocks[:, 16:144], group_len=32, bits=4).astype(np.int32)  # (n_blocks, 256)
        return codes, _sub_block_steps(d, sc, 32)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        codes = self._codes(codes, blocks)
        out = blocks.copy()
        out[:, 16:144] = pack(self._stored(codes), group_len=32, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_k_scale_min(self, x, weights, nmax=15, rmin=-1.0, nstep=20)

    def dequantize_torch(self, b):
        n = b.shape[0]
        qs = b[:, 16:].reshape(n, 4, 32)  # 4 chunks of 32 bytes, each two sub-blocks (low, high nibbles)
        q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32).float()
        return _k_values(b, q, 8)


class Q5_K(QuantGrid):
    """Q5_K, 256 weights in 176 bytes: d f16 (2) | dmin f16 (2) | scales (12) | qh (32) | qs (128).

    Low 4 bits as the Q4_K nibbles in qs; bit 4 of weight i = 32*b + j is bit b of qh[j].
    code in 0..31; scales and mins as Q4_K.  value = d*sc * code - dmin*min, step = d*sc.
    """

    qtype = T.Q5_K
    code_min, code_max = 0, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 0:2])  # (n_blocks, 1)
        sc, _ = _k_scales_mins(blocks[:, 4:16])  # (n_blocks, 8)
        high = unpack(blocks[:, 16:48], group_len=32, bits=1)  # (n_blocks, 256)
        low = unpack(blocks[:, 48:176], group_len=32, bits=4)  # (n_blocks, 256)
        codes = (low | (high << 4)).astype(np.int32)
        return codes, _sub_block_steps(d, sc, 32)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 16:48] = pack(stored >> 4, group_len=32, bits=1)
        out[:, 48:176] = pack(stored & 0x0F, group_len=32, bits=4)
        return out

    def quantize_blocks(self, x, weights=None):
        return _quantize_k_scale_min(self, x, weights, nmax=31, rmin=-0.5, nstep=15)

    def dequantize_torch(self, b):
        n = b.shape[0]
        qh = b[:, 16:48]  # (n, 32): bit i of byte l is the high bit of element l of sub-block i
        qs = b[:, 48:].reshape(n, 4, 32)
        ql = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
        bits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
        q = (ql | (((qh[:, None, :] >> bits) & 1) << 4)).float()
        return _k_values(b, q, 8)


class Q6_K(QuantGrid):
    """Q6_K, 256 weights in 210 bytes: ql (128) | qh (64) | scales int8 (16) | d f16 (2).

    Low 4 bits of weight i = 128*h + 64*k + j (j < 64): nibble k of ql[64*h + j];
    high 2 bits of weight i = 128*h + 32*k + j (j < 32): bits 2k..2k+1 of qh[32*h + j].
    q in 0..63, code = q - 32 in -32..31. 16 sub-blocks of 16 weights with signed int8 sc.
    value = d*sc * code, step = d*sc (negative when sc < 0).
    """

    qtype = T.Q6_K
    code_min, code_max = -32, 31

    def decode(self, blocks):
        blocks = self._blocks(blocks)
        d = read_f16(blocks[:, 208:210])  # (n_blocks, 1)
        sc = blocks[:, 192:208].view(np.int8)  # (n_blocks, 16)
        low = unpack(blocks[:, 0:128], group_len=64, bits=4)  # (n_blocks, 256)
        high = unpack(blocks[:, 128:192], group_len=32, bits=2)  # (n_blocks, 256)
        codes = (low | (high << 4)).astype(np.int32) + self.code_min
        return codes, _sub_block_steps(d, sc, 16)

    def encode(self, codes, blocks):
        blocks = self._blocks(blocks)
        stored = self._stored(self._codes(codes, blocks))  # (n_blocks, 256)
        out = blocks.copy()
        out[:, 0:128] = pack(stored & 0x0F, group_len=64, bits=4)
        out[:, 128:192] = pack(stored >> 4, group_len=32, bits=2)
        return out

    def quantize_blocks(self, x, weights=None):
        """16 sub-blocks of 16; best of 19 candidate scales each (weights x², or the given weights); int8 scales
        relative to the largest."""
        n_blocks = len(x)
        w = None if weights is None else _sub_blocks(self._block_weights(x, weights), 16)
        scale, codes = scale_search(_sub_blocks(x, 16), nmax=32, w=w)
        scale = scale.reshape(n_blocks, 16)
        peak = first_absmax(np.where(np.isnan(scale), F32(0), scale), axis=1)  # (B,)
        zero_block = ~(np.abs(peak) >= GROUP_MAX_EPS)  # ggml writes an all-zero block
        iscale = F32(-128) / peak
        sc = np.minimum(nearest_int(iscale[:, None] * scale), 127).astype(np.int8)  # (B, 16), C's int8_t
        d = half(F32(1) / iscale)
        d_sub = d.astype(F32)[:, None] * sc.astype(F32)
        codes = _requantize(x.reshape(n_blocks, 16, 16), codes, -32, d_sub, None, -32, 31)
        codes[zero_block] = -32  # stored 0
        sc[zero_block] = 0
        d[zero_block] = 0
        blocks = self._zero_blocks(n_blocks)
        blocks[:, 192:208] = sc.view(np.uint8)
        blocks[:, 208:210] = half_bytes(d)
        return self.encode(codes, blocks)

    def dequantize_torch(self, b):
        n = b.shape[0]
        ql = b[:, :128].reshape(n, 2, 1, 64)
        ql = (ql >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)) & 0x0F  # (n, 2, 2, 64)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)) & 0x03  # (n, 2, 4, 32)
        q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
        scales = b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
        d = (read_f16_torch(b[:, 208:210]) * scales).view(n, 16, 1)
        return (d * q.view(n, 16, 16).float()).view(n, -1)


# --- the Q4_K/Q5_K scale bytes, and sub-block steps -------------------------------------------


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K -> 6-bit sub-block scales and mins, each uint8 (n, 8).

    byte 0-3:  top 2 bits of scale 4-7 | scale 0-3 (6 bits)
    byte 4-7:  top 2 bits of min 4-7   | min 0-3 (6 bits)
    byte 8-11: low 4 bits of min 4-7   | low 4 bits of scale 4-7
    """
    n = scales.shape[0]
    scales = scales.reshape(n, 3, 4)
    s_bytes, m_bytes, low_bytes = scales[:, 0], scales[:, 1], scales[:, 2]  # each (n, 4)
    sc = np.concatenate([s_bytes & 0x3F, (low_bytes & 0x0F) | ((s_bytes >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m_bytes & 0x3F, (low_bytes >> 4) | ((m_bytes >> 2) & 0x30)], axis=1)
    return sc, mins


def _k_scales_mins_torch(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch: Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


_SHIFTS_2BIT = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _two_bit_fields(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K's low bits: (n, 64) bytes -> (n, 256) values 0..3; weight 128h + 32k + j is bits 2k..2k+1 of byte 32h + j."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _SHIFTS_2BIT.to(qs.device).view(1, 1, 4, 1)) & 0x03).reshape(n, 256)


def _k_values(b, q, n_sub):
    """(d·sc)·q − dmin·mn for Q4_K/Q5_K, with q (n, 8, 32) float."""
    n = b.shape[0]
    sc, mn = _k_scales_mins_torch(b[:, 4:16])
    d = (read_f16_torch(b[:, :2]) * sc.float()).view(n, n_sub, 1)
    dm = (read_f16_torch(b[:, 2:4]) * mn.float()).view(n, n_sub, 1)
    return (d * q - dm).view(n, -1)


def _sub_block_steps(d: np.ndarray, sc: np.ndarray, sub_block_len: int) -> np.ndarray:
    """step of every weight: d (n, 1) * sub-block scale sc (n, n_sub), repeated over each sub-block -> float32 (n, n_sub * sub_block_len)."""
    with np.errstate(invalid="ignore"):  # inf/nan d times a zero scale in a corrupt block: NaN step, no warning
        return np.repeat(d * sc.astype(np.float32), sub_block_len, axis=1)


# --- the quantizers' shared steps (arrays are (n, S): weight j of every sub-block in row j) ----


def _quantize_k_scale_min(grid, x, weights, nmax, rmin, nstep):
    """Q4_K (nmax 15) and Q5_K (31): 8 sub-blocks of 32; 6-bit scales and mins.

    Without weights: (scale, min) fit with rms + |x| weights (make_qkx2_quants), scales and mins relative
    to the largest of each. With weights: w = weights * sqrt(2 mean x² + x²) and make_qkx3_quants, then
    the scales and mins fit by make_qp_quants with weights Σw (Q5_K clamps them at 63, Q4_K does not).
    """
    n_blocks = len(x)
    xs = _sub_blocks(x, 32)  # (32, S)
    if weights is None:
        rms = np.sqrt(sum_in_order(xs * xs) / F32(32))  # (S,)
        scale, mins, codes = scale_min_search(xs, rms + np.abs(xs), nmax, rmin, 0.1, nstep, use_mad=False)
        scale, mins = scale.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
        max_scale, max_min = running_max(scale), running_max(mins)  # (B,)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scale) & 0xFF, 63).astype(np.uint8)  # (B, 8), C's uint8_t
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d, dmin = half(max_scale / F32(63)), half(max_min / F32(63))
    else:
        w = _sub_blocks(grid._block_weights(x, weights) * np.sqrt(_sigma2(x, 2) + x * x), 32)
        scale, mins, codes = scale_min_search(xs, w, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        sw = _per_block(sum_in_order(w), n_blocks)  # (8, B)
        d, ls = scale_fit(_per_block(scale, n_blocks), sw, 63)
        dmin, lm = scale_fit(_per_block(mins, n_blocks), sw, 63)
        ls, lm, d, dmin = ls.T.copy(), lm.T.copy(), half(d), half(dmin)  # (B, 8) uint8
        if nmax == 31:
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    # 12 scale bytes (inverse of _k_scales_mins): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scale)
    # and 4-7 (min); sub-blocks 4-7 as low nibbles in bytes 8-11 and top 2 bits in bits 6-7 of bytes 0-7
    scale_bytes = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                                  (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], axis=1)  # (B, 12)
    sc, mn = _k_scales_mins(scale_bytes)  # read back as ggml does (a code above 63 loses its top bits)
    d_sub = d.astype(F32)[:, None] * sc.astype(F32)
    m_sub = dmin.astype(F32)[:, None] * mn.astype(F32)
    codes = _requantize(x.reshape(n_blocks, 8, 32), codes, 0, d_sub, m_sub, 0, nmax)
    blocks = grid._zero_blocks(n_blocks)
    blocks[:, 0:2] = half_bytes(d)
    blocks[:, 2:4] = half_bytes(dmin)
    blocks[:, 4:16] = scale_bytes
    return grid.encode(codes, blocks)


def _sigma2(x, factor):
    """factor · Σx² / 256 of each 256-weight block (ggml's sigma2), in ggml's order: (B, 256) -> (B, 1)."""
    return (F32(factor) * sum_in_order(_sub_blocks(x * x, 256)) / F32(256))[:, None]


def _per_block(values, n_blocks):
    """(S,) values of the sub-blocks -> (n_sub, B): sub-block j of block b at [j, b], for the searches over scales."""
    return np.ascontiguousarray(values.reshape(n_blocks, -1).T)


def _sub_blocks(x, sub_len):
    """(B, 256) -> (sub_len, B * 256 // sub_len): column s is sub-block s (block s // n_sub). A transposed
    view where the compiled searches run (they read any strides), a contiguous copy for numpy's."""
    view = x.reshape(-1, sub_len).T
    return view if compiled.library() is not None else np.ascontiguousarray(view)


def _from_sub_blocks(codes, n_blocks):
    """Inverse of `_sub_blocks`: (sub_len, S) -> (B, n_sub, sub_len)."""
    return codes.T.reshape(n_blocks, -1, codes.shape[0])


def _requantize(x, codes, shift, d_sub, offset, lowest, highest):
    """Codes recomputed from the stored scales: nearest_int((x + offset) / d_sub), clamped; sub-blocks with
    d_sub == 0 keep the codes of the search, plus `shift`. x (B, n_sub, sub_len); codes (sub_len, S) as the
    search returned them; d_sub, offset (B, n_sub) or None. Compiled (searches.c) where it can be, else numpy."""
    found = compiled.requantize(x, codes, shift, d_sub, offset, lowest, highest)
    return _requantize_numpy(x, codes, shift, d_sub, offset, lowest, highest) if found is None else found


def _requantize_numpy(x, codes, shift, d_sub, offset, lowest, highest):
    codes = _from_sub_blocks(codes + shift, x.shape[0])  # (B, n_sub, sub_len)
    shifted = x if offset is None else x + offset[..., None]
    fresh = np.clip(nearest_int(shifted / d_sub[..., None]), lowest, highest)
    return np.where((d_sub != 0)[..., None], fresh, codes).reshape(x.shape[0], -1)
