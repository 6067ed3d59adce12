/* Fused bf16 attention for x86 CPUs with AVX512-BF16: scores, exp and PV in registers, one pass over the keys.
 *
 * Why: at head dim 32 a separate softmax pass costs as much as both attention GEMMs at the matmul peak
 * (docs/performance.md). Here each tile of MQ queries x 32 keys is computed with VDPBF16PS into fp32
 * registers, exponentiated there with a cubic polynomial exp2 (VSCALEFPS applies the integer part),
 * rounded to bf16 once and multiplied into the output accumulators, so no score ever reaches memory.
 *
 * exp needs no running max because every scaled score lies in [-40, 40] (the bound of
 * fluxmusic.ops._exp_sum_values): fm_attention checks it from the row norms while it packs K and V into VNNI
 * pair layouts, and declines (-3) where it does not hold:
 *   kp: [n_bh][n_tiles * 4 blocks][DH/2 pairs][16 keys][2]   (keys padded with zeros to a multiple of 64)
 *   vp: [n_bh][n_tiles * 32 key pairs][DH][2]                (padded keys have zero values)
 * q is [n_bh][lq][DH] contiguous (the layout RoPE leaves it in); out rows land in a strided layout (the merged [B, L, H*DH] view).
 * All bf16 values travel as uint16_t.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* 2^x for |x| <= ~60: 2^round(x) * p(x - round(x)), p a relative-error-weighted least-squares cubic on
 * [-0.5, 0.5] (relative error 7.7e-5, far below the bf16 rounding of the result, 3.9e-3). */
ALWAYS_INLINE __m512 exp2_ps(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.05508911f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24260706f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69327645f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992876f));
    return _mm512_scalef_ps(p, n);
}

ALWAYS_INLINE __m512bh bcast_pair(const uint16_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* 16 bf16 values to fp32: a 16-bit shift into the high half. */
ALWAYS_INLINE __m512 bf16x16_to_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The larger of a and b, or nan when either is (a nan norm must fail the score bound, not vanish in a max). */
ALWAYS_INLINE float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

/* Whether every scale * q.k lies in [-max_score, max_score], from the largest squared row norms (false for nan). */
ALWAYS_INLINE int bounded(float scale, float max_score, float qn, float kn) {
    return scale * scale * qn * kn <= max_score * max_score;
}

ALWAYS_INLINE __mmask16 valid_mask(long valid) {
    return valid >= 16 ? (__mmask16)0xFFFF : valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1u);
}

/* Phase 1 for QG (<= 4) query rows: probabilities exp(c' * q.k) of every key, rounded to bf16, into prow
 * (row m at prow + m * ldp), and their row sums into rowsum. 4 query rows x 64 keys = 16 independent
 * VDPBF16PS chains, enough to cover the instruction's latency at two per cycle. */
ALWAYS_INLINE void probabilities(const uint16_t *q, const uint16_t *kp, long lk, long n_tiles, float c, uint16_t *prow,
                                 long ldp, float *rowsum, const int DH, const int QG) {
    const __m512 vc = _mm512_set1_ps(c);
    const __m512bh ones = (__m512bh)_mm512_set1_epi32(0x3F803F80); /* a pair of bf16 1.0 */
    __m512 sum[4];
#pragma GCC unroll 4
    for (int m = 0; m < QG; m++) sum[m] = _mm512_setzero_ps();
    for (long t = 0; t < n_tiles; t++) {
        const uint16_t *kt = kp + t * DH * 64;
        __m512 s[4][4];
#pragma GCC unroll 4
        for (int m = 0; m < QG; m++)
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) s[m][b] = _mm512_setzero_ps();
#pragma GCC unroll 64
        for (int p = 0; p < DH / 2; p++) {
            __m512bh kk[4];
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) kk[b] = (__m512bh)_mm512_loadu_si512(kt + (b * (DH / 2) + p) * 32);
#pragma GCC unroll 4
            for (int m = 0; m < QG; m++) {
                const __m512bh qb = bcast_pair(q + m * DH + 2 * p);
#pragma GCC unroll 4
                for (int b = 0; b < 4; b++) s[m][b] = _mm512_dpbf16_ps(s[m][b], qb, kk[b]);
            }
        }
        const long key0 = t * 64;
#pragma GCC unroll 4
        for (int m = 0; m < QG; m++) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512 e0 = exp2_ps(_mm512_mul_ps(s[m][2 * h], vc));
                __m512 e1 = exp2_ps(_mm512_mul_ps(s[m][2 * h + 1], vc));
                if (key0 + 64 > lk) { /* padded keys, only in the last tile, get probability 0 */
                    e0 = _mm512_maskz_mov_ps(valid_mask(lk - key0 - 32 * h), e0);
                    e1 = _mm512_maskz_mov_ps(valid_mask(lk - key0 - 32 * h - 16), e1);
                }
                const __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0); /* keys +0..15 low, +16..31 high */
                /* the row sum is taken over the bf16-rounded probabilities that the PV product uses */
                sum[m] = _mm512_dpbf16_ps(sum[m], pb, ones);
                _mm512_storeu_si512((void *)(prow + m * ldp + key0 + 32 * h), (__m512i)pb);
            }
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < QG; m++) rowsum[m] = _mm512_reduce_add_ps(sum[m]);
}

/* Phase 2 for MQ query rows: out = (P V) / rowsum, with MQ x DH/16 accumulators. */
ALWAYS_INLINE void weighted_values(const uint16_t *prow, long ldp, const uint16_t *vp, long n_pairs,
                                   const float *rowsum, uint16_t *out, long ldo, const int DH, const int MQ) {
    __m512 o[16][8];
#pragma GCC unroll 16
    for (int m = 0; m < MQ; m++)
#pragma GCC unroll 8
        for (int d = 0; d < DH / 16; d++) o[m][d] = _mm512_setzero_ps();
    for (long j = 0; j < n_pairs; j++) {
        __m512bh vv[8];
#pragma GCC unroll 8
        for (int d = 0; d < DH / 16; d++) vv[d] = (__m512bh)_mm512_loadu_si512(vp + (j * DH + d * 16) * 2);
#pragma GCC unroll 16
        for (int m = 0; m < MQ; m++) {
            const __m512bh pj = bcast_pair(prow + m * ldp + 2 * j);
#pragma GCC unroll 8
            for (int d = 0; d < DH / 16; d++) o[m][d] = _mm512_dpbf16_ps(o[m][d], pj, vv[d]);
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MQ; m++) {
        const __m512 inv = _mm512_set1_ps(1.0f / rowsum[m]);
#pragma GCC unroll 8
        for (int d = 0; d < DH / 16; d++) {
            const __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(o[m][d], inv));
            _mm256_storeu_si256((__m256i *)(out + m * ldo + d * 16), (__m256i)r);
        }
    }
}

/* MQ query rows (q rows DH apart) against all keys; writes MQ output rows ldo apart. pbuf holds MQ rows of
 * probabilities (ldp = n_tiles * 64 keys each), the only intermediate, and stays in L1/L2. */
ALWAYS_INLINE void rows_kernel(const uint16_t *q, const uint16_t *kp, const uint16_t *vp, uint16_t *out, long ldo,
                               long lk, long n_tiles, float c, uint16_t *pbuf, const int DH, const int MQ) {
    const long ldp = n_tiles * 64;
    float rowsum[16];
    int m = 0;
    for (; m + 4 <= MQ; m += 4)
        probabilities(q + m * DH, kp, lk, n_tiles, c, pbuf + m * ldp, ldp, rowsum + m, DH, 4);
    for (; m < MQ; m++) probabilities(q + m * DH, kp, lk, n_tiles, c, pbuf + m * ldp, ldp, rowsum + m, DH, 1);
    weighted_values(pbuf, ldp, vp, n_tiles * 32, rowsum, out, ldo, DH, MQ);
}

/* One (batch*head) slice: its query rows in groups of MQ (MQ x DH/16 ~ 16 output accumulators), the tail one
 * row at a time. */
#define DEFINE_SLICE(DH, MQ)                                                                                      \
    static void slice_##DH(const uint16_t *q, const uint16_t *kp, const uint16_t *vp, uint16_t *out, long ldo,    \
                           long row0, long row1, long lk, long n_tiles, float c, uint16_t *pbuf) {                \
        long r = row0;                                                                                            \
        for (; r + MQ <= row1; r += MQ)                                                                           \
            rows_kernel(q + r * DH, kp, vp, out + r * ldo, ldo, lk, n_tiles, c, pbuf, DH, MQ);                    \
        for (; r < row1; r++) rows_kernel(q + r * DH, kp, vp, out + r * ldo, ldo, lk, n_tiles, c, pbuf, DH, 1);   \
    }

DEFINE_SLICE(16, 16)
DEFINE_SLICE(32, 8)
DEFINE_SLICE(48, 5)
DEFINE_SLICE(64, 4)
DEFINE_SLICE(80, 3)
DEFINE_SLICE(96, 2)
DEFINE_SLICE(112, 2)
DEFINE_SLICE(128, 2)

#define MAX_MQ 16

typedef void (*slice_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, long, long, long, long,
                         long, float, uint16_t *);

static slice_fn slice_for(long dh) {
    switch (dh) {
    case 16: return slice_16;
    case 32: return slice_32;
    case 48: return slice_48;
    case 64: return slice_64;
    case 80: return slice_80;
    case 96: return slice_96;
    case 112: return slice_112;
    case 128: return slice_128;
    default: return 0;
    }
}

/* 1 when this CPU runs the kernel (AVX512F + BW + BF16), else 0. */
int fm_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

/* 1 when head dim dh has a compiled kernel. */
int fm_attention_head_dim_supported(long dh) { return slice_for(dh) != 0; }

/* Work items w0..w1-1 of n_heads * n_batch slices, each split into row chunks of `chunk` queries.
 * Item w is slice w / n_chunks (b = slice / n_heads, h = slice % n_heads), rows of chunk w % n_chunks.
 * out points at the [B, L, H*DH] result; returns 0, or -2 when out of memory. */
static int attend_items(slice_fn fn, const uint16_t *q, const uint16_t *kp, const uint16_t *vp, uint16_t *out,
                        long n_heads, long lq, long lk, long dh, float scale, long chunk, long w0, long w1) {
    const long n_tiles = (lk + 63) / 64;
    uint16_t *pbuf = aligned_alloc(64, (size_t)(MAX_MQ * n_tiles * 64) * sizeof(uint16_t));
    if (!pbuf) return -2;
    const long n_chunks = (lq + chunk - 1) / chunk;
    const float c = scale * 1.4426950408889634f; /* exp(x) = 2^(x log2 e) */
    const long ldo = n_heads * dh;
    for (long w = w0; w < w1; w++) {
        const long slice = w / n_chunks, ck = w % n_chunks;
        const long b = slice / n_heads, h = slice % n_heads;
        const long row0 = ck * chunk, row1 = row0 + chunk < lq ? row0 + chunk : lq;
        fn(q + slice * lq * dh, kp + slice * n_tiles * 64 * dh, vp + slice * n_tiles * 64 * dh,
           out + b * lq * ldo + h * dh, ldo, row0, row1, lk, n_tiles, c, pbuf);
    }
    free(pbuf);
    return 0;
}

/* Largest squared row norm of rows [0, n) of a bf16 [n, dh] matrix with row stride ld (dh a multiple of 16). */
static float max_sq_norm(const uint16_t *x, long n, long ld, long dh) {
    float best = 0.0f;
    for (long r = 0; r < n; r++) {
        const uint16_t *row = x + r * ld;
        __m512 acc = _mm512_setzero_ps();
        for (long d = 0; d < dh; d += 16) {
            const __m512 f = bf16x16_to_ps(row + d);
            acc = _mm512_fmadd_ps(f, f, acc);
        }
        best = nan_max(best, _mm512_reduce_add_ps(acc)); /* (nan propagates: the caller's bound check fails) */
        if (best != best) return best;
    }
    return best;
}

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *kp, *vp;
    long n_heads, lq, lk, dh, ksb, ksh, ksl, vsb, vsh, vsl;
} pack_args;

/* Pack slice sl (= b * n_heads + h) of K and V, strided [B, H, L, dh] bf16 with unit stride over dh, into the
 * kernel's layouts (keys zero-padded to whole 64-key tiles); the largest squared row norms of its q rows
 * (contiguous [n_bh][lq][dh]) and k rows go to *qn and *kn. */
static void pack_slice(const pack_args *a, long sl, float *qn, float *kn) {
    const long dh = a->dh, n_tiles = (a->lk + 63) / 64, padded = n_tiles * 64, half = dh / 2;
    const long b = sl / a->n_heads, h = sl % a->n_heads;
    const uint16_t *ks = a->k + b * a->ksb + h * a->ksh, *vs = a->v + b * a->vsb + h * a->vsh;
    uint32_t *kd = (uint32_t *)(a->kp + sl * padded * dh);
    uint16_t *vd = a->vp + sl * padded * dh;
    *qn = max_sq_norm(a->q + sl * a->lq * dh, a->lq, dh, dh);
    *kn = max_sq_norm(ks, a->lk, a->ksl, dh);
    /* K: key j's channel pair p goes to block j / 16, pair p, lane j % 16. */
    for (long j = 0; j < padded; j++) {
        uint32_t *dst = kd + (j / 16) * half * 16 + (j % 16);
        if (j < a->lk) {
            const uint16_t *row = ks + j * a->ksl;
            for (long p = 0; p < half; p++) {
                uint32_t pair;
                memcpy(&pair, row + 2 * p, sizeof pair);
                dst[p * 16] = pair;
            }
        } else {
            for (long p = 0; p < half; p++) dst[p * 16] = 0;
        }
    }
    /* V: keys 2i and 2i+1 interleave per channel: [v(2i, d), v(2i+1, d)] for each d. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (long i = 0; i < padded / 2; i++) {
        const long j = 2 * i;
        for (long d = 0; d < dh; d += 16) {
            const __m256i lo = j < a->lk ? _mm256_loadu_si256((const __m256i *)(vs + j * a->vsl + d))
                                         : _mm256_setzero_si256();
            const __m256i hi = j + 1 < a->lk ? _mm256_loadu_si256((const __m256i *)(vs + (j + 1) * a->vsl + d))
                                             : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_storeu_si512((void *)(vd + (i * dh + d) * 2), _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* Pack slices s0..s1-1; norms[0..1] get the largest squared row norms of q and k over them (nan propagates). */
static void pack_range(const pack_args *a, long s0, long s1, float *norms) {
    float qn = 0.0f, kn = 0.0f;
    for (long sl = s0; sl < s1; sl++) {
        float sq, sk;
        pack_slice(a, sl, &sq, &sk);
        qn = nan_max(qn, sq);
        kn = nan_max(kn, sk);
    }
    norms[0] = qn;
    norms[1] = kn;
}

/* Whole slices s0..s1-1, each packed then attended (no barrier between threads). Returns 0, -2 when out of
 * memory, -3 when a slice's scores are not provably within [-max_score, max_score] (nothing more is computed). */
static int attend_slices(slice_fn fn, const pack_args *a, uint16_t *out, float scale, float max_score, long s0,
                         long s1) {
    const long lq = a->lq, dh = a->dh, n_heads = a->n_heads, n_tiles = (a->lk + 63) / 64;
    uint16_t *pbuf = aligned_alloc(64, (size_t)(MAX_MQ * n_tiles * 64) * sizeof(uint16_t));
    if (!pbuf) return -2;
    const float c = scale * 1.4426950408889634f;
    const long ldo = n_heads * dh;
    int code = 0;
    for (long sl = s0; sl < s1; sl++) {
        float qn, kn;
        pack_slice(a, sl, &qn, &kn);
        if (!bounded(scale, max_score, qn, kn)) {
            code = -3;
            break;
        }
        const long b = sl / n_heads, h = sl % n_heads;
        fn(a->q + sl * lq * dh, a->kp + sl * n_tiles * 64 * dh, a->vp + sl * n_tiles * 64 * dh,
           out + b * lq * ldo + h * dh, ldo, 0, lq, a->lk, n_tiles, c, pbuf);
    }
    free(pbuf);
    return code;
}

/* ---- Threads: the process's own OpenMP runtime ----
 * The kernel runs on the OpenMP team that torch's GEMMs use (the caller passes GOMP_parallel and the thread-id
 * functions of the runtime torch loaded), so no second set of threads competes with OpenMP workers that are
 * still spinning after the previous op. Nothing links against an OpenMP library: without the pointers every
 * call runs on the calling thread, and so does every call in a forked child (libgomp's team does not survive a
 * fork: a child that enters a parallel region after its parent did waits forever for threads it does not have,
 * as torch's own GEMMs there do). */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn omp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;
static pid_t omp_pid; /* the process the runtime's threads belong to */

/* Use this OpenMP runtime's GOMP_parallel, omp_get_thread_num and omp_get_num_threads (null: the calling
 * thread only). */
void fm_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    omp_parallel = (gomp_parallel_fn)parallel;
    omp_thread_num = (omp_int_fn)thread_num;
    omp_num_threads = (omp_int_fn)num_threads;
    omp_pid = getpid();
}

typedef struct {
    slice_fn fn;
    pack_args a;
    uint16_t *out;
    float scale, max_score;
    long n_slices, chunk, n_items;
    float *norms; /* 2 per thread, pack phase */
    int flags;    /* bit 0: -3 seen, bit 1: -2 seen */
} job_t;

/* Whether a call runs on the OpenMP team: a runtime was given, more than one thread is asked for, and this is the
 * process the team belongs to (not a forked child). */
static int use_team(long n_threads) { return omp_parallel && n_threads > 1 && getpid() == omp_pid; }

static void share(long n, long *lo, long *hi) {
    const long t = omp_thread_num(), nt = omp_num_threads();
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

static void note_code(job_t *j, int code) {
    if (code) __atomic_fetch_or(&j->flags, code == -3 ? 1 : 2, __ATOMIC_RELAXED);
}

static void slices_worker(void *p) {
    job_t *j = p;
    long s0, s1;
    share(j->n_slices, &s0, &s1);
    note_code(j, attend_slices(j->fn, &j->a, j->out, j->scale, j->max_score, s0, s1));
}

static void pack_worker(void *p) {
    job_t *j = p;
    long s0, s1;
    share(j->n_slices, &s0, &s1);
    pack_range(&j->a, s0, s1, j->norms + 2 * omp_thread_num());
}

static void items_worker(void *p) {
    job_t *j = p;
    long w0, w1;
    share(j->n_items, &w0, &w1);
    note_code(j, attend_items(j->fn, j->a.q, j->a.kp, j->a.vp, j->out, j->a.n_heads, j->a.lq, j->a.lk, j->a.dh,
                              j->scale, j->chunk, w0, w1));
}

/* softmax(scale q k^T) v for n_slices = B * n_heads slices on up to n_threads threads.
 * q: contiguous [n_slices][lq][dh]; k, v: [B, H, L, dh] with the given strides (unit over dh); kp, vp: pack
 * buffers of n_slices * ceil(lk / 64) * 64 * dh each; out: [B, lq, H * dh].
 * With at least as many slices as threads each thread packs and attends whole slices; otherwise all threads
 * pack, the bound is checked once, and query rows are split in items of `chunk` rows.
 * Returns 0; -1 for an unsupported head dim; -2 when out of memory; -3 when the scores are not provably within
 * [-max_score, max_score] (the caller falls back; the output is then incomplete). */
int fm_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *kp, uint16_t *vp, uint16_t *out,
                 long n_heads, long n_slices, long lq, long lk, long dh, float scale, float max_score, long ksb,
                 long ksh, long ksl, long vsb, long vsh, long vsl, long chunk, long n_threads) {
    const slice_fn fn = slice_for(dh);
    if (!fn) return -1;
    job_t j = {fn, {q, k, v, kp, vp, n_heads, lq, lk, dh, ksb, ksh, ksl, vsb, vsh, vsl}, out, scale, max_score,
               n_slices, chunk, n_slices * ((lq + chunk - 1) / chunk), 0, 0};
    if (!use_team(n_threads)) return attend_slices(fn, &j.a, out, scale, max_score, 0, n_slices);
    if (n_slices >= n_threads) {
        omp_parallel(slices_worker, &j, (unsigned)n_threads, 0);
    } else {
        float *norms = calloc((size_t)(2 * n_threads), sizeof(float));
        if (!norms) return -2;
        j.norms = norms;
        omp_parallel(pack_worker, &j, (unsigned)n_threads, 0);
        float qn = 0.0f, kn = 0.0f;
        for (long t = 0; t < 2 * n_threads; t += 2) {
            qn = nan_max(qn, norms[t]);
            kn = nan_max(kn, norms[t + 1]);
        }
        free(norms);
        if (!bounded(scale, max_score, qn, kn)) return -3;
        omp_parallel(items_worker, &j, (unsigned)(n_threads < j.n_items ? n_threads : j.n_items), 0);
    }
    return j.flags & 1 ? -3 : j.flags & 2 ? -2 : 0;
}

/* ---- QK RMSNorm + RoPE (the op in front of attention), the reference's rounding steps ----
 * For each token and head: q (and k) = RMSNorm over the head dim in fp32, rounded to bf16, times the learnable
 * scale, rounded to bf16; then each adjacent channel pair rotated by RoPE in fp32 and rounded to bf16, as
 * fluxmusic.ops.qk_rmsnorm_rope computes it op by op (products and sums rounded separately: no FMA here). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

ALWAYS_INLINE __m512 round_bf16(__m512 x) { /* round to nearest even bf16, back to fp32 */
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* One head's row of dh channels (dh a multiple of 16, at most 128). */
static void norm_rope_row(const uint16_t *src, const float *scale, const float *rope, uint16_t *dst, long dh,
                          float eps) {
    __m512 x[8];
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < dh / 16; i++) {
        x[i] = bf16x16_to_ps(src + 16 * i);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(x[i], x[i]));
    }
    const float rrms = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dh + eps);
    const __m512 vr = _mm512_set1_ps(rrms);
    const __m512 even_sign = _mm512_castsi512_ps(_mm512_set_epi32(0, (int)0x80000000, 0, (int)0x80000000, 0,
        (int)0x80000000, 0, (int)0x80000000, 0, (int)0x80000000, 0, (int)0x80000000, 0, (int)0x80000000, 0,
        (int)0x80000000));
    for (long i = 0; i < dh / 16; i++) {
        const __m512 y = round_bf16(_mm512_mul_ps(x[i], vr));
        const __m512 z = round_bf16(_mm512_mul_ps(y, _mm512_loadu_ps(scale + 16 * i)));
        const __m512 r = _mm512_loadu_ps(rope + 16 * i); /* (cos, sin) of the 8 pairs */
        const __m512 c = _mm512_moveldup_ps(r), s = _mm512_movehdup_ps(r);
        const __m512 swapped = _mm512_permute_ps(z, 0xB1); /* (x1, x0) per pair */
        const __m512 rot = _mm512_castsi512_ps(_mm512_xor_si512(  /* (-s x1, s x0) */
            _mm512_castps_si512(_mm512_mul_ps(s, swapped)), _mm512_castps_si512(even_sign)));
        const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(c, z), rot));
        _mm256_storeu_si256((__m256i *)(dst + 16 * i), (__m256i)out);
    }
}
#pragma GCC pop_options

typedef struct {
    const uint16_t *qkv;
    long sb, sl; /* qkv strides of batch and token (channels contiguous: q heads, then k heads) */
    const float *scales; /* q scale then k scale, fp32 [2][dh] */
    const float *rope;
    long rb, rl; /* rope strides of batch (0: shared) and token; (cos, sin) pairs contiguous */
    uint16_t *q, *k; /* [B, H, L, dh] */
    long n_batch, n_tokens, n_heads, dh;
    float eps;
} qk_job_t;

static void qk_rows(const qk_job_t *j, long t0, long t1) {
    const long L = j->n_tokens, H = j->n_heads, dh = j->dh;
    for (long t = t0; t < t1; t++) {
        const long b = t / L, l = t % L;
        const uint16_t *row = j->qkv + b * j->sb + l * j->sl;
        const float *rope = j->rope + b * j->rb + l * j->rl;
        for (long h = 0; h < H; h++) {
            const long o = ((b * H + h) * L + l) * dh;
            norm_rope_row(row + h * dh, j->scales, rope, j->q + o, dh, j->eps);
            norm_rope_row(row + (H + h) * dh, j->scales + dh, rope, j->k + o, dh, j->eps);
        }
    }
}

static void qk_worker(void *p) {
    const qk_job_t *j = p;
    long t0, t1;
    share(j->n_batch * j->n_tokens, &t0, &t1);
    qk_rows(j, t0, t1);
}

/* QK RMSNorm + RoPE of a bf16 qkv projection [B, L, (3 H) dh] (strides sb, sl; channels contiguous) into
 * contiguous q, k [B, H, L, dh]. scales: fp32 q then k scale [2][dh]; rope: fp32 [Bp, L, dh/2, 2] (strides rb,
 * rl). Returns 0, or -1 for a head dim that is not a multiple of 16 up to 128. */
int fm_qk_norm_rope(const uint16_t *qkv, long sb, long sl, const float *scales, const float *rope, long rb, long rl,
                    uint16_t *q, uint16_t *k, long n_batch, long n_tokens, long n_heads, long dh, float eps,
                    long n_threads) {
    if (dh % 16 || dh > 128 || dh <= 0) return -1;
    const qk_job_t j = {qkv, sb, sl, scales, rope, rb, rl, q, k, n_batch, n_tokens, n_heads, dh, eps};
    if (!use_team(n_threads)) {
        qk_rows(&j, 0, n_batch * n_tokens);
    } else {
        omp_parallel(qk_worker, (void *)&j, (unsigned)n_threads, 0);
    }
    return 0;
}
