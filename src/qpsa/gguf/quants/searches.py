"""ggml's scale searches, whole-array: the fits of a scale (and min) to a group of weights that the
K-quants, and the legacy types with an importance matrix, run per sub-block.

    scale_search       make_qx_quants, rmse_type 1    value ≈ scale·code, best of 19 candidate scales
    scale_refine       make_q3_quants with rmse       value ≈ scale·code, refined weight by weight
    scale_min_search   make_qkx2_quants / make_qkx3   value ≈ scale·code − min, a grid of candidate ranges
    scale_fit          make_qp_quants                 scale·code ≈ value ≥ 0, refined weight by weight

Every array is (n, S): weight j of every group in row j, one group per column, so the C loop over a
group's n weights is a loop over rows here (sums in ggml's order, `sum_in_order`) and everything else
is vectorized over the S groups.

Each search has two versions with the same signature and the same bits: `<name>_numpy`, whole-array
numpy, the reference and the fallback; and searches.c, compiled on first use (compiled.py), which does
each group's float32 operations in the same order, several groups per vector register, and is
several times faster (docs/benchmarks.md, "Quantizer speed").
`<name>` runs the compiled one where it is available and the numpy one otherwise (QPSA_KERNEL=0, no C
compiler, a failed build).
"""

from __future__ import annotations

import numpy as np

import qpsa.gguf.quants.compiled as compiled
from qpsa.gguf.quants.common import F32, GROUP_MAX_EPS, first_absmax, first_max, first_min, nearest_int, sum_in_order


def scale_min_search(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3=False):
    """scale_min_search_numpy compiled (searches.c, the same bits), or scale_min_search_numpy where the library is unavailable."""
    found = compiled.scale_min_search(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3)
    return scale_min_search_numpy(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3) if found is None else found


def scale_min_search_numpy(x, w, nmax, rmin, rdelta, nstep, use_mad, qkx3=False):
    """ggml's make_qkx2_quants (make_qkx3_quants with `qkx3`): per group, value ≈ scale * code - min with codes 0..nmax.

    Start from the (min(x, 0), max) range, then try nstep + 1 wider or narrower grids
    (nmax + rmin + rdelta * k steps across the range); for each, fit scale and min to its codes by
    weighted least squares (min clamped at 0) and keep it if the weighted error (absolute when
    use_mad, else squared) is smaller. The range is re-centred on the best min as the search goes.
    make_qkx3_quants differs only in how a candidate grid rounds: values at or below 0 (and NaN) give
    code 0 and values above nmax code nmax before rounding, where make_qkx2 rounds first and clamps after.
    x, w: float32 (n, S) -> scale (S,), min (S,) (as a positive number to subtract), codes int32 (n, S).
    """
    hi = first_max(x, axis=0)  # (S,)
    lo = first_min(x, axis=0)
    lo = np.where(lo > 0, F32(0), lo)
    flat = hi == lo  # constant non-positive group: ggml stores codes 0, scale 0
    flat_min = -lo
    sum_w = sum_in_order(w, from_first=True)
    sum_x = sum_in_order(w * x, from_first=True)

    def error(scale, lo, codes_f):
        diff = scale * codes_f + lo - x  # (n, S)
        return sum_in_order(w * (np.abs(diff) if use_mad else diff * diff))

    def candidate(iscale, lo):
        if qkx3:
            v = iscale * (x - lo)
            return np.where(v > 0, nearest_int(np.minimum(v, F32(nmax))), 0)
        return np.clip(nearest_int(iscale * (x - lo)), 0, nmax)

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    codes = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
    best = error(scale, lo, codes.astype(F32))
    for k in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / (hi - lo)
        trial = candidate(iscale, lo)
        trial_f = trial.astype(F32)
        wl = w * trial_f
        sum_l, sum_l2, sum_xl = sum_in_order(wl), sum_in_order(wl * trial_f), sum_in_order(wl * x)
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


def scale_search(x, nmax, w=None):
    """scale_search_numpy compiled (searches.c, the same bits), or scale_search_numpy where the library is unavailable."""
    found = compiled.scale_search(x, nmax, w)
    return scale_search_numpy(x, nmax, w) if found is None else found


def scale_search_numpy(x, nmax, w=None):
    """ggml's make_qx_quants (rmse_type 1): value ≈ scale * code, codes -nmax..nmax-1, weights w (default x²).

    Try iscale = -(nmax + 0.1 k) / (value of largest magnitude) for k = 0, -9..9 and keep the one whose
    least-squares scale explains most of the weighted energy. An all-zero group gets scale 0 and
    stored codes 0. x, w: float32 (n, S) -> scale (S,), stored codes (code + nmax) int32 (n, S).
    """
    peak = first_absmax(np.where(np.isnan(x), F32(0), x), axis=0)  # (S,); NaN never wins ggml's `ax > amax`
    zero = np.abs(peak) < GROUP_MAX_EPS
    w = x * x if w is None else w
    wx = w * x

    def trial(iscale):
        codes = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)  # (n, S)
        codes_f = codes.astype(F32)
        return codes, sum_in_order(wx * codes_f), sum_in_order(w * codes_f * codes_f)

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


def scale_refine(x, nmax):
    """scale_refine_numpy compiled (searches.c, the same bits), or scale_refine_numpy where the library is unavailable."""
    found = compiled.scale_refine(x, nmax)
    return scale_refine_numpy(x, nmax) if found is None else found


def scale_refine_numpy(x, nmax):
    """ggml's make_q3_quants with rmse: value ≈ scale * code, codes -nmax..nmax-1, x² weights.

    Start from codes on the grid through the value of largest magnitude, then up to 5 passes over the
    weights in order: move a weight to the code nearest its value under the least-squares scale of
    the others, if that raises the explained energy. The pass over weights is sequential (each move
    changes the sums the next one sees), so the loop runs over the n weights, vectorized over
    groups. x: float32 (n, S) -> scale (S,), stored codes (code + nmax) int32 (n, S).
    """
    n = x.shape[0]
    peak = first_absmax(x, axis=0)  # (S,)
    zero = np.abs(peak) < GROUP_MAX_EPS
    codes = np.clip(nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1)  # (n, S)
    w = x * x
    wx = w * x
    codes_f = codes.astype(F32)
    sumlx = sum_in_order(wx * codes_f)
    suml2 = sum_in_order(w * codes_f * codes_f)
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(n):
            old = codes[i].astype(F32)
            rest_lx = sumlx - wx[i] * old  # the sums without weight i
            rest_l2 = suml2 - w[i] * old * old
            new = np.clip(nearest_int(x[i] * rest_l2 / rest_lx), -nmax, nmax - 1)
            new_f = new.astype(F32)
            slx = rest_lx + wx[i] * new_f
            sl2 = rest_l2 + w[i] * new_f * new_f
            accept = (rest_lx > 0) & (new != codes[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = np.where(accept, new, codes[i])
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
            changed |= accept
        if not changed.any():  # a pass without a move leaves the state as it was: ggml's per-group break
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, codes + nmax)


def scale_fit(x, w, nmax):
    """scale_fit_numpy compiled (searches.c, the same bits), or scale_fit_numpy where the library is unavailable."""
    found = compiled.scale_fit(x, w, nmax)
    return scale_fit_numpy(x, w, nmax) if found is None else found


def scale_fit_numpy(x, w, nmax):
    """ggml's make_qp_quants: the K-quants' sub-block scales (or mins) x ≥ 0 as scale * code, codes ..nmax.

    Try iscale = (nmax + 0.1 k) / max(x) for k = 0, ±1..±4 and keep the one of least weighted squared
    error, then up to 5 passes over the values in order, moving each to the code nearest its value
    under the least-squares scale of the others if that raises the explained energy (as `scale_refine`).
    Codes are clamped at nmax only: ggml stores them in a uint8_t, so a negative value's code wraps
    around (kept here, byte for byte). A group with max(x) < 1e-15 gets scale 0 and codes 0.
    x, w: float32 (n, S) -> scale (S,), codes uint8 (n, S).
    """
    n = x.shape[0]
    peak = np.zeros(x.shape[1], dtype=F32)  # (S,): ggml's max = MAX(max, x) from 0, NaN and all
    for row in x:
        peak = np.where(peak > row, peak, row)
    zero = peak < GROUP_MAX_EPS
    wx = w * x

    def error(scale, codes):
        diff = x - scale * codes.astype(F32)
        return sum_in_order(w * diff * diff)

    iscale = F32(nmax) / peak
    best = error(F32(1) / iscale, nearest_int(iscale * x) & 0xFF)  # the first codes are stored unclamped
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_iscale = (F32(0.1) * F32(k) + F32(nmax)) / peak
        trial_error = error(F32(1) / trial_iscale, np.minimum(nearest_int(trial_iscale * x), nmax))
        better = trial_error < best
        best = np.where(better, trial_error, best)
        iscale = np.where(better, trial_iscale, iscale)
    codes = np.minimum(nearest_int(iscale * x), nmax)  # int32 (n, S), possibly negative
    codes_f = codes.astype(F32)
    sumlx = sum_in_order(wx * codes_f)
    suml2 = sum_in_order(w * codes_f * codes_f)
    codes = codes & 0xFF  # what ggml's uint8_t L holds from here on
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(n):
            old = codes[i].astype(F32)
            slx = sumlx - wx[i] * old
            sl2 = suml2 - w[i] * old * old
            new = np.minimum(nearest_int(x[i] * sl2 / slx), nmax)
            new_f = new.astype(F32)
            new_lx = slx + wx[i] * new_f
            new_l2 = sl2 + w[i] * new_f * new_f
            accept = ((slx > 0) & (sl2 > 0) & (new != codes[i])
                      & (new_lx * new_lx * suml2 > sumlx * sumlx * new_l2))
            codes[i] = np.where(accept, new & 0xFF, codes[i])
            sumlx = np.where(accept, new_lx, sumlx)
            suml2 = np.where(accept, new_l2, suml2)
            changed |= accept
        if not changed.any():
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, codes).astype(np.uint8)
