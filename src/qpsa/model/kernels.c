/* Causal (optionally sliding-window) grouped-query softmax attention in float32 for the CPU,
 * compiled on first use by qpsa/model/kernel.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes. It runs on the OpenMP runtime torch already loaded (same soname), so it
 * shares torch's threads and thread count.
 *
 * Why it exists: with head dims of 64, the two small matmuls of attention (q·k with an inner
 * dimension of 64, p·v with 64 output columns) ran at 55-70% of the machine's matmul rate
 * through MKL, and the softmax between them was a third pass over the scores in memory. Here
 * each block of query rows is one work item: its scores, softmax and p·v stay in the thread's
 * cache, and both products run in register-blocked loops.
 *
 * Layout: q (B, T, H, D), k and v (B, T, KH, D) with any batch/position/head strides and unit
 * stride along D; out (B, T, H*D) contiguous. Query head h uses key/value head h / G, G = H / KH.
 * Position t attends to keys j with j <= t and, when window > 0, t - j < window.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16 /* floats per vector */
#define MR 6  /* query rows per register tile: 6 x 4 vector accumulators */
#else
#define VL 8
#define MR 2
#endif
#define NV 4          /* vectors per register tile row */
#define NC (NV * VL)  /* keys (q·k) or output channels (p·v) per register tile */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf blend(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) for x <= 0 as in Cephes' expf (range reduction by ln 2, degree-6 polynomial; ~1 ulp),
 * and exactly 0 below -87 (where float32's exp underflows anyway), including x = -inf. */
static inline vf exp_nonpositive(vf x) {
    const vf lowest = splat(-87.0f);
    vi dead = x < lowest;
    x = blend(dead, lowest, x);
    vf shifted = x * 1.44269504088896341f + 12582912.0f; /* round(x / ln 2) in the low bits */
    vf n = shifted - 12582912.0f;
    vi ni = (vi)shifted - 0x4B400000;
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vf scaled = (vf)((vi)p + (ni << 23)); /* p * 2^n: n >= -126, so 2^n is a normal float */
    return blend(dead, splat(0.0f), scaled);
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* S[r][c] = sum_d Q[r][d] * Kt[d][c] for MR rows of Q (row stride D) and NC keys of Kt
 * (row stride ldk); S has row stride lds. */
static inline void qk_tile(const float *Q, int D, const float *Kt, long ldk, float *S, long lds) {
    vf acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = splat(0.0f);
    for (int d = 0; d < D; d++) {
        vf k[NV];
        for (int v = 0; v < NV; v++) k[v] = load(Kt + d * ldk + v * VL);
        for (int r = 0; r < MR; r++) {
            vf q = splat(Q[r * D + d]);
            for (int v = 0; v < NV; v++) acc[r][v] += q * k[v];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) store(S + r * lds + v * VL, acc[r][v]);
}

/* O[r][c] = sum_{j in [j0, j1)} P[r][j] * V[j][c] for MR rows of P (row stride ldp) and NC
 * channels of V (row stride ldv); O has row stride ldo. */
static inline void pv_tile(const float *P, long ldp, const float *V, long ldv, int j0, int j1, float *O, long ldo) {
    vf acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = splat(0.0f);
    for (int j = j0; j < j1; j++) {
        vf x[NV];
        for (int v = 0; v < NV; v++) x[v] = load(V + j * ldv + v * VL);
        for (int r = 0; r < MR; r++) {
            vf p = splat(P[r * ldp + j]);
            for (int v = 0; v < NV; v++) acc[r][v] += p * x[v];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) store(O + r * ldo + v * VL, acc[r][v]);
}

static inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

/* Returns 0, or -1 if memory ran out (out is then incomplete). */
int causal_attention_f32(const float *q, long qsb, long qst, long qsh,
                         const float *k, long ksb, long kst, long ksh,
                         const float *v, long vsb, long vst, long vsh,
                         float *out, int B, int T, int H, int KH, int D,
                         float scale, int window, int block) {
    const int G = H / KH;
    const long Tp = round_up(T, NC);   /* keys, padded to whole tiles */
    const long Dp = round_up(D, NC);   /* value channels, padded to whole tiles */
    const long rows = (long)block * G; /* query rows (position, head) per work item */
    const long Rp = round_up(rows, MR);
    const int nblocks = (T + block - 1) / block;
    int failed = 0;

    /* k transposed to (D, Tp) and v padded to (Tp, Dp), per (batch, kv head), zero padded */
    float *Kt = calloc((size_t)B * KH * D * Tp, sizeof(float));
    float *Vp = calloc((size_t)B * KH * Tp * Dp, sizeof(float));
    if (!Kt || !Vp) {
        free(Kt);
        free(Vp);
        return -1;
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < KH; kh++) {
            float *kt = Kt + ((size_t)b * KH + kh) * D * Tp;
            float *vp = Vp + ((size_t)b * KH + kh) * Tp * Dp;
            for (int t = 0; t < T; t++) {
                const float *ks = k + b * ksb + t * kst + kh * ksh;
                const float *vs = v + b * vsb + t * vst + kh * vsh;
                for (int d = 0; d < D; d++) kt[d * Tp + t] = ks[d];
                memcpy(vp + t * Dp, vs, D * sizeof(float));
            }
        }

#pragma omp parallel
    {
        float *Q = calloc(Rp * D, sizeof(float));  /* the block's scaled queries, rows (t, g) */
        float *S = malloc(Rp * Tp * sizeof(float)); /* scores, then probabilities */
        float *O = malloc(MR * Dp * sizeof(float)); /* one register tile row band of output */
        float *inv_sum = malloc(Rp * sizeof(float));
        if (!Q || !S || !O || !inv_sum) {
#pragma omp atomic write
            failed = 1;
        }
        /* largest (latest) blocks first, so the threads finish together */
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < (long)nblocks * B * KH; item++) {
            if (failed) continue;
            const int blk = nblocks - 1 - (int)(item / (B * KH));
            const int b = (int)(item % (B * KH)) / KH, kh = (int)(item % KH);
            const int t0 = blk * block, t1 = t0 + block < T ? t0 + block : T;
            const long n = (long)(t1 - t0) * G;
            const float *kt = Kt + ((size_t)b * KH + kh) * D * Tp;
            const float *vp = Vp + ((size_t)b * KH + kh) * Tp * Dp;
            /* keys the block can see: [j0, t1), j0 rounded down to a whole tile */
            const int j0 = window > 0 && t0 - window + 1 > 0 ? (t0 - window + 1) / NC * NC : 0;
            const long j1 = round_up(t1, NC);

            for (long r = 0; r < n; r++) {
                const int t = t0 + (int)(r / G), h = kh * G + (int)(r % G);
                const float *qs = q + b * qsb + t * qst + h * qsh;
                for (int d = 0; d < D; d++) Q[r * D + d] = qs[d] * scale;
            }
            const long np = round_up(n, MR);
            memset(Q + n * D, 0, (np - n) * D * sizeof(float));
            for (long r = 0; r < np; r += MR)
                for (long j = j0; j < j1; j += NC) qk_tile(Q + r * D, D, kt + j, Tp, S + r * Tp + j, Tp);

            for (long r = 0; r < np; r++) {
                float *s = S + r * Tp;
                if (r >= n) { /* padding rows: probabilities 0 */
                    memset(s + j0, 0, (j1 - j0) * sizeof(float));
                    inv_sum[r] = 0.0f;
                    continue;
                }
                const int t = t0 + (int)(r / G);
                const int first = window > 0 && t - window + 1 > 0 ? t - window + 1 : 0;
                vf idx0 = {0};
                for (int i = 0; i < VL; i++) idx0[i] = (float)i;
                vf m = splat(-INFINITY);
                for (long j = j0; j < j1; j += VL) {
                    vf idx = idx0 + (float)j;
                    vi seen = (idx >= (float)first) & (idx <= (float)t);
                    vf x = blend(seen, load(s + j), splat(-INFINITY));
                    store(s + j, x);
                    m = blend(x > m, x, m);
                }
                const float mx = hmax(m);
                vf sum = splat(0.0f);
                for (long j = j0; j < j1; j += VL) {
                    vf e = exp_nonpositive(load(s + j) - mx);
                    store(s + j, e);
                    sum += e;
                }
                inv_sum[r] = 1.0f / hsum(sum);
            }

            for (long r = 0; r < np; r += MR) {
                /* this band's positions: t0 + r/G .. t0 + (r+MR-1)/G; keys past the last are 0 */
                const long last = r + MR - 1 < n ? r + MR - 1 : n - 1;
                const int jend = t0 + (int)(last / G) + 1;
                for (long c = 0; c < Dp; c += NC) pv_tile(S + r * Tp, Tp, vp + c, Dp, j0, jend, O + c, Dp);
                for (long i = 0; i < MR && r + i < n; i++) {
                    const long row = r + i;
                    const int t = t0 + (int)(row / G), h = kh * G + (int)(row % G);
                    float *dst = out + ((long)b * T + t) * H * D + (long)h * D;
                    const float w = inv_sum[row];
                    for (int d = 0; d < D; d++) dst[d] = O[i * Dp + d] * w;
                }
            }
        }
        free(Q);
        free(S);
        free(O);
        free(inv_sum);
    }
    free(Kt);
    free(Vp);
    return failed ? -1 : 0;
}

/* ---- elementwise passes of the layer, one read and one write each ------------------------- */

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for R contiguous rows of n floats. */
void rms_norm_f32(const float *x, const float *weight, float *out, long R, int n, float eps) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *row = x + r * n;
        float *dst = out + r * n;
        vf acc = splat(0.0f);
        int i = 0;
        for (; i + VL <= n; i += VL) {
            vf v = load(row + i);
            acc += v * v;
        }
        float squares = hsum(acc);
        for (; i < n; i++) squares += row[i] * row[i];
        const float inv = 1.0f / sqrtf(squares / n + eps);
        for (i = 0; i + VL <= n; i += VL) store(dst + i, load(row + i) * inv * load(weight + i));
        for (; i < n; i++) dst[i] = row[i] * inv * weight[i];
    }
}

/* sigmoid(x) = 1 / (1 + e^-x), from e = exp(-|x|) <= 1 so nothing overflows */
static inline vf sigmoid(vf x) {
    vi negative = x < 0.0f;
    vf e = exp_nonpositive(blend(negative, x, -x));
    vf s = 1.0f / (1.0f + e);
    return blend(negative, e * s, s);
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) */
static inline vf tanh_(vf x) {
    vi negative = x < 0.0f;
    vf e = exp_nonpositive(blend(negative, 2.0f * x, -2.0f * x));
    vf t = (1.0f - e) / (1.0f + e);
    return blend(negative, -t, t);
}

static inline vf activation(vf g, int gelu) {
    if (gelu) /* the tanh approximation of GELU */
        return 0.5f * g * (1.0f + tanh_(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return g * sigmoid(g); /* SiLU */
}

/* For R rows of 2n floats [gate | up]: gate <- act(gate) * up, in place (act SiLU, or GELU
 * (tanh) if gelu); row r starts at x + r * stride. */
void act_mul_f32(float *x, long R, long stride, int n, int gelu) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        float *g = x + r * stride;
        const float *u = g + n;
        int i = 0;
        for (; i + VL <= n; i += VL) store(g + i, activation(load(g + i), gelu) * load(u + i));
        if (i < n) { /* the ragged end, through a padded vector */
            vf gv = splat(0.0f), uv = splat(0.0f);
            memcpy(&gv, g + i, (n - i) * sizeof(float));
            memcpy(&uv, u + i, (n - i) * sizeof(float));
            vf y = activation(gv, gelu) * uv;
            memcpy(g + i, &y, (n - i) * sizeof(float));
        }
    }
}

/* ---- the output head's logsumexp, chunk by chunk ------------------------------------------ */

/* lse[r] <- log(exp(lse[r]) + sum_j exp(z[r][j])) for R rows of n floats (row stride ldz):
 * one more vocabulary chunk merged into each row's running logsumexp (start from -inf). */
void logsumexp_merge_f32(const float *z, long R, long n, long ldz, float *lse) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *row = z + r * ldz;
        vf m = splat(lse[r]);
        long j = 0;
        for (; j + VL <= n; j += VL) {
            vf x = load(row + j);
            m = blend(x > m, x, m);
        }
        float mx = hmax(m);
        for (; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        vf sum = splat(0.0f);
        for (j = 0; j + VL <= n; j += VL) sum += exp_nonpositive(load(row + j) - mx);
        float total = hsum(sum);
        for (; j < n; j++) total += exp_nonpositive(splat(row[j] - mx))[0];
        total += exp_nonpositive(splat(lse[r] - mx))[0];
        lse[r] = mx + logf(total);
    }
}
