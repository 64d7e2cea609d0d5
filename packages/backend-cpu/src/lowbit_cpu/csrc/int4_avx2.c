/* lowbit CPU kernels for x86-64 AVX2 + FMA + F16C: fused int4 GEMV / skinny GEMM, and tile
 * dequantization for the prefill path.
 *
 * Weight layout "nib64", made once at load by lowbit_cpu.native.pack_nibbles():
 *   packed  uint8 [N, K/2]: each run of 64 input columns k0..k0+63 of row n is 32 bytes, read
 *           as 16 little-endian uint16 lanes; lane j holds column k0+j in bits 0-3, k0+16+j in
 *           bits 4-7, k0+32+j in bits 8-11 and k0+48+j in bits 12-15. One 256-bit load then
 *           yields four vectors of 16 codes with shifts and masks only (no shuffles).
 *   scales  float32 [N, NG]   (NG = K / group)
 *   zs      float32 [N, NG]   zero * scale, so  w[n, k] = q * s - z * s
 * K is a multiple of 64; group is 32, 64, 128 or K.
 *
 *   y[m, n] = sum_g ( s[n,g] * dot(q[n, g], x[m, g]) - zs[n,g] * sum(x[m, g]) ) + bias[n]
 *
 * Two decode paths: int16 activations (bf16/fp16 callers; vpmaddwd, 7 SIMD ops per 32 weights)
 * and fp32 activations (fp32 callers; float FMAs). Built with gcc -O3 -mavx2 -mfma -mf16c
 * -fopenmp and loaded with ctypes; no Python or torch headers needed.
 */
#include <immintrin.h>
#include <stdint.h>

/* activation / output dtypes: 0 float32, 1 bfloat16, 2 float16 */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

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

/* 64 codes from 32 bytes: n0 = columns 0-15, n1 = 16-31, n2 = 32-47, n3 = 48-63 (uint16 lanes) */
static inline void nib64(const uint8_t *p, __m256i *n0, __m256i *n1, __m256i *n2, __m256i *n3) {
    const __m256i mask = _mm256_set1_epi16(0x000F);
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *n0 = _mm256_and_si256(v, mask);
    *n1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    *n2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), mask);
    *n3 = _mm256_srli_epi16(v, 12);
}

/* 16 uint16 codes → two vectors of 8 floats */
static inline void u16_to_ps(__m256i v, __m256 *a, __m256 *b) {
    *a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)));
    *b = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
}

/* ---- fp32 activations ----------------------------------------------------------------------
 * MB rows of x against weight row n. Per 64 columns the two 32-column halves are accumulated
 * apart and scaled by their group's scale, so every group size >= 32 runs the same loop.
 */
static inline __attribute__((always_inline)) void row_f32(
    int MB, const float *x, int64_t ldx, const float *xsum, int ng, const uint8_t *wrow, const float *srow,
    const float *zsrow, int group, int64_t K, float *y, const float *bias, int64_t ldy, int64_t n) {
    __m256 acc[4];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m256i n0, n1, n2, n3;
        nib64(wrow + k / 2, &n0, &n1, &n2, &n3);
        __m256 w[8];
        u16_to_ps(n0, &w[0], &w[1]);
        u16_to_ps(n1, &w[2], &w[3]);
        u16_to_ps(n2, &w[4], &w[5]);
        u16_to_ps(n3, &w[6], &w[7]);
        const __m256 slo = _mm256_set1_ps(srow[k / group]), shi = _mm256_set1_ps(srow[(k + 32) / group]);
        for (int m = 0; m < MB; ++m) {
            const float *xm = x + m * ldx + k;
            __m256 lo = _mm256_mul_ps(w[0], _mm256_loadu_ps(xm));
            __m256 hi = _mm256_mul_ps(w[4], _mm256_loadu_ps(xm + 32));
            lo = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm + 8), lo);
            hi = _mm256_fmadd_ps(w[5], _mm256_loadu_ps(xm + 40), hi);
            lo = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), lo);
            hi = _mm256_fmadd_ps(w[6], _mm256_loadu_ps(xm + 48), hi);
            lo = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), lo);
            hi = _mm256_fmadd_ps(w[7], _mm256_loadu_ps(xm + 56), hi);
            acc[m] = _mm256_fmadd_ps(lo, slo, acc[m]);
            acc[m] = _mm256_fmadd_ps(hi, shi, acc[m]);
        }
    }
    const float bn = bias ? bias[n] : 0.f;
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * ng + g];
        y[m * ldy + n] = hsum256(acc[m]) - corr + bn;
    }
}

/* y [M, N] float32 = x [M, K] float32 @ W^T + bias; scratch: M * NG floats */
void lowbit_int4_linear_f32(const float *x, float *y, const float *bias, const uint8_t *packed, const float *scales,
                            const float *zs, int64_t M, int64_t N, int64_t K, int64_t group, void *scratch,
                            int nthreads) {
    const int ng = (int)(K / group);
    float *xsum = (float *)scratch;
    for (int64_t m = 0; m < M; ++m)
        for (int g = 0; g < ng; ++g) {
            __m256 s = _mm256_setzero_ps();
            for (int64_t k = (int64_t)g * group; k < (int64_t)(g + 1) * group; k += 8)
                s = _mm256_add_ps(s, _mm256_loadu_ps(x + m * K + k));
            xsum[m * ng + g] = hsum256(s);
        }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        const float *srow = scales + n * ng, *zsrow = zs + n * ng;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_f32(4, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, K, y + m * N, bias, N, n);
        switch (M - m) {
        case 3: row_f32(3, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, K, y + m * N, bias, N, n); break;
        case 2: row_f32(2, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, K, y + m * N, bias, N, n); break;
        case 1: row_f32(1, x + m * K, K, xsum + m * ng, ng, wrow, srow, zsrow, (int)group, K, y + m * N, bias, N, n); break;
        default: break;
        }
    }
}

/* out [n1 - n0, K] float32 = dequantized rows n0..n1 of the weight (the prefill path) */
void lowbit_int4_dequant(const uint8_t *packed, const float *scales, const float *zs, float *out,
                         int64_t n0, int64_t n1, int64_t K, int64_t group, int nthreads) {
    const int64_t ng = K / group;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        float *orow = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k += 64) {
            __m256i q[4];
            nib64(wrow + k / 2, &q[0], &q[1], &q[2], &q[3]);
            for (int h = 0; h < 4; ++h) {
                const int64_t g = n * ng + (k + 16 * h) / group;
                const __m256 vs = _mm256_set1_ps(scales[g]), vz = _mm256_set1_ps(zs[g]);
                __m256 a, b;
                u16_to_ps(q[h], &a, &b);
                _mm256_storeu_ps(orow + k + 16 * h, _mm256_fmsub_ps(a, vs, vz));
                _mm256_storeu_ps(orow + k + 16 * h + 8, _mm256_fmsub_ps(b, vs, vz));
            }
        }
    }
}

/* 8 floats → 8 bf16 (round to nearest even; the weights are finite) in the low 128 bits */
static inline __m128i ps_to_bf16(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

/* out [n1 - n0, K] bfloat16 = dequantized rows n0..n1 (the prefill path where bf16 matmuls run on AMX):
 * one pass, half the bytes of the fp32 tile, and no separate cast before the matmul */
void lowbit_int4_dequant_bf16(const uint8_t *packed, const float *scales, const float *zs, uint16_t *out,
                              int64_t n0, int64_t n1, int64_t K, int64_t group, int nthreads) {
    const int64_t ng = K / group;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        uint16_t *orow = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k += 64) {
            __m256i q[4];
            nib64(wrow + k / 2, &q[0], &q[1], &q[2], &q[3]);
            for (int h = 0; h < 4; ++h) {
                const int64_t g = n * ng + (k + 16 * h) / group;
                const __m256 vs = _mm256_set1_ps(scales[g]), vz = _mm256_set1_ps(zs[g]);
                __m256 a, b;
                u16_to_ps(q[h], &a, &b);
                _mm_storeu_si128((__m128i *)(orow + k + 16 * h), ps_to_bf16(_mm256_fmsub_ps(a, vs, vz)));
                _mm_storeu_si128((__m128i *)(orow + k + 16 * h + 8), ps_to_bf16(_mm256_fmsub_ps(b, vs, vz)));
            }
        }
    }
}

/* ---- int16 activations (bf16 / fp16 callers) -----------------------------------------------
 * x is rounded to int16 with one scale per (row, block of `block` columns), block | group, so a
 * row's dot product runs on vpmaddwd. The rounding error is at most 2^-16 of the block's
 * max |x|, far below the 2^-9 (bf16) / 2^-12 (fp16) precision the activations arrive with.
 * Sums within a block of <= 128 columns fit int32: 15 * 32767 * 128 < 2^31.
 */

/* xq [M, K] int16, xscale [M, K/block], xsum [M, K/group] = per-group sums of the rounded x;
 * x is [M, K] of dtype dt */
void lowbit_quant_x_i16(const void *x, int dt, int16_t *xq, float *xscale, float *xsum, int64_t M, int64_t K,
                        int64_t block, int64_t group) {
    const int64_t nb = K / block, ng = K / group, bpg = group / block;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t xb = m * K + b * block;
            __m256 mx = _mm256_setzero_ps();
            for (int64_t k = 0; k < block; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x, dt, xb + k), absmask));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const float sc = amax > 0.f ? amax / 32767.f : 1.f;
            const __m256 inv = _mm256_set1_ps(1.f / sc);
            __m256i isum = _mm256_setzero_si256();
            int16_t *qb = xq + xb;
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

#define MADD(acc, w, xp) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(xp))))

/* MB rows of x against weight row n. Pointers advance by fixed steps; with block >= 64 the int32
 * sums run over a whole block before one float FMA; block 32 (group 32) splits each 64 columns
 * into its two groups. */
static inline __attribute__((always_inline)) void row_i16(
    int MB, const int16_t *xq, int64_t ldx, const float *xscale, int nb, const float *xsum, int ng,
    const uint8_t *wrow, const float *srow, const float *zsrow, int block, int bpg, void *y, int ydt,
    float bias, int64_t ldy, int64_t n) {
    __m256 accf[4];
    for (int m = 0; m < MB; ++m) accf[m] = _mm256_setzero_ps();
    const uint8_t *wp = wrow;
    const int16_t *xp = xq;
    if (block == 32) {
        for (int g = 0; g < ng; g += 2, wp += 32, xp += 64) {
            __m256i n0, n1, n2, n3;
            nib64(wp, &n0, &n1, &n2, &n3);
            const float s0 = srow[g], s1 = srow[g + 1];
            for (int m = 0; m < MB; ++m) {
                const int16_t *xm = xp + m * ldx;
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                MADD(lo, n0, xm);
                MADD(lo, n1, xm + 16);
                MADD(hi, n2, xm + 32);
                MADD(hi, n3, xm + 48);
                accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(s0 * xscale[m * nb + g]), accf[m]);
                accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(s1 * xscale[m * nb + g + 1]), accf[m]);
            }
        }
    } else {
        int b = 0;
        for (int g = 0; g < ng; ++g) {
            const float s = srow[g];
            for (int bb = 0; bb < bpg; ++bb, ++b) {
                __m256i a0[4], a1[4];
                for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_si256();
                #pragma GCC unroll 2
                for (int j = 0; j < block; j += 64, wp += 32, xp += 64) {
                    __m256i n0, n1, n2, n3;
                    nib64(wp, &n0, &n1, &n2, &n3);
                    for (int m = 0; m < MB; ++m) {
                        const int16_t *xm = xp + m * ldx;
                        MADD(a0[m], n0, xm);
                        MADD(a1[m], n1, xm + 16);
                        MADD(a0[m], n2, xm + 32);
                        MADD(a1[m], n3, xm + 48);
                    }
                }
                for (int m = 0; m < MB; ++m)
                    accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], a1[m])),
                                              _mm256_set1_ps(s * xscale[m * nb + b]), accf[m]);
            }
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
