/* lowbit native decoder: a whole Llama-style model (Llama, Mistral, Qwen2, Qwen3) per call, no Python
 * between the ops. One OpenMP parallel region per call (one persistent thread team for all layers of
 * the token or prompt chunk); the ops inside it are work-shared loops separated by barriers.
 *
 * Per layer:  x += o_proj(attn(rope(qkv_proj(rmsnorm(x)))));  x += down(silu(gate(h)) * up(h)), h = rmsnorm(x)
 * with q/k/v and gate/up each one matrix (rows concatenated at load), int4 weights in the "nib64" layout
 * of int4_avx2.c (lowbit_cpu.native.pack_nibbles), fp16 scales and uint8 zero points per group as the checkpoint
 * stores them (3 bytes per group instead of the kernels' 8: 0.55 byte per weight at g64, not 0.625), widened
 * to fp32 per weight row as it is used (zero * scale is exact in fp32: 4 + 11 significant bits). The residual
 * stream, norms, RoPE, softmax and the KV cache are fp32.
 *
 * Two activation modes for the int4 matrices:
 *   ACT_F32  float FMAs on fp32 activations (the reference-exact path: as cpu.avx2_int4's fp32 path);
 *   ACT_I8   activations rounded to int8 per run of 64 columns (scale max|x|/127, as cpu.vnni_int4), int32
 *            dot products with the codes: VPDPBUSD where this file is built with AVX-512 VNNI, else AVX2
 *            VPMADDUBSW + VPMADDWD (15 * 127 * 2 < 2^15: no saturation). Both give the same int32 sums.
 * The float lm_head is fp32 or bf16 (the model's dtype); an int4 lm_head runs as the layers; an int8 one
 * (per channel, codes uint8) only in the VNNI build.
 *
 * Prompt chunks (M >= AMX_MIN_ROWS rows, int8 mode) on AMX (the VNNI build also gets -mamx-tile -mamx-int8
 * -mamx-bf16; Model.gemm picks the path per call):
 *   matrices: TDPBSUD per 16 rows x 16 weight rows x one run of 64 columns (2 x 2 such tiles per step),
 *     activations as int8 per 64 columns (as above) in A, a 16-row block of the weight unpacked from nib64 to
 *     uint8 in B (VNNI order, one 1 KiB tile per run, in a per-thread scratch, reused across the chunk), each
 *     tile's int32 sums scaled by the run's activation scale times the group's weight scale into fp32, the zero
 *     point as zero * scale * (group sum of the activations) once per group. The same int32 sums as the
 *     VPDPBUSD path, so the two agree but for the order of fp32 additions. The weights stay in their one
 *     resident layout (nib64); no second copy.
 *   attention: TDPBF16PS on keys, values, queries and probabilities rounded to bf16 (fp32 sums and softmax).
 *
 * Batched decode (lowbit_engine_forward_rows): one token of each of several sequences per call, each sequence in
 * its own slot of the KV cache ([slots][n_layers, n_kv, capacity, head_dim]); the matrices see the tokens as the
 * rows of one chunk (the AMX tiles from AMX_MIN_ROWS rows), so the weights are read once for all sequences.
 * Linux grants the tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM, lowbit_engine_amx_init); without it,
 * or without AMX, Model.gemm stays GEMM_ROWS (the row kernels; fp32 attention blocked 16 x 16 in this build).
 *
 * Built twice by lowbit_cpu.native: with -mavx2 -mfma -mf16c (no AVX-512 instruction anywhere) and with the
 * AVX-512 VNNI (and AMX) flags added; the Python side loads the one the CPU can run.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LB_VNNI 1
#else
#define LB_VNNI 0
#endif
#if LB_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define LB_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LB_AMX 0
#endif

enum { ACT_F32 = 0, ACT_I8 = 1 };
enum { MAX_GROUPS = 1024 }; /* groups per weight row (checked by lowbit_cpu.engine) */
enum { HEAD_F32 = 0, HEAD_BF16 = 1, HEAD_INT4 = 2, HEAD_INT8 = 3 };
/* Model.gemm: how int8-activation matrices with more than one row run (one row always runs row_i8) */
enum { GEMM_ROWS = 0, GEMM_AMX = 1 };
/* fewer rows: the row kernels (below this the AMX path's per-call unpack of every weight block costs more than the
 * row kernels' per-row reads; the crossover was measured by batched decode, see benchmarks/cpu/RESULTS.md) */
enum { AMX_MIN_ROWS = 12 };

typedef struct {
    int64_t n, k, group;
    const uint8_t *packed; /* [n, k/2] nib64, or [n, k] uint8 codes for HEAD_INT8 */
    const uint16_t *scales; /* [n, k/group] fp16 */
    const uint8_t *zeros;   /* [n, k/group] zero points */
    const float *bias;     /* [n] or NULL */
} QMat;

typedef struct {
    QMat qkv, o, gu, down;
    const float *in_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm;     /* [head_dim] (Qwen3) or NULL */
} Layer;

typedef struct {
    int64_t hidden, n_layers, n_heads, n_kv, head_dim, inter, vocab;
    int64_t capacity; /* KV cache positions */
    int64_t window;   /* sliding window (keys at p - window < j <= p), 0 = none */
    float eps, attn_scale;
    int act_mode, head_kind, embed_bf16, gemm;
    const void *embed;      /* [vocab, hidden] fp32 or bf16, or a QMat of int8 rows (embed_bf16 == EMBED_INT8) */
    const void *head;       /* float head [vocab, hidden] (fp32 or bf16), when head_kind is HEAD_F32/BF16 */
    QMat head_q;            /* when head_kind is HEAD_INT4/INT8 */
    const float *final_norm;
    const float *cos, *sin; /* [capacity, head_dim/2] */
    const Layer *layers;
    float *kcache, *vcache; /* [slots][n_layers, n_kv, capacity, head_dim] (slot 0 for one sequence) */
    double *prof;           /* NULL, or [PROF_N] seconds per op added up by thread 0 (wall time between barriers) */
} Model;

enum { PROF_EMBED, PROF_NORM, PROF_QKV, PROF_ROPE, PROF_ATTN, PROF_O, PROF_GU, PROF_ACT, PROF_DOWN, PROF_HEAD, PROF_N };
#define TICK(op)                                                        \
    do {                                                                \
        if (prof_on) {                                                  \
            const double t_ = omp_get_wtime();                          \
            md->prof[op] += t_ - t_last;                                \
            t_last = t_;                                                \
        }                                                               \
    } while (0)

/* ------------------------------------------------------------------------------------ helpers */

/* the first key a query at position p attends to: 0, or the start of the sliding window */
static inline int64_t first_key(const Model *md, int64_t p) {
    return md->window > 0 && p - md->window + 1 > 0 ? p - md->window + 1 : 0;
}

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float bf16_1(uint16_t h) {
    union { uint32_t u; float f; } c = {(uint32_t)h << 16};
    return c.f;
}

/* the thread's share [lo, hi) of n items in chunks of `align` (static, contiguous) */
static inline void share(int64_t n, int64_t align, int64_t *lo, int64_t *hi) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunks = (n + align - 1) / align;
    const int64_t c0 = chunks * t / nt, c1 = chunks * (t + 1) / nt;
    *lo = c0 * align < n ? c0 * align : n;
    *hi = c1 * align < n ? c1 * align : n;
}

/* ------------------------------------------------------------------------ int8 activations
 * Per row: x8 [K] int8 in the weight's nibble order, xs [K/64] run scales, xsum [K/group] group sums of the
 * dequantized int8 values. Order of a run's 64 columns in x8: its low-nibble half (columns 0,32,1,33,...,15,47)
 * then its high-nibble half (16,48,...,31,63); in the VNNI build two full runs r, r+1 are interleaved as
 * [r lo][r+1 lo][r hi][r+1 hi] so that one 512-bit load of 64 weight bytes lines up. */

static inline int64_t lo_off(int64_t r, int64_t nr) {
#if LB_VNNI
    const int64_t p = r / 2;
    return (2 * p + 1 < nr) ? p * 128 + (r & 1) * 32 : p * 128;
#else
    (void)nr;
    return r * 64;
#endif
}
static inline int64_t hi_off(int64_t r, int64_t nr) {
#if LB_VNNI
    const int64_t p = r / 2;
    return (2 * p + 1 < nr) ? p * 128 + 64 + (r & 1) * 32 : p * 128 + 32;
#else
    (void)nr;
    return r * 64 + 32;
#endif
}

static void quant_row(const float *x, int64_t K, int64_t group, int8_t *x8, float *xs, float *xsum) {
    const int64_t nr = K / 64, ng = K / group, rpg = group / 64;
    for (int64_t g = 0; g < ng; ++g) xsum[g] = 0.f;
    for (int64_t r = 0; r < nr; ++r) {
        const float *xr = x + r * 64;
        __m256 mx = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (int i = 0; i < 8; ++i) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xr + 8 * i), absmask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float sc = amax > 0.f ? amax / 127.f : 1.f;
        const __m256 inv = _mm256_set1_ps(1.f / sc);
        int8_t q[64];
        int32_t isum = 0;
        for (int i = 0; i < 8; ++i) {
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + 8 * i), inv)); /* nearest even */
            v = _mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, v);
            for (int j = 0; j < 8; ++j) {
                q[8 * i + j] = (int8_t)t[j];
                isum += t[j];
            }
        }
        int8_t *lo = x8 + lo_off(r, nr), *hi = x8 + hi_off(r, nr);
        for (int j = 0; j < 16; ++j) {
            lo[2 * j] = q[j];
            lo[2 * j + 1] = q[32 + j];
            hi[2 * j] = q[16 + j];
            hi[2 * j + 1] = q[48 + j];
        }
        xs[r] = sc;
        xsum[r / rpg] += sc * (float)isum;
    }
}

/* ------------------------------------------------------------------------ int4 row kernels */

/* MB rows of int8 activations against weight row n → y[m * ldy] (+= when accumulate) */
static inline __attribute__((always_inline)) void row_i8(int MB, const int8_t *x8, const float *xs,
                                                          const float *xsum, int64_t K, int64_t group,
                                                          const uint8_t *wrow, const float *srow, const float *zsrow,
                                                          float *y, int64_t ldy, float bias) {
    const int64_t nr = K / 64, ng = K / group;
    const int64_t xstride = K, sstride = nr, gstride = ng;
    float out[4];
#if LB_VNNI
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
            const int8_t *xp = x8 + m * xstride + r * 64;
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xp));
            d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(xp + 64)));
            const __m512 xv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[m * sstride + r]),
                                                   _mm512_set1_ps(xs[m * sstride + r + 1]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, xv), acc[m]);
        }
    }
    if (r < nr) {
        const __m256i m4y = _mm256_set1_epi8(0x0F);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wrow + r * 32));
        const __m256i lo = _mm256_and_si256(v, m4y);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4y);
        const float s = srow[(r * 64) / group];
        for (int m = 0; m < MB; ++m) {
            const int8_t *xp = x8 + m * xstride + r * 64;
            __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xp));
            d = _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256((const __m256i *)(xp + 32)));
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[m * sstride + r]));
            acc[m] = _mm512_add_ps(acc[m], _mm512_zextps256_ps512(f));
        }
    }
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t r = 0; r < nr; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wrow + r * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const float s = srow[(r * 64) / group];
        for (int m = 0; m < MB; ++m) {
            const int8_t *xp = x8 + m * xstride + r * 64;
            const __m256i a = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xp));
            const __m256i b = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xp + 32)));
            const __m256i d = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones); /* |a + b| <= 4 * 15 * 127 */
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s * xs[m * sstride + r]), acc[m]);
        }
    }
    for (int m = 0; m < MB; ++m) out[m] = hsum256(acc[m]);
#endif
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int64_t g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * gstride + g];
        y[m * ldy] = out[m] - corr + bias;
    }
}

/* MB rows of fp32 activations against weight row n: per group, s * dot(q, x) - zs * sum(x) */
static inline __attribute__((always_inline)) void row_f32(int MB, const float *x, const float *xsum, int64_t K,
                                                           int64_t group, const uint8_t *wrow, const float *srow,
                                                           const float *zsrow, float *y, int64_t ldy, float bias) {
    const int64_t ng = K / group;
    const __m256i mask = _mm256_set1_epi16(0x000F);
    __m256 acc[4], gacc[4];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        for (int m = 0; m < MB; ++m) gacc[m] = _mm256_setzero_ps();
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wrow + k0 / 2));
            __m256i c[4];
            c[0] = _mm256_and_si256(v, mask);
            c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), mask);
            c[3] = _mm256_srli_epi16(v, 12);
            for (int q = 0; q < 4; ++q) {
                const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(c[q])));
                const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(c[q], 1)));
                for (int m = 0; m < MB; ++m) {
                    const float *xp = x + m * K + k0 + 16 * q;
                    gacc[m] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xp), gacc[m]);
                    gacc[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xp + 8), gacc[m]);
                }
            }
        }
        const __m256 s = _mm256_set1_ps(srow[g]);
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(gacc[m], s, acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int64_t g = 0; g < ng; ++g) corr += zsrow[g] * xsum[m * ng + g];
        y[m * ldy] = hsum256(acc[m]) - corr + bias;
    }
}

#if LB_VNNI
/* 8-bit codes [n, k] (column order), activations int8 in column order */
static inline __attribute__((always_inline)) void row_i8w8(int MB, const int8_t *x8, const float *xs,
                                                            const float *xsum, int64_t K, int64_t group,
                                                            const uint8_t *wrow, const float *srow,
                                                            const float *zsrow, float *y, int64_t ldy, float bias) {
    const int64_t nr = K / 64, ng = K / group;
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
        y[m * ldy] = _mm512_reduce_add_ps(acc[m]) - corr + bias;
    }
}

static void quant_row_natural(const float *x, int64_t K, int64_t group, int8_t *x8, float *xs, float *xsum) {
    const int64_t nr = K / 64, ng = K / group, rpg = group / 64;
    for (int64_t g = 0; g < ng; ++g) xsum[g] = 0.f;
    for (int64_t r = 0; r < nr; ++r) {
        const __m512 a = _mm512_loadu_ps(x + r * 64), b = _mm512_loadu_ps(x + r * 64 + 16);
        const __m512 c = _mm512_loadu_ps(x + r * 64 + 32), d = _mm512_loadu_ps(x + r * 64 + 48);
        const __m512 mx = _mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)),
                                        _mm512_max_ps(_mm512_abs_ps(c), _mm512_abs_ps(d)));
        const float amax = _mm512_reduce_max_ps(mx);
        const float sc = amax > 0.f ? amax / 127.f : 1.f;
        const __m512 inv = _mm512_set1_ps(1.f / sc);
        const __m512 v[4] = {a, b, c, d};
        __m512i isum = _mm512_setzero_si512();
        for (int i = 0; i < 4; ++i) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            isum = _mm512_add_epi32(isum, q);
            _mm_storeu_si128((__m128i *)(x8 + r * 64 + 16 * i), _mm512_cvtepi32_epi8(q));
        }
        xs[r] = sc;
        xsum[r / rpg] += sc * (float)_mm512_reduce_add_epi32(isum);
    }
}
#endif

/* ------------------------------------------------------------------------ AMX-INT8 tiles (M > 1 rows) */

static inline size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }

/* per-thread AMX scratch for inputs of up to K columns: two weight blocks' B tiles [K/64][16][64], their scales
 * and zero * scale per group [K/64][16] (group >= 64), four int32 C tiles and their fp32 accumulators */
static size_t amx_thread_bytes(int64_t K) {
    return 2 * al64((size_t)K * 16) + 4 * al64(sizeof(float) * 16 * (size_t)(K / 64)) + 4096 + 4096;
}

#if LB_VNNI
/* 16 x 16 dwords, rows → columns (r[i] lane j becomes r[j] lane i) */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) { /* r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i u0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        const __m512i u2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
        t[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

#if LB_AMX
/* Ask Linux for the AMX tile state (XFEATURE_XTILEDATA = 18) for this process; 1 when granted. */
int lowbit_engine_amx_init(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileCfg;

static void amx_tile_config(void);

/* Weight rows n0 .. n0+nb-1 (nb <= 16; the rest of the block zero) → wb: per run of 64 columns one B tile in
 * the VNNI order (tile row k4 = columns 4k4 .. 4k4+3 of each of the 16 weight rows, as uint8 codes); per group
 * the rows' scales sv and zero * scale zv, [K/group][16]. */
static void amx_pack_block(const QMat *w, int w8, int64_t n0, int nb, uint8_t *wb, float *sv, float *zv) {
    const int64_t K = w->k, nr = K / 64, ng = K / w->group;
    const __m512i m4 = _mm512_set1_epi16(0x000F);
    for (int64_t r = 0; r < nr; ++r) {
        __m512i v[16];
        for (int i = 0; i < 16; ++i) {
            if (i >= nb) {
                v[i] = _mm512_setzero_si512();
            } else if (w8) {
                v[i] = _mm512_loadu_si512((const void *)(w->packed + (n0 + i) * K + r * 64));
            } else { /* nib64: u16 lane j holds columns j, 16+j, 32+j, 48+j in its four nibbles */
                const __m256i p = _mm256_loadu_si256((const __m256i *)(w->packed + (n0 + i) * (K / 2) + r * 32));
                const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1);
                const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(p, 8)),
                                                     _mm256_srli_epi16(p, 12), 1);
                v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_and_si512(a, m4))),
                                          _mm512_cvtepi16_epi8(_mm512_and_si512(b, m4)), 1);
            }
        }
        transpose16(v);
        for (int k4 = 0; k4 < 16; ++k4) _mm512_storeu_si512((void *)(wb + r * 1024 + k4 * 64), v[k4]);
    }
    for (int64_t g = 0; g < ng; ++g) {
        for (int i = 0; i < 16; ++i) {
            const float s = i < nb ? _cvtsh_ss(w->scales[(n0 + i) * ng + g]) : 0.f;
            sv[g * 16 + i] = s;
            zv[g * 16 + i] = i < nb ? s * (float)w->zeros[(n0 + i) * ng + g] : 0.f;
        }
    }
}

/* y [M, w->n] = x8 [M, K] @ W^T + bias on the tiles. The thread's share of the weight rows goes in blocks of 32 (two
 * B tiles per run), each unpacked once into its scratch ts and multiplied by every 32-row block of x8 (two A
 * tiles): four independent C tiles per run of 64 columns, each scaled into fp32 accumulators (weight scale of the
 * group x activation scale of the run). Rows past M are padding in the scratch, computed and not stored. No
 * barrier at the end. */
static void qmatmul_amx(const QMat *w, int64_t M, const int8_t *x8, const float *xsall, const float *xsumall,
                        float *y, int w8, char *ts) {
    const int64_t K = w->k, N = w->n, nr = K / 64, ng = K / w->group, rpg = w->group / 64;
    const size_t wbytes = al64((size_t)K * 16), sbytes = al64(sizeof(float) * 16 * (size_t)nr);
    uint8_t *wb[2] = {(uint8_t *)ts, (uint8_t *)ts + wbytes};
    float *sv[2] = {(float *)(ts + 2 * wbytes), (float *)(ts + 2 * wbytes + sbytes)};
    float *zv[2] = {(float *)(ts + 2 * wbytes + 2 * sbytes), (float *)(ts + 2 * wbytes + 3 * sbytes)};
    int32_t *cb = (int32_t *)(ts + 2 * wbytes + 4 * sbytes);       /* [4][16][16] */
    float *acc = (float *)(ts + 2 * wbytes + 4 * sbytes + 4096);   /* [4][16][16]: tile t = 2 * (m half) + n half */
    amx_tile_config();
    int64_t n0s, n1s;
    share(N, 16, &n0s, &n1s);
    for (int64_t n0 = n0s; n0 < n1s; n0 += 32) {
        int nb[2];
        nb[0] = (int)(n1s - n0 < 16 ? n1s - n0 : 16);
        nb[1] = (int)(n1s - n0 - 16 <= 0 ? 0 : (n1s - n0 - 16 < 16 ? n1s - n0 - 16 : 16));
        for (int h = 0; h < 2; ++h) amx_pack_block(w, w8, n0 + 16 * h, nb[h], wb[h], sv[h], zv[h]);
        __asm__ __volatile__("" ::: "memory"); /* the tile loads below are asm without a memory clobber */
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
            memset(acc, 0, sizeof(float) * 1024);
            for (int64_t r = 0; r < nr; ++r) {
                const int8_t *xa = x8 + m0 * K + r * 64;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                _tile_loadd(4, xa, K);
                _tile_loadd(5, xa + 16 * K, K);
                _tile_loadd(6, wb[0] + r * 1024, 64);
                _tile_loadd(7, wb[1] + r * 1024, 64);
                _tile_dpbsud(0, 4, 6);
                _tile_dpbsud(1, 4, 7);
                _tile_dpbsud(2, 5, 6);
                _tile_dpbsud(3, 5, 7);
                _tile_stored(0, cb, 64);
                _tile_stored(1, cb + 256, 64);
                _tile_stored(2, cb + 512, 64);
                _tile_stored(3, cb + 768, 64);
                const int64_t g = r / rpg;
                for (int t = 0; t < 4; ++t) {
                    const __m512 s = _mm512_loadu_ps(sv[t & 1] + g * 16);
                    const float *xs = xsall + (m0 + 16 * (t >> 1)) * nr + r;
                    const int32_t *c = cb + t * 256;
                    float *a = acc + t * 256;
                    for (int i = 0; i < 16; ++i)
                        _mm512_storeu_ps(a + i * 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(c + i * 16))),
                                                                     _mm512_mul_ps(s, _mm512_set1_ps(xs[i * nr])),
                                                                     _mm512_loadu_ps(a + i * 16)));
                }
            }
            for (int t = 0; t < 4; ++t) {
                const int h = t & 1, mh = t >> 1;
                const int64_t mt = m0 + 16 * mh;
                if (nb[h] == 0 || mt >= M) continue;
                const int mb = (int)(M - mt < 16 ? M - mt : 16);
                const __mmask16 nmask = (__mmask16)((1u << nb[h]) - 1u);
                const __m512 bias = w->bias ? _mm512_maskz_loadu_ps(nmask, w->bias + n0 + 16 * h) : _mm512_setzero_ps();
                const float *xsum = xsumall + mt * ng;
                for (int i = 0; i < mb; ++i) {
                    __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + t * 256 + i * 16), bias);
                    for (int64_t g = 0; g < ng; ++g)
                        v = _mm512_fnmadd_ps(_mm512_loadu_ps(zv[h] + g * 16), _mm512_set1_ps(xsum[i * ng + g]), v);
                    _mm512_mask_storeu_ps(y + (mt + i) * N + n0 + 16 * h, nmask, v);
                }
            }
        }
    }
    _tile_release();
}
#else
int lowbit_engine_amx_init(void) { return 0; }
#endif

/* ------------------------------------------------------------------------ matrices (inside the team) */

typedef struct {
    int8_t *x8;   /* [M32, Kmax] (M32: M rounded up to 32, two AMX tiles' rows; the pad rows are zero) */
    float *xs;    /* [M32, Kmax / 64] */
    float *xsum;  /* [M32, Kmax / 64] (group >= 64) */
    char *amx;    /* per thread amx_thread_bytes(Kmax) (the VNNI build only) */
    size_t amx_stride;
} Act;

/* Quantize M rows of x [M, K] (every thread takes rows; ends with a barrier). fp32 mode: group sums only. */
static void prep_act(const Model *md, const float *x, int64_t M, int64_t K, int64_t group, const Act *a,
                     int natural) {
    const int64_t nr = K / 64, ng = K / group;
    const int64_t Mp = natural ? (M + 31) / 32 * 32 : M; /* the tiles read whole 32-row blocks */
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < Mp; ++m) {
        if (m >= M) {
            memset(a->x8 + m * K, 0, (size_t)K);
            memset(a->xs + m * nr, 0, sizeof(float) * nr);
            memset(a->xsum + m * ng, 0, sizeof(float) * ng);
            continue;
        }
        if (md->act_mode == ACT_I8) {
#if LB_VNNI
            if (natural) {
                quant_row_natural(x + m * K, K, group, a->x8 + m * K, a->xs + m * nr, a->xsum + m * ng);
                continue;
            }
#endif
            quant_row(x + m * K, K, group, a->x8 + m * K, a->xs + m * nr, a->xsum + m * ng);
        } else {
            for (int64_t g = 0; g < ng; ++g) {
                float s = 0.f;
                for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * K + k];
                a->xsum[m * ng + g] = s;
            }
        }
    }
}

#define ROWS_DISPATCH(FN, ...)                                         \
    do {                                                                \
        int64_t m = 0;                                                  \
        for (; m + 4 <= M; m += 4) FN(4, __VA_ARGS__);                  \
        switch (M - m) {                                                \
        case 3: FN(3, __VA_ARGS__); break;                              \
        case 2: FN(2, __VA_ARGS__); break;                              \
        case 1: FN(1, __VA_ARGS__); break;                              \
        default: break;                                                 \
        }                                                               \
    } while (0)

/* y [M, w->n] = x [M, w->k] @ W^T + bias; the thread's share of the output rows; no barrier at the end
 * (the caller puts one where the result is read). */
static void qmatmul(const Model *md, const QMat *w, const float *x, int64_t M, const Act *a, float *y, int w8) {
    const int64_t K = w->k, nr = K / 64, ng = K / w->group;
    int64_t n0, n1;
    share(w->n, 16, &n0, &n1);
    (void)nr;
    for (int64_t n = n0; n < n1; ++n) {
        float srow[MAX_GROUPS], zsrow[MAX_GROUPS];
        const uint16_t *sh = w->scales + n * ng;
        const uint8_t *zr = w->zeros + n * ng;
        int64_t g = 0;
        for (; g + 8 <= ng; g += 8) {
            const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sh + g)));
            const __m256 zv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g))));
            _mm256_storeu_ps(srow + g, sv);
            _mm256_storeu_ps(zsrow + g, _mm256_mul_ps(sv, zv));
        }
        for (; g < ng; ++g) {
            srow[g] = _cvtsh_ss(sh[g]);
            zsrow[g] = srow[g] * (float)zr[g];
        }
        const float b = w->bias ? w->bias[n] : 0.f;
        if (w8) {
#if LB_VNNI
            const uint8_t *wrow = w->packed + n * K;
#define F8(MB, ...) row_i8w8(MB, a->x8 + m * K, a->xs + m * nr, a->xsum + m * ng, K, w->group, wrow, srow, zsrow, \
                             y + m * w->n + n, w->n, b)
            ROWS_DISPATCH(F8, 0);
#undef F8
#endif
            continue;
        }
        const uint8_t *wrow = w->packed + n * (K / 2);
        if (md->act_mode == ACT_I8) {
#define FI8(MB, ...) row_i8(MB, a->x8 + m * K, a->xs + m * nr, a->xsum + m * ng, K, w->group, wrow, srow, zsrow, \
                            y + m * w->n + n, w->n, b)
            ROWS_DISPATCH(FI8, 0);
#undef FI8
        } else {
#define FF(MB, ...) row_f32(MB, x + m * K, a->xsum + m * ng, K, w->group, wrow, srow, zsrow, y + m * w->n + n, w->n, b)
            ROWS_DISPATCH(FF, 0);
#undef FF
        }
    }
}

static inline int use_amx(const Model *md, int64_t M) {
    return LB_AMX && md->gemm == GEMM_AMX && md->act_mode == ACT_I8 && M >= AMX_MIN_ROWS;
}

/* quantize (barrier) then multiply, on the tiles where use_amx, else the row kernels; no barrier at the end */
static void matmul(const Model *md, const QMat *w, const float *x, int64_t M, const Act *a, float *y, int w8) {
#if LB_AMX
    if (use_amx(md, M)) {
        prep_act(md, x, M, w->k, w->group, a, 1);
        qmatmul_amx(w, M, a->x8, a->xs, a->xsum, y, w8, a->amx + (size_t)omp_get_thread_num() * a->amx_stride);
        return;
    }
#endif
    prep_act(md, x, M, w->k, w->group, a, w8);
    qmatmul(md, w, x, M, a, y, w8);
}

/* a layer's linear; ends with a barrier so y can be read by every thread */
static void linear(const Model *md, const QMat *w, const float *x, int64_t M, const Act *a, float *y) {
    matmul(md, w, x, M, a, y, 0);
    #pragma omp barrier
}

/* embed_bf16 == EMBED_INT8: `embed` points to a QMat of int8 rows (uint8 codes [vocab, hidden], one fp16 scale and
 * uint8 zero point per row: the int8 lm_head's layout, so a tied model's int8 head and embedding are one table);
 * row `id` decoded as the lm_head's weights are, (code - zero) * scale in fp32. */
enum { EMBED_INT8 = 2 };
static void embed_int8_row(const QMat *e, int64_t id, float *x) {
    const uint8_t *c = e->packed + id * e->k;
    const float z = (float)e->zeros[id], sc = _cvtsh_ss(e->scales[id]);
    for (int64_t i = 0; i < e->k; ++i) x[i] = ((float)c[i] - z) * sc;
}

/* float lm_head rows: y [M, vocab] */
static void float_head(const Model *md, const float *x, int64_t M, float *y) {
    const int64_t H = md->hidden, V = md->vocab;
    int64_t n0, n1;
    share(V, 16, &n0, &n1);
    for (int64_t n = n0; n < n1; ++n) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int MB = (int)(M - m0 < 4 ? M - m0 : 4);
            __m256 acc[4];
            for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
            for (int64_t k = 0; k + 8 <= H; k += 8) {
                const __m256 w = md->head_kind == HEAD_BF16 ? bf16x8((const uint16_t *)md->head + n * H + k)
                                                            : _mm256_loadu_ps((const float *)md->head + n * H + k);
                for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (m0 + m) * H + k), acc[m]);
            }
            for (int m = 0; m < MB; ++m) {
                float s = hsum256(acc[m]);
                for (int64_t k = H - H % 8; k < H; ++k) {
                    const float w = md->head_kind == HEAD_BF16 ? bf16_1(((const uint16_t *)md->head)[n * H + k])
                                                               : ((const float *)md->head)[n * H + k];
                    s += w * x[(m0 + m) * H + k];
                }
                y[(m0 + m) * V + n] = s;
            }
        }
    }
}

/* RMSNorm of M rows [M, n] (the thread's rows) */
static void rmsnorm_rows(const float *x, const float *w, float *out, int64_t M, int64_t n, float eps) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * n;
        __m256 acc = _mm256_setzero_ps();
        int64_t i0 = 0;
        for (; i0 + 8 <= n; i0 += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i0), _mm256_loadu_ps(xr + i0), acc);
        float ss = hsum256(acc);
        for (int64_t i = i0; i < n; ++i) ss += xr[i] * xr[i];
        const float r = 1.f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; ++i) out[m * n + i] = w[i] * (xr[i] * r);
    }
}

static void rmsnorm_vec(float *v, const float *w, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += v[i] * v[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) v[i] = w[i] * (v[i] * r);
}

static void rope(float *v, const float *cs, const float *sn, int64_t hd) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; ++i) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i] + a * sn[i];
    }
}

/* ------------------------------------------------------------------------ blocked causal attention (prompt chunks) */

#if LB_VNNI
enum { ATT_BLOCK = 16, ATT_MAX_HD = 256 };

/* e^x: Cephes' expf polynomial on x - n ln 2, times 2^n; relative error ~1e-7 (x clamped to [-87.3, 88.7]) */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(y, n);
}

/* Head h of query rows m0 .. m0+mb-1 (positions pos0 + m, mb <= 16) against the cached keys, as the row loop
 * computes it but per block of 16 keys: the keys transposed once (kt [hd][16]) and used by every row of the block,
 * the scores and softmax 16 at a time. sc: [16][capacity + 16] per thread. */
static void attend_block(const Model *md, const float *qkv, int64_t qkvn, int64_t m0, int mb, int64_t h,
                         int64_t pos0, const float *kc, const float *vc, float *sc, float *att) {
    const int64_t hd = md->head_dim, cap = md->capacity, nq = md->n_heads * hd;
    const int64_t g = h / (md->n_heads / md->n_kv);
    const int64_t p_first = pos0 + m0, p_last = pos0 + m0 + mb - 1;
    int64_t j_first[16] = {0};
    for (int i = 0; i < mb; ++i) j_first[i] = first_key(md, p_first + i);
    const int64_t jb0 = j_first[0] & ~(int64_t)15, j_end = p_last + 1;
    __attribute__((aligned(64))) float kt[ATT_MAX_HD * 16];
    const __m512 scale = _mm512_set1_ps(md->attn_scale);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t jb = jb0; jb < j_end; jb += 16) {
        const int nk = (int)(j_end - jb < 16 ? j_end - jb : 16);
        for (int64_t d0 = 0; d0 < hd; d0 += 16) {
            __m512i rows[16];
            for (int k = 0; k < 16; ++k)
                rows[k] = k < nk ? _mm512_loadu_si512((const void *)(kc + (g * cap + jb + k) * hd + d0))
                                 : _mm512_setzero_si512();
            transpose16(rows);
            for (int d = 0; d < 16; ++d) _mm512_store_si512((void *)(kt + (d0 + d) * 16), rows[d]);
        }
        for (int i = 0; i < mb; ++i) {
            const float *q = qkv + (m0 + i) * qkvn + h * hd;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t d = 0; d < hd; d += 2) {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_load_ps(kt + d * 16), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), _mm512_load_ps(kt + (d + 1) * 16), a1);
            }
            _mm512_storeu_ps(sc + i * (cap + 16) + (jb - jb0), _mm512_mul_ps(_mm512_add_ps(a0, a1), scale));
        }
    }
    for (int i = 0; i < mb; ++i) {
        /* keys j_first[i] .. p (inclusive) of row i, at sc[i][j - jb0] */
        float *row = sc + i * (cap + 16) - jb0;
        const int64_t lo = j_first[i], hi = p_first + i + 1;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = lo; j < hi; j += 16) {
            const __mmask16 k = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32((int)(hi - j < 16 ? hi - j : 16)));
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, row + j));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = lo; j < hi; j += 16) {
            const __mmask16 k = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32((int)(hi - j < 16 ? hi - j : 16)));
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), m));
            _mm512_mask_storeu_ps(row + j, k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
        const float inv = 1.f / _mm512_reduce_add_ps(sum);
        __m512 o[ATT_MAX_HD / 16];
        const int64_t nv = hd / 16;
        for (int64_t c = 0; c < nv; ++c) o[c] = _mm512_setzero_ps();
        for (int64_t j = lo; j < hi; ++j) {
            const __m512 w = _mm512_set1_ps(row[j]);
            const float *v = vc + (g * cap + j) * hd;
            for (int64_t c = 0; c < nv; ++c) o[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * c), o[c]);
        }
        float *out = att + (m0 + i) * nq + h * hd;
        for (int64_t c = 0; c < nv; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], _mm512_set1_ps(inv)));
    }
}
#endif

#if LB_AMX
/* per-thread scratch of attend_group_amx: scores, bf16 probabilities, bf16 queries, one C tile */
static size_t att_amx_bytes(int64_t cap, int64_t hd) {
    return al64(sizeof(float) * 16 * (size_t)(cap + 32)) + al64(2 * 16 * (size_t)(cap + 32)) + al64(2 * 16 * (size_t)hd) + 1024;
}

/* one KV head's keys and values as bf16 tiles, per block of 32 positions: two K^T tiles per 32 dims (16 keys each),
 * then one V tile per 16 dims (32 keys); shared by the team, built once per layer and chunk */
static size_t kv_tiles_bytes(int64_t cap, int64_t hd) {
    return (size_t)(cap / 32 + 1) * (size_t)(2 * (hd / 32) + hd / 16) * 1024;
}

/* fp32 → bf16, round to nearest even, in the high half of each 32-bit lane */
static inline __m512i bf16_hi(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}

/* 16 + 16 floats → 32 bf16 in order (dword k holds elements 2k, 2k+1: the tiles' pairs) */
static inline __m512i bf16x32(__m512 a, __m512 b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_hi(a), 16))),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_hi(b), 16)), 1);
}

#define CBAR() __asm__ __volatile__("" ::: "memory") /* the tile loads are asm without a memory clobber */

/* positions 32 kb .. 32 kb + 31 of KV head g (those < j_end; the rest zero) into its bf16 tiles kv (kv_tiles_bytes) */
static void build_kv_tiles(const Model *md, const float *kc, const float *vc, int64_t g, int64_t kb, int64_t j_end,
                           uint8_t *kv) {
    const int64_t hd = md->head_dim, cap = md->capacity, ndc = hd / 32, nd16 = hd / 16;
    const float *kg = kc + g * cap * hd, *vg = vc + g * cap * hd;
    uint8_t *blk = kv + (size_t)kb * (size_t)(2 * ndc + nd16) * 1024;
    for (int half = 0; half < 2; ++half) {
        const int64_t j = kb * 32 + half * 16;
        const int nk = (int)(j_end - j < 0 ? 0 : (j_end - j < 16 ? j_end - j : 16));
        for (int64_t dc = 0; dc < ndc; ++dc) {
            __m512i r[16];
            for (int k = 0; k < 16; ++k) {
                const float *kr = kg + (j + k) * hd + dc * 32;
                r[k] = k < nk ? bf16x32(_mm512_loadu_ps(kr), _mm512_loadu_ps(kr + 16)) : _mm512_setzero_si512();
            }
            transpose16(r); /* tile row k2: dims 2k2, 2k2+1 of each of the 16 keys */
            for (int k2 = 0; k2 < 16; ++k2) _mm512_storeu_si512((void *)(blk + (dc * 2 + half) * 1024 + k2 * 64), r[k2]);
        }
    }
    const __m512i himask = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t d16 = 0; d16 < nd16; ++d16) {
        for (int k2 = 0; k2 < 16; ++k2) { /* tile row k2: keys 2k2, 2k2+1 of the 32, interleaved per dim */
            const int64_t j = kb * 32 + 2 * k2;
            const __m512i lo = j < j_end ? _mm512_srli_epi32(bf16_hi(_mm512_loadu_ps(vg + j * hd + d16 * 16)), 16)
                                         : _mm512_setzero_si512();
            const __m512i hi = j + 1 < j_end ? _mm512_and_si512(bf16_hi(_mm512_loadu_ps(vg + (j + 1) * hd + d16 * 16)), himask)
                                             : _mm512_setzero_si512();
            _mm512_storeu_si512((void *)(blk + (2 * ndc + d16) * 1024 + k2 * 64), _mm512_or_si512(lo, hi));
        }
    }
}

/* The int8-activation mode's prompt attention on AMX-BF16: KV head g, query rows m0 .. m0+mb-1 of every query
 * head sharing it. Keys and values are rounded to bf16 once per block (K^T tiles of 16 keys x 32 dims, V tiles
 * of 32 keys x 16 dims) and used by all those heads; scores Q K^T in fp32 (TDPBF16PS), softmax in fp32, the
 * probabilities rounded to bf16 for P V (fp32 sums): the arithmetic of a bf16 SDPA. */
static void attend_group_amx(const Model *md, const float *qkv, int64_t qkvn, int64_t m0, int mb, int64_t g,
                             int64_t pos0, const uint8_t *kv, char *ts, float *att) {
    const int64_t hd = md->head_dim, cap = md->capacity, nq = md->n_heads * hd, rep = md->n_heads / md->n_kv;
    const int64_t ndc = hd / 32, nd16 = hd / 16, ss = cap + 32;
    const int64_t p_first = pos0 + m0, p_last = pos0 + m0 + mb - 1;
    int64_t j_first[16] = {0};
    for (int i = 0; i < mb; ++i) j_first[i] = first_key(md, p_first + i);
    const int64_t jb0 = j_first[0] & ~(int64_t)31, j_end = p_last + 1;
    const int64_t nkb = (j_end - jb0 + 15) / 16, nkp = (j_end - jb0 + 31) / 32;
    const size_t blk = (size_t)(2 * ndc + nd16) * 1024; /* bytes per 32 positions in kv */
    const uint8_t *kv0 = kv + (size_t)(jb0 / 32) * blk;
    float *sc = (float *)ts;
    uint16_t *pb = (uint16_t *)((char *)sc + al64(sizeof(float) * 16 * (size_t)ss));
    uint16_t *qb = (uint16_t *)((char *)pb + al64(2 * 16 * (size_t)ss));
    float *ob = (float *)((char *)qb + al64(2 * 16 * (size_t)hd));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 scale = _mm512_set1_ps(md->attn_scale);
    for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int i = 0; i < 16; ++i) {
            const float *q = qkv + (m0 + i) * qkvn + h * hd;
            for (int64_t dc = 0; dc < ndc; ++dc)
                _mm512_storeu_si512((void *)(qb + i * hd + dc * 32),
                                    i < mb ? bf16x32(_mm512_loadu_ps(q + dc * 32), _mm512_loadu_ps(q + dc * 32 + 16))
                                           : _mm512_setzero_si512());
        }
        CBAR();
        for (int64_t kb = 0; kb < nkb; ++kb) {
            _tile_zero(0);
            for (int64_t dc = 0; dc < ndc; ++dc) {
                _tile_loadd(1, qb + dc * 32, hd * 2);
                _tile_loadd(2, kv0 + (size_t)(kb / 2) * blk + (size_t)(dc * 2 + (kb & 1)) * 1024, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, sc + kb * 16, ss * 4);
        }
        float inv[16];
        for (int i = 0; i < 16; ++i) {
            uint16_t *prow = pb + i * ss - jb0;
            memset(pb + i * ss, 0, sizeof(uint16_t) * (size_t)nkp * 32);
            if (i >= mb) continue;
            const float *row = sc + i * ss - jb0;
            const int64_t lo = j_first[i], hi = p_first + i + 1;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j = lo; j < hi; j += 16) {
                const __mmask16 k = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32((int)(hi - j < 16 ? hi - j : 16)));
                mx = _mm512_mask_max_ps(mx, k, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), scale));
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = lo; j < hi; j += 16) {
                const __mmask16 k = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32((int)(hi - j < 16 ? hi - j : 16)));
                const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, row + j), scale, m));
                sum = _mm512_mask_add_ps(sum, k, sum, e);
                _mm256_mask_storeu_epi16(prow + j, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_hi(e), 16)));
            }
            inv[i] = 1.f / _mm512_reduce_add_ps(sum);
        }
        CBAR();
        for (int64_t d16 = 0; d16 < nd16; ++d16) {
            _tile_zero(0);
            for (int64_t kp = 0; kp < nkp; ++kp) {
                _tile_loadd(1, pb + kp * 32, ss * 2);
                _tile_loadd(2, kv0 + (size_t)kp * blk + (size_t)(2 * ndc + d16) * 1024, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, ob, 64);
            for (int i = 0; i < mb; ++i)
                _mm512_storeu_ps(att + (m0 + i) * nq + h * hd + d16 * 16,
                                 _mm512_mul_ps(_mm512_loadu_ps(ob + i * 16), _mm512_set1_ps(inv[i])));
        }
    }
}

static void amx_tile_config(void) {
    TileCfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}
#endif

/* ------------------------------------------------------------------------ the model */

typedef struct {
    float *x, *h, *qkv, *att, *gu, *act, *scores;
    char *attx; /* per thread att_amx_bytes (the AMX build) */
    size_t attx_stride;
    uint8_t *kvt; /* [n_kv] kv_tiles_bytes (the AMX build) */
    Act a;
} Scratch;

static int64_t kmax_of(const Model *md) {
    int64_t k = md->hidden > md->inter ? md->hidden : md->inter;
    const int64_t q = md->n_heads * md->head_dim;
    return k > q ? k : q;
}

static size_t layout(const Model *md, int64_t M, int nthreads, char *base, Scratch *s) {
    const int64_t H = md->hidden, I = md->inter, hd = md->head_dim;
    const int64_t nq = md->n_heads * hd, nkv = md->n_kv * hd, K = kmax_of(md);
    size_t off = 0;
#define TAKE(ptr, type, count)                                    \
    do {                                                          \
        if (base) ptr = (type *)(base + off);                     \
        off += al64(sizeof(type) * (size_t)(count));              \
    } while (0)
    Scratch t;
    TAKE(t.x, float, M * H);
    TAKE(t.h, float, M * (H > nq ? H : nq));
    TAKE(t.qkv, float, M * (nq + 2 * nkv));
    TAKE(t.att, float, M * nq);
    TAKE(t.gu, float, M * 2 * I);
    TAKE(t.act, float, M * I);
    TAKE(t.scores, float, (int64_t)nthreads * (LB_VNNI ? 16 * (md->capacity + 16) : md->capacity));
#if LB_AMX
    t.attx_stride = att_amx_bytes(md->capacity, hd);
#else
    t.attx_stride = 0;
#endif
    TAKE(t.attx, char, (int64_t)nthreads * (int64_t)t.attx_stride);
#if LB_AMX
    TAKE(t.kvt, uint8_t, md->n_kv * (int64_t)kv_tiles_bytes(md->capacity, hd));
#endif
    const int64_t M32 = (M + 31) / 32 * 32;
    TAKE(t.a.x8, int8_t, M32 * K);
    TAKE(t.a.xs, float, M32 * (K / 64));
    TAKE(t.a.xsum, float, M32 * (K / 64));
    t.a.amx_stride = LB_AMX ? amx_thread_bytes(K) : 0;
    TAKE(t.a.amx, char, (int64_t)nthreads * (int64_t)t.a.amx_stride);
#undef TAKE
    if (base) *s = t;
    return off;
}

/* bytes of scratch a call with up to M tokens on nthreads threads needs */
int64_t lowbit_engine_scratch_bytes(const Model *md, int64_t M, int nthreads) {
    return (int64_t)layout(md, M, nthreads, NULL, NULL);
}

/* The forward pass of M rows. One sequence (pos == NULL): the tokens at positions pos0 .. pos0 + M - 1 of
 * cache slot slot0, prompt chunks on the blocked attention. Rows of several sequences (pos, slot given): row m is
 * one token of the sequence in cache slot slot[m] at position pos[m] (batched decode: the matrices run on all
 * rows at once, as a prompt chunk's do; attention is per row, over its own slot). */
static void run(const Model *md, const int32_t *ids, int64_t M, int64_t pos0, int64_t slot0, const int64_t *pos,
                const int64_t *slot, float *logits, int all_logits, int nthreads, void *scratch) {
    Scratch s;
    layout(md, M, nthreads, (char *)scratch, &s);
    const int64_t H = md->hidden, I = md->inter, hd = md->head_dim, nh = md->n_heads, nkv = md->n_kv;
    const int64_t nq = nh * hd, qkvn = nq + 2 * nkv * hd, cap = md->capacity, half = hd / 2;
    const int64_t rep = nh / nkv, slot_stride = md->n_layers * nkv * cap * hd;

    #pragma omp parallel num_threads(nthreads)
    {
        const int prof_on = md->prof != NULL && omp_get_thread_num() == 0;
        double t_last = prof_on ? omp_get_wtime() : 0.0;
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const int64_t id = ids[m];
            if (md->embed_bf16 == EMBED_INT8) {
                embed_int8_row((const QMat *)md->embed, id, s.x + m * H);
            } else if (md->embed_bf16) {
                const uint16_t *e = (const uint16_t *)md->embed + id * H;
                for (int64_t i = 0; i < H; ++i) s.x[m * H + i] = bf16_1(e[i]);
            } else {
                memcpy(s.x + m * H, (const float *)md->embed + id * H, sizeof(float) * H);
            }
        }
        TICK(PROF_EMBED);
        for (int64_t l = 0; l < md->n_layers; ++l) {
            const Layer *L = md->layers + l;
            float *kc = md->kcache + slot0 * slot_stride + l * nkv * cap * hd;
            float *vc = md->vcache + slot0 * slot_stride + l * nkv * cap * hd;
            rmsnorm_rows(s.x, L->in_norm, s.h, M, H, md->eps);
            TICK(PROF_NORM);
            linear(md, &L->qkv, s.h, M, &s.a, s.qkv);
            TICK(PROF_QKV);
            /* q/k norms (Qwen3), RoPE, K/V into the cache: one (row, head) each */
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < M * (nh + nkv); ++t) {
                const int64_t m = t / (nh + nkv), j = t % (nh + nkv), p = pos ? pos[m] : pos0 + m;
                float *row = s.qkv + m * qkvn;
                const float *cs = md->cos + p * half, *sn = md->sin + p * half;
                if (j < nh) {
                    float *q = row + j * hd;
                    if (L->q_norm) rmsnorm_vec(q, L->q_norm, hd, md->eps);
                    rope(q, cs, sn, hd);
                } else {
                    const int64_t g = j - nh;
                    float *k = row + nq + g * hd, *v = row + nq + nkv * hd + g * hd;
                    if (L->k_norm) rmsnorm_vec(k, L->k_norm, hd, md->eps);
                    rope(k, cs, sn, hd);
                    const int64_t so = slot ? slot[m] * slot_stride : 0;
                    memcpy(kc + so + (g * cap + p) * hd, k, sizeof(float) * hd);
                    memcpy(vc + so + (g * cap + p) * hd, v, sizeof(float) * hd);
                }
            }
            TICK(PROF_ROPE);
#if LB_AMX
            if (!pos && use_amx(md, M) && hd % 32 == 0 && hd <= ATT_MAX_HD) {
                /* int8 mode, a prompt chunk: (KV head, block of 16 rows) each, on the bf16 tiles */
                const int64_t nblk = (M + 15) / 16, nkb = (pos0 + M + 31) / 32;
                const size_t kvb = kv_tiles_bytes(cap, hd);
                #pragma omp for schedule(static)
                for (int64_t t = 0; t < nkv * nkb; ++t) build_kv_tiles(md, kc, vc, t / nkb, t % nkb, pos0 + M, s.kvt + (t / nkb) * kvb);
                amx_tile_config();
                #pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < nblk * nkv; ++t) {
                    const int64_t b = nblk - 1 - t / nkv, g = t % nkv; /* the longest blocks first */
                    attend_group_amx(md, s.qkv, qkvn, b * 16, (int)(M - b * 16 < 16 ? M - b * 16 : 16), g, pos0,
                                     s.kvt + g * kvb, s.attx + (size_t)omp_get_thread_num() * s.attx_stride, s.att);
                }
                _tile_release();
            } else
#endif
#if LB_VNNI
            if (!pos && M > 1 && hd % 16 == 0 && hd <= ATT_MAX_HD) {
                /* a prompt chunk: (head, block of 16 rows) each, blocks of 16 keys */
                const int64_t nblk = (M + 15) / 16;
                #pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < nblk * nh; ++t) {
                    const int64_t b = nblk - 1 - t / nh, h = t % nh; /* the longest blocks first */
                    attend_block(md, s.qkv, qkvn, b * 16, (int)(M - b * 16 < 16 ? M - b * 16 : 16), h, pos0, kc, vc,
                                 s.scores + (int64_t)omp_get_thread_num() * (cap + 16) * 16, s.att);
                }
            } else
#endif
            /* attention, one (row, head) each */
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < M * nh; ++t) {
                const int64_t m = t / nh, h = t % nh, p = pos ? pos[m] : pos0 + m, g = h / rep;
                const int64_t so = slot ? slot[m] * slot_stride : 0;
                const float *q = s.qkv + m * qkvn + h * hd;
                float *sc = s.scores + (int64_t)omp_get_thread_num() * cap;
                const int64_t j0 = first_key(md, p);
                float mx = -INFINITY;
                for (int64_t j = j0; j <= p; ++j) {
                    const float *k = kc + so + (g * cap + j) * hd;
                    __m256 acc = _mm256_setzero_ps();
                    int64_t i = 0;
                    for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), acc);
                    float d = hsum256(acc);
                    for (; i < hd; ++i) d += q[i] * k[i];
                    d *= md->attn_scale;
                    sc[j] = d;
                    if (d > mx) mx = d;
                }
                float sum = 0.f;
                for (int64_t j = j0; j <= p; ++j) {
                    sc[j] = expf(sc[j] - mx);
                    sum += sc[j];
                }
                const float inv = 1.f / sum;
                float *o = s.att + m * nq + h * hd;
                for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
                for (int64_t j = j0; j <= p; ++j) {
                    const float w = sc[j] * inv;
                    const float *v = vc + so + (g * cap + j) * hd;
                    int64_t i = 0;
                    for (; i + 8 <= hd; i += 8)
                        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(v + i),
                                                                _mm256_loadu_ps(o + i)));
                    for (; i < hd; ++i) o[i] += w * v[i];
                }
            }
            TICK(PROF_ATTN);
            linear(md, &L->o, s.att, M, &s.a, s.h);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < M * H; ++i) s.x[i] += s.h[i];
            TICK(PROF_O);
            rmsnorm_rows(s.x, L->post_norm, s.h, M, H, md->eps);
            TICK(PROF_NORM);
            linear(md, &L->gu, s.h, M, &s.a, s.gu);
            TICK(PROF_GU);
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < M; ++m) {
                const float *gate = s.gu + m * 2 * I, *up = gate + I;
                float *act = s.act + m * I;
                int64_t i = 0;
#if LB_VNNI
                for (; i + 16 <= I; i += 16) {
                    const __m512 gt = _mm512_loadu_ps(gate + i);
                    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gt));
                    _mm512_storeu_ps(act + i, _mm512_mul_ps(_mm512_div_ps(gt, _mm512_add_ps(_mm512_set1_ps(1.f), e)),
                                                            _mm512_loadu_ps(up + i)));
                }
#endif
                for (; i < I; ++i) act[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
            }
            TICK(PROF_ACT);
            linear(md, &L->down, s.act, M, &s.a, s.h);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < M * H; ++i) s.x[i] += s.h[i];
            TICK(PROF_DOWN);
        }
        /* final norm and lm_head over the rows asked for */
        const int64_t r0 = all_logits ? 0 : M - 1, MR = M - r0;
        rmsnorm_rows(s.x + r0 * H, md->final_norm, s.h, MR, H, md->eps);
        if (md->head_kind == HEAD_F32 || md->head_kind == HEAD_BF16) {
            float_head(md, s.h, MR, logits);
        } else {
            matmul(md, &md->head_q, s.h, MR, &s.a, logits, md->head_kind == HEAD_INT8);
        }
        #pragma omp barrier
        TICK(PROF_HEAD);
    }
}

/* Run M tokens (ids) of one sequence at positions pos0 .. pos0 + M - 1 through the model, writing their K/V into
 * cache slot `slot` (0 for a single sequence). logits: [M, vocab] when all_logits, else [1, vocab] for the last token. Returns 0, or -1 when
 * the positions do not fit the cache (checked by the caller too). */
int lowbit_engine_forward(const Model *md, const int32_t *ids, int64_t M, int64_t pos0, int64_t slot, float *logits,
                          int all_logits, int nthreads, void *scratch) {
    if (pos0 + M > md->capacity || M < 1 || slot < 0) return -1;
    run(md, ids, M, pos0, slot, NULL, NULL, logits, all_logits, nthreads, scratch);
    return 0;
}

/* One token each of M sequences: row m is ids[m] at position pos[m] of cache slot slot[m] (slots distinct, each
 * below the number allocated: checked by the caller). logits: [M, vocab]. Returns 0, or -1 when a position
 * does not fit the cache. */
int lowbit_engine_forward_rows(const Model *md, const int32_t *ids, int64_t M, const int64_t *pos,
                               const int64_t *slot, float *logits, int nthreads, void *scratch) {
    if (M < 1) return -1;
    for (int64_t m = 0; m < M; ++m)
        if (pos[m] < 0 || pos[m] >= md->capacity || slot[m] < 0) return -1;
    run(md, ids, M, 0, 0, pos, slot, logits, 1, nthreads, scratch);
    return 0;
}

/* 1 where this object runs int8 activations on AVX-512 VNNI (and an int8 lm_head), 0 for AVX2 */
int lowbit_engine_isa(void) { return LB_VNNI; }

/* 1 where this object holds the AMX prompt path (built with the AMX flags) */
int lowbit_engine_amx_built(void) { return LB_AMX; }
