/* ggml's scale searches, the compiled twin of searches.py: the same bits, faster.

   Every array is laid out as in searches.py, (n, S): weight j of group s at [j * S + s]. As numpy
   does, each operation runs on several groups at once: a block of LANES neighbouring groups is
   one vector (GCC/Clang vector extensions), one group per lane, so within a group the float32
   operations happen one after another in exactly numpy's order (sums one term at a time from 0,
   or from the first term where searches.py says `from_first`; products left to right;
   nearest_int by the add-1.5*2^23 trick), and what numpy does with np.where this does with a lane
   mask. Lanes never mix, so the results do not depend on how groups are blocked. Build with
   -ffp-contract=off and without -ffast-math (gguf/quants/compiled.py does): a fused multiply-add
   or a reassociated sum would round differently.

   An iterative search (scale_refine, scale_fit) stops when a pass moved no weight of any lane in
   the block; numpy stops when no group at all moved. Both give the same results: a pass without a
   move leaves that group's state as it was, so every later pass leaves it too.
*/

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in float (FLT_EVAL_METHOD 0), as numpy's float32 is"
#endif

/* groups per vector: what the CPU's vector registers hold (-march=native tells the compiler which) */
#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#endif
#define MAX_N 256 /* the longest group searched (a K-quant sub-block is 16 or 32 weights, a legacy block 32) */

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float a) {
    vf v;
    for (int l = 0; l < LANES; l++) v[l] = a; /* not 0 + a, which would turn -0.0 into +0.0 */
    return v;
}

static inline vi isplat(int32_t a) {
    vi v;
    for (int l = 0; l < LANES; l++) v[l] = a;
    return v;
}

static inline vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vi isel(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }
static inline vi imin(vi a, vi b) { return isel(a < b, a, b); }
static inline vi iclamp(vi v, int32_t lo, int32_t hi) { return imin(isel(v > isplat(lo), v, isplat(lo)), isplat(hi)); }
static inline vf vabs(vf a) { return (vf)((vi)a & isplat(0x7fffffff)); }
static inline vi vnan(vf a) { return a != a; }
static inline vf tofloat(vi a) { return __builtin_convertvector(a, vf); }
static inline int any(vi m) {
    int32_t r = 0;
    for (int l = 0; l < LANES; l++) r |= m[l];
    return r != 0;
}

/* ggml's nearest_int: round half to even through the mantissa of v + 1.5*2^23 */
static inline vi nearest_int(vf v) {
    vi bits = (vi)(v + splat(12582912.f));
    return (bits & isplat(0x007fffff)) - isplat(0x00400000);
}

/* rows 0..n-1 of columns s0..s0+LANES-1 of src (n, S) into dst, lanes past S zero; element (j, s) of
   src is at src[j * rs + s * cs] (numpy's strides in elements: a transposed view needs no copy) */
static void load(const float *src, long rs, long cs, long n, long S, long s0, vf *dst) {
    long nl = S - s0 < LANES ? S - s0 : LANES;
    for (long j = 0; j < n; j++) {
        vf v = splat(0.f);
        if (cs == 1) {
            memcpy(&v, src + j * rs + s0, nl * sizeof(float));
        } else {
            for (long l = 0; l < nl; l++) v[l] = src[j * rs + (s0 + l) * cs];
        }
        dst[j] = v;
    }
}

static void store_i32(int32_t *dst, long n, long S, long s0, const vi *src) {
    long nl = S - s0 < LANES ? S - s0 : LANES;
    for (long j = 0; j < n; j++) memcpy(dst + j * S + s0, &src[j], nl * sizeof(int32_t));
}

static void store_f32(float *dst, long S, long s0, vf v) {
    long nl = S - s0 < LANES ? S - s0 : LANES;
    memcpy(dst + s0, &v, nl * sizeof(float));
}

/* --- make_qkx2_quants / make_qkx3_quants: searches.py's scale_min_search --------------------- */

static vf min_search_error(const vf *x, const vf *w, const vi *L, long n, vf scale, vf lo, int use_mad) {
    vf total = splat(0.f);
    for (long j = 0; j < n; j++) {
        vf diff = scale * tofloat(L[j]) + lo - x[j];
        total += w[j] * (use_mad ? vabs(diff) : diff * diff);
    }
    return total;
}

void scale_min_search_f32(const float *xs, long x_rs, long x_cs, const float *ws, long w_rs, long w_cs, long n, long S, int nmax, float rmin, float rdelta,
                          int nstep, int use_mad, int qkx3, float *scale_out, float *min_out, int32_t *codes_out) {
    vf x[MAX_N], w[MAX_N];
    vi L[MAX_N], trial[MAX_N];
    for (long s0 = 0; s0 < S; s0 += LANES) {
        load(xs, x_rs, x_cs, n, S, s0, x);
        load(ws, w_rs, w_cs, n, S, s0, w);
        vf hi = x[0], lo = x[0]; /* the first max and min; the first NaN wins, as numpy's argmax */
        for (long j = 1; j < n; j++) {
            hi = sel((x[j] > hi) | (vnan(x[j]) & ~vnan(hi)), x[j], hi);
            lo = sel((x[j] < lo) | (vnan(x[j]) & ~vnan(lo)), x[j], lo);
        }
        lo = sel(lo > splat(0.f), splat(0.f), lo);
        vi flat = hi == lo; /* a constant non-positive group: codes 0, scale 0 */
        vf flat_min = -lo;
        vf sum_w = w[0], sum_x = w[0] * x[0];
        for (long j = 1; j < n; j++) {
            sum_w += w[j];
            sum_x += w[j] * x[j];
        }
        vf iscale = splat((float)nmax) / (hi - lo);
        vf scale = splat(1.f) / iscale;
        for (long j = 0; j < n; j++) L[j] = iclamp(nearest_int(iscale * (x[j] - lo)), 0, nmax);
        vf best = min_search_error(x, w, L, n, scale, lo, use_mad);
        for (int k = 0; k <= nstep; k++) {
            iscale = splat(rmin + rdelta * (float)k + (float)nmax) / (hi - lo); /* lo: the best min so far */
            for (long j = 0; j < n; j++) {
                vf v = iscale * (x[j] - lo);
                if (qkx3) {
                    vf capped = sel(v > splat((float)nmax), splat((float)nmax), v);
                    trial[j] = nearest_int(capped) & (v > splat(0.f));
                } else {
                    trial[j] = iclamp(nearest_int(v), 0, nmax);
                }
            }
            vf sum_l = splat(0.f), sum_l2 = splat(0.f), sum_xl = splat(0.f);
            for (long j = 0; j < n; j++) {
                vf l = tofloat(trial[j]);
                vf wl = w[j] * l;
                sum_l += wl;
                sum_l2 += wl * l;
                sum_xl += wl * x[j];
            }
            vf det = sum_w * sum_l2 - sum_l * sum_l;
            vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            vi clamp = this_min > splat(0.f);
            this_min = sel(clamp, splat(0.f), this_min);
            this_scale = sel(clamp, sum_xl / sum_l2, this_scale);
            vi better = det > splat(0.f);
            if (!any(better)) continue;
            vf this_error = min_search_error(x, w, trial, n, this_scale, this_min, use_mad);
            better &= this_error < best;
            if (!any(better)) continue;
            best = sel(better, this_error, best);
            for (long j = 0; j < n; j++) L[j] = isel(better, trial[j], L[j]);
            scale = sel(better, this_scale, scale);
            lo = sel(better, this_min, lo);
        }
        for (long j = 0; j < n; j++) L[j] &= ~flat;
        store_f32(scale_out, S, s0, sel(flat, splat(0.f), scale));
        store_f32(min_out, S, s0, sel(flat, flat_min, -lo));
        store_i32(codes_out, n, S, s0, L);
    }
}

/* --- make_qx_quants (rmse_type 1): searches.py's scale_search -------------------------------- */

static void qx_trial(const vf *x, const vf *w, const vf *wx, long n, int nmax, vf iscale, vi *L, vf *sumlx, vf *suml2) {
    vf lx = splat(0.f), l2 = splat(0.f);
    for (long j = 0; j < n; j++) {
        L[j] = iclamp(nearest_int(iscale * x[j]), -nmax, nmax - 1);
        vf l = tofloat(L[j]);
        lx += wx[j] * l;
        l2 += w[j] * l * l;
    }
    *sumlx = lx;
    *suml2 = l2;
}

/* the signed value of largest magnitude, the first on ties, +0.0 when all are zero; NaN counts as
   0 (fabsf(NaN) > best is false) unless nan_wins, where the first NaN is the answer (numpy's argmax) */
static vf first_absmax(const vf *x, long n, int nan_wins) {
    vf best = splat(0.f), peak = splat(0.f);
    for (long j = 0; j < n; j++) {
        vf a = vabs(x[j]);
        vi take = a > best;
        if (nan_wins) take |= vnan(a) & ~vnan(best);
        best = sel(take, a, best);
        peak = sel(take, x[j], peak);
    }
    return peak;
}

void scale_search_f32(const float *xs, long x_rs, long x_cs, const float *ws, long w_rs, long w_cs, long n, long S, int nmax, float *scale_out, int32_t *codes_out) {
    vf x[MAX_N], w[MAX_N], wx[MAX_N];
    vi L[MAX_N], trial[MAX_N];
    for (long s0 = 0; s0 < S; s0 += LANES) {
        load(xs, x_rs, x_cs, n, S, s0, x);
        vf peak = first_absmax(x, n, 0);
        vi zero = vabs(peak) < splat(1e-15f);
        if (ws)
            load(ws, w_rs, w_cs, n, S, s0, w);
        else
            for (long j = 0; j < n; j++) w[j] = x[j] * x[j];
        for (long j = 0; j < n; j++) wx[j] = w[j] * x[j];
        vf sumlx, suml2;
        qx_trial(x, w, wx, n, nmax, splat((float)(-nmax)) / peak, L, &sumlx, &suml2);
        vf scale = sel(suml2 != splat(0.f), sumlx / suml2, splat(0.f));
        vf best = scale * sumlx;
        for (int k = -9; k <= 9; k++) {
            if (k == 0) continue;
            vf t_sumlx, t_suml2;
            qx_trial(x, w, wx, n, nmax, -splat((float)nmax + 0.1f * (float)k) / peak, trial, &t_sumlx, &t_suml2);
            vi better = (t_suml2 > splat(0.f)) & (t_sumlx * t_sumlx > best * t_suml2);
            if (!any(better)) continue;
            for (long j = 0; j < n; j++) L[j] = isel(better, trial[j], L[j]);
            scale = sel(better, t_sumlx / t_suml2, scale);
            best = sel(better, scale * t_sumlx, best);
        }
        for (long j = 0; j < n; j++) L[j] = (L[j] + isplat(nmax)) & ~zero;
        store_f32(scale_out, S, s0, sel(zero, splat(0.f), scale));
        store_i32(codes_out, n, S, s0, L);
    }
}

/* --- make_q3_quants with rmse: searches.py's scale_refine ------------------------------------- */

void scale_refine_f32(const float *xs, long x_rs, long x_cs, long n, long S, int nmax, float *scale_out, int32_t *codes_out) {
    vf x[MAX_N], w[MAX_N], wx[MAX_N];
    vi L[MAX_N];
    for (long s0 = 0; s0 < S; s0 += LANES) {
        load(xs, x_rs, x_cs, n, S, s0, x);
        vf peak = first_absmax(x, n, 1);
        vi zero = vabs(peak) < splat(1e-15f);
        vf iscale = splat((float)(-nmax)) / peak;
        vf sumlx = splat(0.f), suml2 = splat(0.f);
        for (long j = 0; j < n; j++) {
            L[j] = iclamp(nearest_int(iscale * x[j]), -nmax, nmax - 1);
            w[j] = x[j] * x[j];
            wx[j] = w[j] * x[j];
            vf l = tofloat(L[j]);
            sumlx += wx[j] * l;
            suml2 += w[j] * l * l;
        }
        for (int pass = 0; pass < 5; pass++) {
            vi changed = isplat(0);
            for (long i = 0; i < n; i++) {
                vf old = tofloat(L[i]);
                vf rest_lx = sumlx - wx[i] * old;
                vf rest_l2 = suml2 - w[i] * old * old;
                vi fresh = iclamp(nearest_int(x[i] * rest_l2 / rest_lx), -nmax, nmax - 1);
                vf f = tofloat(fresh);
                vf slx = rest_lx + wx[i] * f;
                vf sl2 = rest_l2 + w[i] * f * f;
                vi accept = (rest_lx > splat(0.f)) & (fresh != L[i]) & (sl2 > splat(0.f))
                            & (slx * slx * suml2 > sumlx * sumlx * sl2);
                L[i] = isel(accept, fresh, L[i]);
                sumlx = sel(accept, slx, sumlx);
                suml2 = sel(accept, sl2, suml2);
                changed |= accept;
            }
            if (!any(changed)) break;
        }
        vf scale = sel(suml2 > splat(0.f), sumlx / suml2, splat(0.f));
        for (long j = 0; j < n; j++) L[j] = (L[j] + isplat(nmax)) & ~zero;
        store_f32(scale_out, S, s0, sel(zero, splat(0.f), scale));
        store_i32(codes_out, n, S, s0, L);
    }
}

/* --- make_qp_quants: searches.py's scale_fit --------------------------------------------------- */

static vf fit_error(const vf *x, const vf *w, const vi *L, long n, vf scale) {
    vf total = splat(0.f);
    for (long j = 0; j < n; j++) {
        vf diff = x[j] - scale * tofloat(L[j]);
        total += w[j] * diff * diff;
    }
    return total;
}

void scale_fit_f32(const float *xs, long x_rs, long x_cs, const float *ws, long w_rs, long w_cs, long n, long S, int nmax, float *scale_out, uint8_t *codes_out) {
    vf x[MAX_N], w[MAX_N], wx[MAX_N];
    vi L[MAX_N];
    for (long s0 = 0; s0 < S; s0 += LANES) {
        load(xs, x_rs, x_cs, n, S, s0, x);
        load(ws, w_rs, w_cs, n, S, s0, w);
        vf peak = splat(0.f); /* ggml's max = MAX(max, x) from 0, NaN and all */
        for (long j = 0; j < n; j++) peak = sel(peak > x[j], peak, x[j]);
        vi zero = peak < splat(1e-15f);
        for (long j = 0; j < n; j++) wx[j] = w[j] * x[j];
        vf iscale = splat((float)nmax) / peak;
        for (long j = 0; j < n; j++) L[j] = nearest_int(iscale * x[j]) & isplat(0xFF); /* the first codes unclamped */
        vf best = fit_error(x, w, L, n, splat(1.f) / iscale);
        for (int k = -4; k <= 4; k++) {
            if (k == 0) continue;
            vf trial_iscale = splat(0.1f * (float)k + (float)nmax) / peak;
            for (long j = 0; j < n; j++) L[j] = imin(nearest_int(trial_iscale * x[j]), isplat(nmax));
            vf trial_error = fit_error(x, w, L, n, splat(1.f) / trial_iscale);
            vi better = trial_error < best;
            best = sel(better, trial_error, best);
            iscale = sel(better, trial_iscale, iscale);
        }
        vf sumlx = splat(0.f), suml2 = splat(0.f);
        for (long j = 0; j < n; j++) {
            vi l = imin(nearest_int(iscale * x[j]), isplat(nmax)); /* possibly negative */
            vf f = tofloat(l);
            sumlx += wx[j] * f;
            suml2 += w[j] * f * f;
            L[j] = l & isplat(0xFF); /* what ggml's uint8_t holds from here on */
        }
        for (int pass = 0; pass < 5; pass++) {
            vi changed = isplat(0);
            for (long i = 0; i < n; i++) {
                vf old = tofloat(L[i]);
                vf slx = sumlx - wx[i] * old;
                vf sl2 = suml2 - w[i] * old * old;
                vi fresh = imin(nearest_int(x[i] * sl2 / slx), isplat(nmax));
                vf f = tofloat(fresh);
                vf new_lx = slx + wx[i] * f;
                vf new_l2 = sl2 + w[i] * f * f;
                vi accept = (slx > splat(0.f)) & (sl2 > splat(0.f)) & (fresh != L[i])
                            & (new_lx * new_lx * suml2 > sumlx * sumlx * new_l2);
                L[i] = isel(accept, fresh & isplat(0xFF), L[i]);
                sumlx = sel(accept, new_lx, sumlx);
                suml2 = sel(accept, new_l2, suml2);
                changed |= accept;
            }
            if (!any(changed)) break;
        }
        vf scale = sel(suml2 > splat(0.f), sumlx / suml2, splat(0.f));
        store_f32(scale_out, S, s0, sel(zero, splat(0.f), scale));
        long nl = S - s0 < LANES ? S - s0 : LANES;
        for (long j = 0; j < n; j++)
            for (long l = 0; l < nl; l++) codes_out[j * S + s0 + l] = zero[l] ? 0 : (uint8_t)L[j][l];
    }
}

/* --- the K-quants' last step: kquants.py's _requantize ------------------------------------------- */

/* codes from the stored scales: out[s, j] = clamp(nearest_int((x[s, j] + offset[s]) / d_sub[s]), lo, hi),
   or, where d_sub[s] == 0, the search's code codes[j, s] + shift. x and out (S, sub_len) with
   sub-block s in row s; codes (sub_len, S) as the searches return them; offset may be NULL. */
void requantize_codes(const float *x, const int32_t *codes, long S, long sub_len, int shift, const float *d_sub,
                      const float *offset, int lo, int hi, int32_t *out) {
    for (long s = 0; s < S; s++) {
        float d = d_sub[s];
        const float *row = x + s * sub_len;
        int32_t *dst = out + s * sub_len;
        if (d != 0) {
            for (long j = 0; j < sub_len; j++) {
                float v = offset ? row[j] + offset[s] : row[j];
                float t = v / d + 12582912.f; /* nearest_int */
                int32_t bits;
                memcpy(&bits, &t, sizeof bits);
                int q = (bits & 0x007fffff) - 0x00400000;
                dst[j] = q < lo ? lo : (q > hi ? hi : q);
            }
        } else {
            for (long j = 0; j < sub_len; j++) dst[j] = codes[j * S + s] + shift;
        }
    }
}

/* --- the legacy types' importance: legacy.py's _importance -------------------------------------- */

/* out[r, j] = weights[j] * sqrt(sigma2_r + x[r, j]^2), sigma2_r = (sum of x[r, j]^2 over the row, in order) / n,
   for R rows of n weights */
void legacy_importance(const float *x, const float *weights, long R, long n, float *out) {
    for (long r = 0; r < R; r++) {
        const float *row = x + r * n;
        float sum = 0.f;
        for (long j = 0; j < n; j++) sum += row[j] * row[j];
        float sigma2 = sum / (float)n;
        for (long j = 0; j < n; j++) out[r * n + j] = weights[j] * sqrtf(sigma2 + row[j] * row[j]);
    }
}
