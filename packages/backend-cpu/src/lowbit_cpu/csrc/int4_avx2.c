/* lowbit CPU kernels for x86-64 AVX2 + FMA: fused int4 GEMV/skinny GEMM and tile dequantization.
 *
 * Weight layout ("lowbit-avx2-nib32"), made once at load by lowbit_cpu.avx2.pack():
 *   packed  uint8 [N, K/2]: for each run of 32 input columns k0..k0+31 of row n, 16 bytes;
 *           byte j holds column k0+j in its low nibble and column k0+16+j in its high nibble.
 *   scales  float32 [N, NG]   (NG = K / group)
 *   zs      float32 [N, NG]   zero * scale, so  w[n, k] = q * s - z * s
 * group is a multiple of 32 and divides K.
 *
 *   y[m, n] = sum_g ( s[n,g] * dot(q[n, g], x[m, g]) - zs[n,g] * sum(x[m, g]) )
 *
 * Activations and outputs are float32 (the Python side converts at the boundary). Built with
 * gcc -O3 -mavx2 -mfma -fopenmp and loaded with ctypes; no Python or torch headers needed.
 */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

/* decode 32 codes from 16 bytes into four vectors of 8 floats */
static inline void decode32(const uint8_t *p, __m256 *w0, __m256 *w1, __m256 *w2, __m256 *w3) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(v, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    *w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    *w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    *w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    *w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

/* MB rows of x against one weight row n; MB is a compile-time constant after inlining.
 * Two independent FMA chains per row of x hide the FMA latency (one chain per row is
 * latency-bound at MB = 1). */
static inline __attribute__((always_inline)) void row_mb(
    int MB, const float *x, int64_t ldx, const float *xsum, int ng, const uint8_t *wrow,
    const float *srow, const float *zsrow, int group, float *y, int64_t ldy, int64_t n) {
    float out[4] = {0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < ng; ++g) {
        __m256 a0[4], a1[4];
        for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
        const int kb = g * group;
        for (int k = kb; k < kb + group; k += 32) {
            __m256 w0, w1, w2, w3;
            decode32(wrow + k / 2, &w0, &w1, &w2, &w3);
            for (int m = 0; m < MB; ++m) {
                const float *xm = x + m * ldx + k;
                a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[m]);
                a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[m]);
                a0[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a0[m]);
                a1[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a1[m]);
            }
        }
        const float s = srow[g], zs = zsrow[g];
        for (int m = 0; m < MB; ++m) out[m] += s * hsum256(_mm256_add_ps(a0[m], a1[m])) - zs * xsum[m * ng + g];
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = out[m];
}

/* one row of x, four FMA chains */
static inline void row_1(const float *x, const float *xsum, int ng, const uint8_t *wrow, const float *srow,
                         const float *zsrow, int group, float *y, int64_t n) {
    float out = 0.f;
    for (int g = 0; g < ng; ++g) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const int kb = g * group;
        for (int k = kb; k < kb + group; k += 32) {
            __m256 w0, w1, w2, w3;
            decode32(wrow + k / 2, &w0, &w1, &w2, &w3);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + k + 24), a3);
        }
        out += srow[g] * hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) - zsrow[g] * xsum[g];
    }
    y[n] = out;
}

/* y [M, N] = x [M, K] @ W^T ; xsum [M, NG] = per-group sums of x (computed by the caller) */
void lowbit_int4_gemm(const float *x, const float *xsum, const uint8_t *packed, const float *scales,
                      const float *zs, float *y, int64_t M, int64_t N, int64_t K, int64_t group,
                      int nthreads) {
    const int ng = (int)(K / group);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        const float *srow = scales + n * ng, *zsrow = zs + n * ng;
        if (M == 1) {
            row_1(x, xsum, ng, wrow, srow, zsrow, (int)group, y, n);
            continue;
        }
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_mb(4, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, y + m * N, N, n);
        switch (M - m) {
        case 3: row_mb(3, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, y + m * N, N, n); break;
        case 2: row_mb(2, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, y + m * N, N, n); break;
        case 1: row_mb(1, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, y + m * N, N, n); break;
        default: break;
        }
    }
}

/* out [n1 - n0, K] float32 = dequantized rows n0..n1 of the weight (for the prefill path) */
void lowbit_int4_dequant(const uint8_t *packed, const float *scales, const float *zs, float *out,
                         int64_t n0, int64_t n1, int64_t K, int64_t group, int nthreads) {
    const int ng = (int)(K / group);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        float *orow = out + (n - n0) * K;
        for (int g = 0; g < ng; ++g) {
            const __m256 vs = _mm256_set1_ps(scales[n * ng + g]);
            const __m256 vz = _mm256_set1_ps(zs[n * ng + g]);
            for (int64_t k = (int64_t)g * group; k < (int64_t)(g + 1) * group; k += 32) {
                __m256 w0, w1, w2, w3;
                decode32(wrow + k / 2, &w0, &w1, &w2, &w3);
                _mm256_storeu_ps(orow + k, _mm256_fmsub_ps(w0, vs, vz));
                _mm256_storeu_ps(orow + k + 8, _mm256_fmsub_ps(w1, vs, vz));
                _mm256_storeu_ps(orow + k + 16, _mm256_fmsub_ps(w2, vs, vz));
                _mm256_storeu_ps(orow + k + 24, _mm256_fmsub_ps(w3, vs, vz));
            }
        }
    }
}

/* ---- 16-bit activation path (bf16 / fp16 activations) -------------------------------------
 * x is rounded to int16 with one scale per (row, block of `block` columns), block | group,
 * so a row's dot product runs on vpmaddwd: 9 SIMD ops per 32 weights instead of 17 for the
 * float path. The rounding error is at most 2^-16 of the block's max |x|, far below the
 * 2^-9 (bf16) / 2^-12 (fp16) precision the activations arrive with.
 */

/* activation / output dtypes: 0 float32, 1 bfloat16, 2 float16 */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline __m256 load8(const void *x, int dt, int64_t i) {
    if (dt == DT_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_loadu_ps((const float *)x + i);
}

static inline void store1(void *y, int dt, int64_t i, float v) {
    if (dt == DT_BF16) {
        union { float f; uint32_t u; } c = {v};
        uint32_t u = c.u;
        if ((u & 0x7F800000u) != 0x7F800000u) u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
        ((uint16_t *)y)[i] = (uint16_t)(u >> 16);
    } else if (dt == DT_F16) {
        ((uint16_t *)y)[i] = (uint16_t)_cvtss_sh(v, 0);
    } else {
        ((float *)y)[i] = v;
    }
}

/* xq [M, K] int16, xscale [M, K/block], xsum [M, K/group] = per-group sums of the rounded x;
 * x is [M, K] of dtype dt */
void lowbit_quant_x_i16(const void *x, int dt, int16_t *xq, float *xscale, float *xsum, int64_t M, int64_t K,
                        int64_t block, int64_t group) {
    const int64_t nb = K / block, ng = K / group, bpg = group / block;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t xb = m * K + b * block;
            __m256 mx = _mm256_setzero_ps();
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
            for (int64_t k = 0; k < block; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x, dt, xb + k), absmask));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const float sc = amax > 0.f ? amax / 32767.f : 1.f;
            const __m256 inv = _mm256_set1_ps(1.f / sc);
            __m256i isum = _mm256_setzero_si256();
            int16_t *qb = xq + m * K + b * block;
            for (int64_t k = 0; k < block; k += 16) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, dt, xb + k), inv));
                __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, dt, xb + k + 8), inv));
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(a, c));
                __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
                _mm256_storeu_si256((__m256i *)(qb + k), p);
            }
            xscale[m * nb + b] = sc;
            xsum[m * ng + b / bpg] += sc * hsum256(_mm256_cvtepi32_ps(isum));
        }
    }
}

static inline void decode32_i16(const uint8_t *p, __m256i *lo16, __m256i *hi16) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    *lo16 = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
    *hi16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
}

/* MB rows of x against weight row n. Pointers advance by fixed steps (no index arithmetic or
 * division in the loop); groups outer, blocks of one x scale inner. */
static inline __attribute__((always_inline)) void row_i16(
    int MB, const int16_t *xq, int64_t ldx, const float *xscale, int nb, const float *xsum, int ng,
    const uint8_t *wrow, const float *srow, const float *zsrow, int block, int bpg, void *y, int ydt,
    float bias, int64_t ldy, int64_t n) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256 accf[4];
    for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
    const uint8_t *wp = wrow;
    const int16_t *xp = xq;
    int b = 0;
    for (int g = 0; g < ng; ++g) {
        const float s = srow[g];
        for (int bb = 0; bb < bpg; ++bb, ++b) {
            __m256i a0[4], a1[4];
            for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_si256();
            #pragma GCC unroll 4
            for (int j = 0; j < block; j += 32, wp += 16, xp += 32) {
                const __m128i v = _mm_loadu_si128((const __m128i *)wp);
                const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
                const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
                for (int m = 0; m < MB; ++m) {
                    const int16_t *xm = xp + m * ldx;
                    a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xm)));
                    a1[m] = _mm256_add_epi32(a1[m], _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xm + 16))));
                }
            }
            for (int m = 0; m < MB; ++m)
                accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], a1[m])),
                                          _mm256_set1_ps(s * xscale[m * nb + b]), accf[m]);
        }
    }
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * ng + g];
        store1(y, ydt, m * ldy + n, hsum256(accf[m]) - corr + bias);
    }
}

/* y [M, N] (dtype ydt) = x [M, K] (dtype xdt) @ W^T + bias, through int16 activations.
 * scratch: at least M*K*2 + M*(K/block + K/group)*4 bytes. */
void lowbit_int4_linear_i16(const void *x, int xdt, void *y, int ydt, const float *bias, const uint8_t *packed,
                            const float *scales, const float *zs, int64_t M, int64_t N, int64_t K, int64_t group,
                            int64_t block, void *scratch, int nthreads) {
    const int ng = (int)(K / group), nb = (int)(K / block), bpg = (int)(group / block);
    int16_t *xq = (int16_t *)scratch;
    float *xscale = (float *)(xq + M * K);
    float *xsum = xscale + M * nb;
    lowbit_quant_x_i16(x, xdt, xq, xscale, xsum, M, K, block, group);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        const float *srow = scales + n * ng, *zsrow = zs + n * ng;
        const float bn = bias ? bias[n] : 0.f;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_i16(4, xq + m * K, K, xscale + m * nb, nb, xsum + m * ng, ng, wrow, srow, zsrow, (int)block, bpg, y, ydt, bn, N, m * N + n);
        switch (M - m) {
        case 3: row_i16(3, xq + m * K, K, xscale + m * nb, nb, xsum + m * ng, ng, wrow, srow, zsrow, (int)block, bpg, y, ydt, bn, N, m * N + n); break;
        case 2: row_i16(2, xq + m * K, K, xscale + m * nb, nb, xsum + m * ng, ng, wrow, srow, zsrow, (int)block, bpg, y, ydt, bn, N, m * N + n); break;
        case 1: row_i16(1, xq + m * K, K, xscale + m * nb, nb, xsum + m * ng, ng, wrow, srow, zsrow, (int)block, bpg, y, ydt, bn, N, m * N + n); break;
        default: break;
        }
    }
}
