/* lowbit CPU kernel for x86-64 AVX-512 VNNI: int4 weights x int8 activations, int32 dot products
 * with VPDPBUSD (u8 x s8, four products summed per int32 lane), for decode (few activation rows).
 *
 * Weights use the same "nib64" layout as int4_avx2.c (made once by lowbit_cpu.native.pack_nibbles):
 * 32 bytes per run of 64 input columns, byte 2j = c[j] | c[16+j] << 4, byte 2j+1 = c[32+j] | c[48+j] << 4.
 * Read as bytes, the low nibbles of a run are columns (0,32,1,33,...,15,47) and the high nibbles
 * (16,48,17,49,...,31,63): a fixed permutation of the run. The activations are quantized per call into
 * a scratch buffer in that same permuted order, so one AND (low) and one shift + AND (high) give
 * 64 unsigned codes that line up byte for byte with 64 signed activations: no shuffles on the weight path.
 *
 * Activations: one symmetric int8 scale per (row, run of 64 columns): q = round(x / s), s = max|x| / 127.
 * The rounding error per element is at most s / 2 (= max|x| / 254 of its run).
 *
 *   y[m, n] = sum_r ws[n, g(r)] * xs[m, r] * dot(q_w[n, r], q_x[m, r]) - sum_g zs[n, g] * xsum[m, g] + bias[n]
 *
 * with xsum[m, g] the group's sum of the dequantized int8 activations (the zero point's correction uses
 * exactly the values the dot product used). Runs are processed in pairs (one 512-bit load of 64 weight
 * bytes = 128 columns); int32 lanes 0-7 belong to the pair's first run and 8-15 to its second. A trailing
 * odd run uses 256-bit VNNI (AVX512VL). Group size 64, 128 or K (per channel); the dot product of a run
 * stays in int32 (64 * 15 * 127 < 2^31) and is scaled into fp32 once per run.
 *
 * Built with gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512vnni (plus AVX2/FMA/F16C) -fopenmp and
 * loaded only where the CPU reports avx512_vnni/avx512bw/avx512vl (lowbit_cpu.native.vnni_unavailable_reason).
 */
#include <immintrin.h>
#include <stdint.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline __m512 load16(const void *x, int dt, int64_t i) {
    if (dt == DT_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (dt == DT_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)));
    return _mm512_loadu_ps((const float *)x + i);
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

/* Offset (bytes, within a row of K int8) of run r's low-nibble half; its high half follows at +64
 * inside a full pair, at +32 for a trailing odd run. */
static inline int64_t lo_offset(int64_t r, int64_t nr) {
    const int64_t p = r / 2;
    return (2 * p + 1 < nr) ? p * 128 + (r & 1) * 32 : p * 128;
}
static inline int64_t hi_offset(int64_t r, int64_t nr) {
    const int64_t p = r / 2;
    return (2 * p + 1 < nr) ? p * 128 + 64 + (r & 1) * 32 : p * 128 + 32;
}

/* x [M, K] (dtype dt) → x8 [M, K] int8 (in the permuted pair layout of the int4 kernel, or in column
 * order with natural != 0: the int8-weight kernel), xs [M, K/64] run scales, xsum [M, K/group] group
 * sums of the dequantized int8 values. */
void lowbit_vnni_quant_x(const void *x, int dt, int8_t *x8, float *xs, float *xsum, int64_t M, int64_t K,
                         int64_t group, int natural) {
    const int64_t nr = K / 64, ng = K / group, rpg = group / 64;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
        for (int64_t r = 0; r < nr; ++r) {
            const int64_t xi = m * K + r * 64;
            __m512 v[4];
            __m512 mx = _mm512_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = load16(x, dt, xi + 16 * i);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v[i]));
            }
            const float amax = _mm512_reduce_max_ps(mx);
            const float sc = amax > 0.f ? amax / 127.f : 1.f;
            const __m512 inv = _mm512_set1_ps(1.f / sc);
            __m512i q[4];
            __m512i isum = _mm512_setzero_si512();
            for (int i = 0; i < 4; ++i) {
                q[i] = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
                q[i] = _mm512_max_epi32(_mm512_min_epi32(q[i], _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                isum = _mm512_add_epi32(isum, q[i]);
            }
            const __m128i a = _mm512_cvtepi32_epi8(q[0]), b = _mm512_cvtepi32_epi8(q[1]);
            const __m128i c = _mm512_cvtepi32_epi8(q[2]), d = _mm512_cvtepi32_epi8(q[3]);
            int8_t *row = x8 + m * K;
            if (natural) {
                _mm_storeu_si128((__m128i *)(row + r * 64), a);
                _mm_storeu_si128((__m128i *)(row + r * 64 + 16), b);
                _mm_storeu_si128((__m128i *)(row + r * 64 + 32), c);
                _mm_storeu_si128((__m128i *)(row + r * 64 + 48), d);
                xs[m * nr + r] = sc;
                xsum[m * ng + r / rpg] += sc * (float)_mm512_reduce_add_epi32(isum);
                continue;
            }
            int8_t *lo = row + lo_offset(r, nr), *hi = row + hi_offset(r, nr);
            _mm_storeu_si128((__m128i *)lo, _mm_unpacklo_epi8(a, c));        /* cols 0,32,1,33,...,7,39 */
            _mm_storeu_si128((__m128i *)(lo + 16), _mm_unpackhi_epi8(a, c)); /* cols 8,40,...,15,47 */
            _mm_storeu_si128((__m128i *)hi, _mm_unpacklo_epi8(b, d));        /* cols 16,48,...,23,55 */
            _mm_storeu_si128((__m128i *)(hi + 16), _mm_unpackhi_epi8(b, d)); /* cols 24,56,...,31,63 */
            xs[m * nr + r] = sc;
            xsum[m * ng + r / rpg] += sc * (float)_mm512_reduce_add_epi32(isum);
        }
    }
}

/* MB (<= 4) rows of x against weight row n; writes y[m * ldy + yoff] */
static inline __attribute__((always_inline)) void row_vnni(
    int MB, const int8_t *x8, int64_t K, const float *xs, int64_t nr, const float *xsum, int64_t ng,
    const uint8_t *wrow, const float *srow, const float *zsrow, int64_t group, void *y, int ydt, float bias,
    int64_t ldy, int64_t yoff) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[4];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= nr; r += 2) {
        const __m512i v = _mm512_loadu_si512((const void *)(wrow + r * 32));
        const __m512i lo = _mm512_and_si512(v, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const __m512 sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(srow[(r * 64) / group]),
                                               _mm512_set1_ps(srow[((r + 1) * 64) / group]));
        for (int m = 0; m < MB; ++m) {
            const int8_t *xp = x8 + m * K + r * 64;
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xp));
            d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(xp + 64)));
            const __m512 xv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[m * nr + r]),
                                                   _mm512_set1_ps(xs[m * nr + r + 1]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, xv), acc[m]);
        }
    }
    if (r < nr) { /* trailing odd run: 256-bit VNNI */
        const __m256i m4y = _mm256_set1_epi8(0x0F);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wrow + r * 32));
        const __m256i lo = _mm256_and_si256(v, m4y);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4y);
        const float s = srow[(r * 64) / group];
        for (int m = 0; m < MB; ++m) {
            const int8_t *xp = x8 + m * K + r * 64;
            __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xp));
            d = _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256((const __m256i *)(xp + 32)));
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[m * nr + r]));
            acc[m] = _mm512_add_ps(acc[m], _mm512_zextps256_ps512(f));
        }
    }
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int64_t g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * ng + g];
        store1(y, ydt, m * ldy + yoff, _mm512_reduce_add_ps(acc[m]) - corr + bias);
    }
}

/* y [M, N] (dtype ydt) = x [M, K] (dtype xdt) @ W^T + bias, int8 activations x int4 weights.
 * K % 64 == 0, group in {64, 128, K}; scratch: M*K + M*(K/64 + K/group)*4 bytes. */
void lowbit_int4_linear_vnni(const void *x, int xdt, void *y, int ydt, const float *bias, const uint8_t *packed,
                             const float *scales, const float *zs, int64_t M, int64_t N, int64_t K, int64_t group,
                             void *scratch, int nthreads) {
    const int64_t nr = K / 64, ng = K / group;
    int8_t *x8 = (int8_t *)scratch;
    float *xs = (float *)(x8 + M * K);
    float *xsum = xs + M * nr;
    lowbit_vnni_quant_x(x, xdt, x8, xs, xsum, M, K, group, 0);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        const float *srow = scales + n * ng, *zsrow = zs + n * ng;
        const float bn = bias ? bias[n] : 0.f;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_vnni(4, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n);
        switch (M - m) {
        case 3: row_vnni(3, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        case 2: row_vnni(2, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        case 1: row_vnni(1, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        default: break;
        }
    }
}

/* out [n1 - n0, K] bfloat16 = dequantized rows n0..n1 of the weight (the prefill path, bf16 matmul on AMX).
 * A table lookup instead of float arithmetic: per run of 64 columns, the 16 values j * s - z * s
 * (j = 0..15) of its group are rounded to bf16 once (round to nearest even, as a float-to-bf16 cast)
 * and VPERMW maps each 16-bit lane of codes to its value: 4 lookups per 64 weights. Same values as
 * dequantizing in fp32 and casting to bf16. */
void lowbit_int4_dequant_bf16_vnni(const uint8_t *packed, const float *scales, const float *zs, uint16_t *out,
                                   int64_t n0, int64_t n1, int64_t K, int64_t group, int nthreads) {
    const int64_t ng = K / group;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wrow = packed + n * (K / 2);
        uint16_t *orow = out + (n - n0) * K;
        const __m256i mask = _mm256_set1_epi16(0x000F);
        int64_t gcur = -1;
        __m256i table = _mm256_setzero_si256();
        for (int64_t k = 0; k < K; k += 64) {
            const int64_t g = k / group;
            if (g != gcur) {
                gcur = g;
                const __m512 v = _mm512_fmsub_ps(iota, _mm512_set1_ps(scales[n * ng + g]), _mm512_set1_ps(zs[n * ng + g]));
                __m512i u = _mm512_castps_si512(v);
                const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
                table = _mm512_cvtepi32_epi16(u);
            }
            const __m256i w = _mm256_loadu_si256((const __m256i *)(wrow + k / 2));
            const __m256i c0 = _mm256_and_si256(w, mask);
            const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
            const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(w, 8), mask);
            const __m256i c3 = _mm256_srli_epi16(w, 12);
            _mm256_storeu_si256((__m256i *)(orow + k), _mm256_permutexvar_epi16(c0, table));
            _mm256_storeu_si256((__m256i *)(orow + k + 16), _mm256_permutexvar_epi16(c1, table));
            _mm256_storeu_si256((__m256i *)(orow + k + 32), _mm256_permutexvar_epi16(c2, table));
            _mm256_storeu_si256((__m256i *)(orow + k + 48), _mm256_permutexvar_epi16(c3, table));
        }
    }
}

/* ---- 8-bit weights ---------------------------------------------------------------------------
 * codes uint8 [N, K] in column order (0..255, zero point z: w = (q - z) * s), activations int8 per run
 * of 64 columns as above but in column order: one 512-bit VPDPBUSD per run (64 * 255 * 127 < 2^31). */
static inline __attribute__((always_inline)) void row_vnni8(
    int MB, const int8_t *x8, int64_t K, const float *xs, int64_t nr, const float *xsum, int64_t ng,
    const uint8_t *wrow, const float *srow, const float *zsrow, int64_t group, void *y, int ydt, float bias,
    int64_t ldy, int64_t yoff) {
    __m512 acc[4];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t r = 0; r < nr; ++r) {
        const __m512i w = _mm512_loadu_si512((const void *)(wrow + r * 64));
        const float s = srow[(r * 64) / group];
        for (int m = 0; m < MB; ++m) {
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                  _mm512_loadu_si512((const void *)(x8 + m * K + r * 64)));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s * xs[m * nr + r]), acc[m]);
        }
    }
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int64_t g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * ng + g];
        store1(y, ydt, m * ldy + yoff, _mm512_reduce_add_ps(acc[m]) - corr + bias);
    }
}

/* y [M, N] (dtype ydt) = x [M, K] (dtype xdt) @ W^T + bias, int8 activations x 8-bit weights (codes [N, K]).
 * K % 64 == 0, group in {64, 128, K}; scratch: M*K + M*(K/64 + K/group)*4 bytes. */
void lowbit_int8_linear_vnni(const void *x, int xdt, void *y, int ydt, const float *bias, const uint8_t *codes,
                             const float *scales, const float *zs, int64_t M, int64_t N, int64_t K, int64_t group,
                             void *scratch, int nthreads) {
    const int64_t nr = K / 64, ng = K / group;
    int8_t *x8 = (int8_t *)scratch;
    float *xs = (float *)(x8 + M * K);
    float *xsum = xs + M * nr;
    lowbit_vnni_quant_x(x, xdt, x8, xs, xsum, M, K, group, 1);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *wrow = codes + n * K;
        const float *srow = scales + n * ng, *zsrow = zs + n * ng;
        const float bn = bias ? bias[n] : 0.f;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_vnni8(4, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n);
        switch (M - m) {
        case 3: row_vnni8(3, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        case 2: row_vnni8(2, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        case 1: row_vnni8(1, x8 + m * K, K, xs + m * nr, nr, xsum + m * ng, ng, wrow, srow, zsrow, group, y, ydt, bn, N, m * N + n); break;
        default: break;
        }
    }
}
