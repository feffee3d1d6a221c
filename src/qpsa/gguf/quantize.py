"""GGML quantizers in numpy: float32 weights -> raw GGML blocks, as llama.cpp writes them.

    blocks = quantize(values, GGMLQuantizationType.Q4_K)   # float32 (..., n) -> uint8 (..., n // 256 * 144)

Each type follows the reference quantizer that llama-quantize runs on a tensor without an
importance matrix (ggml_quantize_chunk -> quantize_<type>(..., quant_weights=NULL), which calls
quantize_row_<type>_ref in ggml-quants.c; Q8_0 always does), rewritten as whole-array numpy:

    Q8_0         d = amax / 127, code = round-half-away-from-zero(x / d)
    Q4_0, Q5_0   d = (the signed value of largest magnitude) / -8 or -16,
                 stored q = min(trunc(x / d + 8.5 or 16.5), 15 or 31)
    Q4_1, Q5_1   d = (max - min) / 15 or 31, m = min, q = trunc((x - min) / d + 0.5) (Q4_1: at most 15)
    Q2_K, Q4_K, Q5_K   per sub-block a (scale, min) fit by a grid search over candidate scales
                 (ggml's make_qkx2_quants; weights |x| for Q2_K, rms + |x| for Q4_K/Q5_K), then 4- or
                 6-bit sub-block scales and mins relative to the largest of each
    Q3_K         per sub-block a signed scale refined weight by weight (make_q3_quants), 6-bit scales
    Q6_K         per sub-block the best of 19 candidate scales (make_qx_quants), 8-bit scales
    F16, BF16    round to nearest even (BF16 as ggml's fp32 -> bf16: no flush of subnormals)

In every K-quant the codes are then recomputed from the stored, rounded scales (a sub-block whose
stored scale is 0 keeps the codes of its search).

The arithmetic is float32 in ggml's order, so the bytes are the same as ggml's: sums that C
accumulates one term at a time are accumulated one term at a time here (numpy's own sum pairs
terms up and rounds differently); nearest_int is ggml's add-1.5*2**23 trick (round half to even);
C's float -> integer conversions are truncations that give INT_MIN for NaN and out-of-range values,
as on x86. Scales go to float16 with numpy's round-to-nearest-even, as ggml's conversion does.
tests/test_quantize.py compares every type with ggml's own quantizer byte for byte.

Blocks are independent, so a tensor is processed in chunks of 2**18 weights, which keeps the
temporaries to tens of MB and mostly in cache (2.5x faster than chunks of 2**20). Codes are written with `qpsa.gguf.quants`' grids, which
hold each format's bit layout.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qpsa.errors import QpsaError
from qpsa.gguf.quants import GRIDS, _pack

__all__ = ["QUANTIZE_TYPES", "quantize"]

T = GGMLQuantizationType
F32 = np.float32

QUANTIZE_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)

_CHUNK_WEIGHTS = 1 << 18  # weights per pass: the K-quants hold ~30 float32 copies of a chunk; 1 MiB arrays stay in cache
_GROUP_MAX_EPS = F32(1e-15)  # ggml: a sub-block whose largest magnitude is below this is all zero


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """GGML blocks of `values` in `qtype`: float32 (..., n) -> uint8 (..., n // block_size * type_size).

    Rows run along the last axis; n must be a multiple of the type's block size (32; 256 for the
    K-quants; 1 for F32/F16/BF16). Other float dtypes are converted to float32 first. Raises
    QpsaError for an unsupported type, a row length that does not fit the blocks, or a value that is
    NaN or infinite.
    """
    qtype = _qtype(qtype)
    values = np.asarray(values)
    if values.dtype.kind not in "fiu":
        raise QpsaError(f"{qtype.name}: cannot quantize an array of {values.dtype}")
    values = values.astype(F32, copy=False)
    if values.ndim == 0:
        raise QpsaError(f"{qtype.name}: cannot quantize a scalar; give rows (..., n)")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = values.shape[-1]
    if n % block_size:
        raise QpsaError(f"{qtype.name}: row length {n} is not a multiple of the block size {block_size}")
    blocks_in = values.reshape(-1, block_size)  # (n_blocks, block_size)
    out = np.empty((blocks_in.shape[0], type_size), dtype=np.uint8)
    quantize_blocks = _QUANTIZERS[qtype]
    step = max(1, _CHUNK_WEIGHTS // block_size)
    with np.errstate(all="ignore"):  # inf/NaN in dead branches, fp16 overflow: ggml's results, no warnings
        for start in range(0, blocks_in.shape[0], step):
            chunk = np.ascontiguousarray(blocks_in[start : start + step])
            if not np.isfinite(chunk).all():
                bad = start * block_size + int(np.argmin(np.isfinite(chunk).reshape(-1)))
                raise QpsaError(f"{qtype.name}: cannot quantize a non-finite value ({values.reshape(-1)[bad]} at flat index {bad})")
            out[start : start + step] = quantize_blocks(chunk)
    return out.reshape(*values.shape[:-1], n // block_size * type_size)


def _qtype(qtype) -> GGMLQuantizationType:
    supported = ", ".join(t.name for t in QUANTIZE_TYPES)
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise QpsaError(f"unknown GGML tensor type {qtype!r} (q-psa quantizes to: {supported})") from None
    if qtype not in QUANTIZE_TYPES:
        raise QpsaError(f"q-psa cannot quantize to {qtype.name} (it quantizes to: {supported})")
    return qtype


# --- float32 arithmetic as ggml's C does it -----------------------------------------------


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the integer off the mantissa bits.

    Rounds half to even for |v| < 2**22; beyond that (and for inf/NaN) it returns the same
    wrapped-around numbers that ggml's does, which its callers then clamp. float32 -> int32.
    """
    bits = (v.astype(F32, copy=False) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _c_int(v: np.ndarray) -> np.ndarray:
    """C's (int) of a float32 on x86: truncation toward zero, INT_MIN for NaN and out-of-range values."""
    ok = np.abs(v) < F32(2**31)  # False for NaN
    return np.where(ok, np.trunc(np.where(ok, v, F32(0))), F32(-(2**31))).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint rounds them to even). float32 -> float32."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= F32(0.5)), v).astype(F32)  # a - whole is exact


def _sum_in_order(terms: np.ndarray, from_first: bool = False) -> np.ndarray:
    """Sum over axis 0 one term at a time in float32, as the C loop `s += t[i]` does.

    C starts from s = 0 (so -0.0 terms sum to +0.0) unless it initializes s with the first term.
    terms (n, ...) -> (...).
    """
    total = terms[0].copy() if from_first else terms[0] + F32(0)
    for term in terms[1:]:
        total += term
    return total


def _half(v: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even, overflow to inf (ggml's GGML_FP32_TO_FP16)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def _half_bytes(h: np.ndarray) -> np.ndarray:
    """float16 (n,) -> its little-endian bytes, uint8 (n, 2)."""
    return np.ascontiguousarray(h, dtype="<f2").view(np.uint8).reshape(-1, 2)


def _first_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The signed value of largest magnitude along `axis`, the first one on ties, +0.0 if all are zero
    (ggml's `if (fabsf(v) > amax)` loop from amax = max = 0)."""
    peak = _take(x, np.abs(x).argmax(axis=axis), axis)
    return np.where(peak != 0, peak, F32(0))


def _first_min(x: np.ndarray, axis: int) -> np.ndarray:
    """The minimum along `axis`, the first one on ties (which decides the sign of a zero), as `if (v < min)` keeps it."""
    return _take(x, x.argmin(axis=axis), axis)


def _first_max(x: np.ndarray, axis: int) -> np.ndarray:
    return _take(x, x.argmax(axis=axis), axis)


def _take(x, idx, axis):
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis=axis).squeeze(axis)


def _running_max(v: np.ndarray) -> np.ndarray:
    """max(0, v...) along axis 1 as ggml's `if (v > m) m = v` from m = 0: +0.0 unless some v > 0; NaN never wins."""
    m = np.where(np.isnan(v), F32(0), v).max(axis=1)
    return np.where(m > 0, m, F32(0))


def _blocks(n_blocks: int, qtype: GGMLQuantizationType) -> np.ndarray:
    return np.zeros((n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)


# --- floats -------------------------------------------------------------------------------


def _f32(x):
    return x.view(np.uint8)


def _f16(x):
    return _half(x).view(np.uint8)


def _bf16(x):
    """Round to nearest even on the top 16 bits (finite input; ggml keeps subnormals)."""
    bits = x.view(np.uint32)  # (n, 1)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16).view(np.uint8)


# --- the 32-weight formats ----------------------------------------------------------------


def _q8_0(x):
    amax = np.abs(x).max(axis=1)  # (B,)
    d = amax / F32(127)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    codes = _c_int(_roundf(x * inv[:, None])).astype(np.int8)  # (B, 32); C stores into int8_t
    blocks = _blocks(len(x), T.Q8_0)
    blocks[:, 0:2] = _half_bytes(_half(d))
    return GRIDS[T.Q8_0].encode(codes, blocks)


def _symmetric(x, qtype, n_levels):
    """Q4_0 (16 levels) and Q5_0 (32): d = -(value of largest magnitude) / (n_levels / 2)."""
    d = _first_absmax(x, axis=1) / F32(-(n_levels // 2))  # (B,)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    q = _c_int(x * inv[:, None] + F32(n_levels // 2 + 0.5)).astype(np.int8)  # (B, 32), C's int8_t cast
    q = np.minimum(q, n_levels - 1).astype(np.uint8) & (n_levels - 1)  # stored as uint8, bits beyond the code dropped
    blocks = _blocks(len(x), qtype)
    blocks[:, 0:2] = _half_bytes(_half(d))
    return GRIDS[qtype].encode(q.astype(np.int32) - n_levels // 2, blocks)


def _with_min(x, qtype, n_levels):
    """Q4_1 (16 levels) and Q5_1 (32): d = (max - min) / (n_levels - 1), m = min."""
    lo, hi = _first_min(x, axis=1), _first_max(x, axis=1)  # (B,)
    d = (hi - lo) / F32(n_levels - 1)
    inv = np.where(d != 0, F32(1) / d, F32(0))
    q = _c_int((x - lo[:, None]) * inv[:, None] + F32(0.5))  # (B, 32)
    if qtype == T.Q4_1:  # ggml clamps Q4_1's codes (through an int8_t) but not Q5_1's
        q = np.minimum(q.astype(np.int8), n_levels - 1)
    q = q.astype(np.uint8) & (n_levels - 1)
    blocks = _blocks(len(x), qtype)
    blocks[:, 0:2] = _half_bytes(_half(d))
    blocks[:, 2:4] = _half_bytes(_half(lo))
    return GRIDS[qtype].encode(q.astype(np.int32), blocks)


# --- per-sub-block scale searches (arrays are (n, S): weight j of every sub-block in row j) ---


def _scale_min_search(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx2_quants: per sub-block, value ≈ scale * code - min with codes 0..nmax.

    Start from the (min(x, 0), max) range, then try nstep + 1 wider or narrower grids
    (nmax + rmin + rdelta * k steps across the range); for each, fit scale and min to its codes by
    weighted least squares (min clamped at 0) and keep it if the weighted error (absolute when
    use_mad, else squared) is smaller. The range is re-centred on the best min as the search goes.
    x, w: float32 (n, S) -> scale (S,), min (S,) (as a positive number to subtract), codes int32 (n, S).
    """
    hi = _first_max(x, axis=0)  # (S,)
    lo = _first_min(x, axis=0)
    lo = np.where(lo > 0, F32(0), lo)
    flat = hi == lo  # constant non-positive sub-block: ggml stores codes 0, scale 0
    flat_min = -lo
    sum_w = _sum_in_order(w, from_first=True)
    sum_x = _sum_in_order(w * x, from_first=True)

    def error(scale, lo, codes_f):
        diff = scale * codes_f + lo - x  # (n, S)
        return _sum_in_order(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    codes = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
    best = error(scale, lo, codes.astype(F32))
    for k in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / (hi - lo)
        trial = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
        trial_f = trial.astype(F32)
        wl = w * trial_f
        sum_l, sum_l2, sum_xl = _sum_in_order(wl), _sum_in_order(wl * trial_f), _sum_in_order(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        this_error = error(this_scale, this_min, trial_f)
        better = (det > 0) & (this_error < best)
        best = np.where(better, this_error, best)
        codes = np.where(better, trial, codes)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, F32(0), scale), np.where(flat, flat_min, -lo), np.where(flat, 0, codes)


def _scale_search(x, nmax):
    """ggml's make_qx_quants with x² weights: value ≈ scale * code, codes -nmax..nmax-1.

    Try iscale = -(nmax + 0.1 k) / (value of largest magnitude) for k = 0, -9..9 and keep the one whose
    least-squares scale explains most of the x²-weighted energy. An all-zero sub-block gets scale 0 and
    stored codes 0. x: float32 (n, S) -> scale (S,), stored codes (code + nmax) int32 (n, S).
    """
    peak = _first_absmax(x, axis=0)  # (S,)
    zero = np.abs(peak) < _GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def trial(iscale):
        codes = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S)
        codes_f = codes.astype(F32)
        return codes, _sum_in_order(wx * codes_f), _sum_in_order(w * codes_f * codes_f)

    codes, sumlx, suml2 = trial(F32(-nmax) / peak)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for k in (*range(-9, 0), *range(1, 10)):
        t_codes, t_sumlx, t_suml2 = trial(-(F32(nmax) + F32(0.1) * F32(k)) / peak)
        better = (t_suml2 > 0) & (t_sumlx * t_sumlx > best * t_suml2)
        codes = np.where(better, t_codes, codes)
        scale = np.where(better, t_sumlx / t_suml2, scale)
        best = np.where(better, scale * t_sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, codes + nmax)


def _scale_refine(x, nmax):
    """ggml's make_q3_quants with rmse: value ≈ scale * code, codes -nmax..nmax-1, x² weights.

    Start from codes on the grid through the value of largest magnitude, then up to 5 passes over the
    weights in order: move a weight to the code nearest its value under the least-squares scale of
    the others, if that raises the explained energy. The pass over weights is sequential (each move
    changes the sums the next one sees), so the loop runs over the n weights, vectorized over
    sub-blocks. x: float32 (n, S) -> scale (S,), stored codes (code + nmax) int32 (n, S).
    """
    n = x.shape[0]
    peak = _first_absmax(x, axis=0)  # (S,)
    zero = np.abs(peak) < _GROUP_MAX_EPS
    codes = np.clip(_nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1)  # (n, S)
    w = x * x
    wx = w * x
    codes_f = codes.astype(F32)
    sumlx = _sum_in_order(wx * codes_f)
    suml2 = _sum_in_order(w * codes_f * codes_f)
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(n):
            old = codes[i].astype(F32)
            rest_lx = sumlx - wx[i] * old  # the sums without weight i
            rest_l2 = suml2 - w[i] * old * old
            new = np.clip(_nearest_int(x[i] * rest_l2 / rest_lx), -nmax, nmax - 1)
            new_f = new.astype(F32)
            slx = rest_lx + wx[i] * new_f
            sl2 = rest_l2 + w[i] * new_f * new_f
            accept = (rest_lx > 0) & (new != codes[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = np.where(accept, new, codes[i])
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
            changed |= accept
        if not changed.any():  # a pass without a move leaves the state as it was: ggml's per-sub-block break
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, codes + nmax)


def _sub_blocks(x, sub_len):
    """(B, 256) -> (sub_len, B * 256 // sub_len): column s is sub-block s (block s // n_sub)."""
    return np.ascontiguousarray(x.reshape(-1, sub_len).T)


def _from_sub_blocks(codes, n_blocks):
    """Inverse of `_sub_blocks`: (sub_len, S) -> (B, n_sub, sub_len)."""
    return codes.T.reshape(n_blocks, -1, codes.shape[0])


def _requantize(x, codes, d_sub, offset, lowest, highest):
    """Codes recomputed from the stored scales: nearest_int((x + offset) / d_sub), clamped; sub-blocks with
    d_sub == 0 keep the codes of the search. x, codes (B, n_sub, sub_len); d_sub, offset (B, n_sub) or None."""
    shifted = x if offset is None else x + offset[..., None]
    fresh = np.clip(_nearest_int(shifted / d_sub[..., None]), lowest, highest)
    return np.where((d_sub != 0)[..., None], fresh, codes).reshape(x.shape[0], -1)


# --- the K-quants (256-weight super-blocks) -----------------------------------------------


def _q2_k(x):
    """16 sub-blocks of 16; (scale, min) fit with |x| weights, absolute error; 4-bit scales and mins."""
    n_blocks = len(x)
    xs = _sub_blocks(x, 16)  # (16, S)
    scale, mins, codes = _scale_min_search(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scale, mins = scale.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
    max_scale, max_min = _running_max(scale), _running_max(mins)  # (B,)
    ls = np.where(max_scale[:, None] > 0, _nearest_int((F32(15) / max_scale)[:, None] * scale), 0)
    lm = np.where(max_min[:, None] > 0, _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    sc = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # (B, 16): scale low nibble, min high nibble
    d, dmin = _half(max_scale / F32(15)), _half(max_min / F32(15))
    d_sub = d.astype(F32)[:, None] * (sc & 0x0F).astype(F32)
    m_sub = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    codes = _requantize(x.reshape(n_blocks, 16, 16), _from_sub_blocks(codes, n_blocks), d_sub, m_sub, 0, 3)
    blocks = _blocks(n_blocks, T.Q2_K)
    blocks[:, 0:16] = sc
    blocks[:, 80:82] = _half_bytes(d)
    blocks[:, 82:84] = _half_bytes(dmin)
    return GRIDS[T.Q2_K].encode(codes, blocks)


def _q3_k(x):
    """16 sub-blocks of 16; signed scale refined per weight; 6-bit signed scales relative to the largest."""
    n_blocks = len(x)
    scale, codes = _scale_refine(_sub_blocks(x, 16), nmax=4)
    scale = scale.reshape(n_blocks, 16)
    peak = _first_absmax(np.where(np.isnan(scale), F32(0), scale), axis=1)  # (B,) NaN never wins in ggml's loop
    peak = np.where(np.abs(peak) > 0, peak, F32(0))
    has_scale = peak != 0
    iscale = np.where(has_scale, F32(-32) / peak, F32(0))
    raw = _nearest_int(iscale[:, None] * scale).astype(np.int8)  # (B, 16), C keeps it in an int8_t
    raw = np.where(has_scale[:, None], np.clip(raw, -32, 31) + 32, 0).astype(np.uint8)  # 0..63, all 0 when no scale
    d = _half(np.where(has_scale, F32(1) / iscale, F32(0)))
    d_sub = d.astype(F32)[:, None] * (raw.astype(np.int32) - 32).astype(F32)
    codes = _requantize(x.reshape(n_blocks, 16, 16), _from_sub_blocks(codes - 4, n_blocks), d_sub, None, -4, 3)
    blocks = _blocks(n_blocks, T.Q3_K)
    blocks[:, 96:104] = _pack(raw & 0x0F, group_len=8, bits=4)  # layout: see quants.Q3_KGrid
    blocks[:, 104:108] = _pack(raw >> 4, group_len=4, bits=2)
    blocks[:, 108:110] = _half_bytes(d)
    return GRIDS[T.Q3_K].encode(codes, blocks)


def _k_scale_min(x, qtype, nmax, rmin, nstep):
    """Q4_K (nmax 15) and Q5_K (31): 8 sub-blocks of 32; (scale, min) fit with rms + |x| weights; 6-bit scales and mins."""
    n_blocks = len(x)
    xs = _sub_blocks(x, 32)  # (32, S)
    rms = np.sqrt(_sum_in_order(xs * xs) / F32(32))  # (S,)
    scale, mins, codes = _scale_min_search(xs, rms + np.abs(xs), nmax, rmin, 0.1, nstep, use_mad=False)
    scale, mins = scale.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
    max_scale, max_min = _running_max(scale), _running_max(mins)  # (B,)
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scale) & 0xFF, 63).astype(np.uint8)  # (B, 8), C's uint8_t
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d, dmin = _half(max_scale / F32(63)), _half(max_min / F32(63))
    d_sub = d.astype(F32)[:, None] * ls.astype(F32)
    m_sub = dmin.astype(F32)[:, None] * lm.astype(F32)
    codes = _requantize(x.reshape(n_blocks, 8, 32), _from_sub_blocks(codes, n_blocks), d_sub, m_sub, 0, nmax)
    blocks = _blocks(n_blocks, qtype)
    blocks[:, 0:2] = _half_bytes(d)
    blocks[:, 2:4] = _half_bytes(dmin)
    # 12 scale bytes (inverse of quants._k_scales_mins): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scale)
    # and 4-7 (min); sub-blocks 4-7 as low nibbles in bytes 8-11 and top 2 bits in bits 6-7 of bytes 0-7
    blocks[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    blocks[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    blocks[:, 12:16] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return GRIDS[qtype].encode(codes, blocks)


def _q4_k(x):
    return _k_scale_min(x, T.Q4_K, nmax=15, rmin=-1.0, nstep=20)


def _q5_k(x):
    return _k_scale_min(x, T.Q5_K, nmax=31, rmin=-0.5, nstep=15)


def _q6_k(x):
    """16 sub-blocks of 16; best of 19 candidate scales each; int8 scales relative to the largest."""
    n_blocks = len(x)
    scale, codes = _scale_search(_sub_blocks(x, 16), nmax=32)
    scale = scale.reshape(n_blocks, 16)
    peak = _first_absmax(np.where(np.isnan(scale), F32(0), scale), axis=1)  # (B,)
    zero_block = ~(np.abs(peak) >= _GROUP_MAX_EPS)  # ggml writes an all-zero block
    iscale = F32(-128) / peak
    sc = np.minimum(_nearest_int(iscale[:, None] * scale), 127).astype(np.int8)  # (B, 16), C's int8_t
    d = _half(F32(1) / iscale)
    d_sub = d.astype(F32)[:, None] * sc.astype(F32)
    codes = _requantize(x.reshape(n_blocks, 16, 16), _from_sub_blocks(codes - 32, n_blocks), d_sub, None, -32, 31)
    codes[zero_block] = -32  # stored 0
    sc[zero_block] = 0
    d[zero_block] = 0
    blocks = _blocks(n_blocks, T.Q6_K)
    blocks[:, 192:208] = sc.view(np.uint8)
    blocks[:, 208:210] = _half_bytes(d)
    return GRIDS[T.Q6_K].encode(codes, blocks)


_QUANTIZERS = {
    T.F32: _f32, T.F16: _f16, T.BF16: _bf16,
    T.Q8_0: _q8_0,
    T.Q4_0: lambda x: _symmetric(x, T.Q4_0, 16),
    T.Q5_0: lambda x: _symmetric(x, T.Q5_0, 32),
    T.Q4_1: lambda x: _with_min(x, T.Q4_1, 16),
    T.Q5_1: lambda x: _with_min(x, T.Q5_1, 32),
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
assert set(_QUANTIZERS) == set(QUANTIZE_TYPES)
