/* Paged decode attention on CPU: one query row per sequence, keys and values read in place from a
 * paged cache laid out [num_blocks, block_size, kv_heads, head_dim].
 *
 * One task per sequence (or per part of its KV heads when the batch is too small to keep every
 * thread busy): keys and values are read where they lie in the cache, never copied, a block's
 * slots front to back, and each one once for all the query heads that share it (GQA). Exact softmax in
 * two passes over the task's float32 score buffer, float32 accumulation, the output rounded to the
 * element type (bfloat16 to nearest even, as PyTorch rounds). Tasks are spread over OpenMP threads
 * (PyTorch's own runtime, already loaded in the process).
 *
 * With AVX-512 and a head_dim that is a multiple of 16, dot products and the weighted sum of values
 * run 16 lanes at a time (bfloat16 widened to float32 in registers); otherwise plain loops.
 * Built by engine/llm/cpu_kernels.py: compiled with -ffast-math (so the softmax's expf vectorizes)
 * but linked without it, so loading the library never changes the process's floating-point mode.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float widen_f32(const float *p, int i) { return p[i]; }

static inline float widen_bf16(const uint16_t *p, int i) { return bf16_to_float(p[i]); }

static inline void narrow_f32(float *p, int i, float x) { p[i] = x; }

static inline void narrow_bf16(uint16_t *p, int i, float x) { p[i] = float_to_bf16(x); }

#ifdef __AVX512F__
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#define VECTOR_DOT(T)                                                                                \
    if (head_dim % 16 == 0) {                                                                        \
        __m512 acc = _mm512_setzero_ps();                                                            \
        for (int d = 0; d < head_dim; d += 16)                                                       \
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16_##T(k + d), acc);                   \
        return _mm512_reduce_add_ps(acc);                                                            \
    }
#define VECTOR_AXPY(T)                                                                               \
    if (head_dim % 16 == 0) {                                                                        \
        const __m512 weight = _mm512_set1_ps(p);                                                     \
        for (int d = 0; d < head_dim; d += 16)                                                       \
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(weight, load16_##T(v + d), _mm512_loadu_ps(acc + d))); \
        return;                                                                                      \
    }
#else
#define VECTOR_DOT(T)
#define VECTOR_AXPY(T)
#endif

/* q . k over head_dim (q already float32) */
#define DEFINE_DOT(T, E)                                                                             \
    static inline float dot_##T(const float *q, const E *k, int head_dim) {                         \
        VECTOR_DOT(T)                                                                                \
        float sum = 0.f;                                                                             \
        for (int d = 0; d < head_dim; d++) sum += q[d] * widen_##T(k, d);                           \
        return sum;                                                                                  \
    }
/* acc += p * v over head_dim */
#define DEFINE_AXPY(T, E)                                                                            \
    static inline void axpy_##T(float *acc, float p, const E *v, int head_dim) {                    \
        VECTOR_AXPY(T)                                                                               \
        for (int d = 0; d < head_dim; d++) acc[d] += p * widen_##T(v, d);                           \
    }

/* How many parts each sequence's KV heads are split into. A task that takes a sequence's every head
 * reads each cache block front to back (the fastest way through memory: one task per head, 64 rows
 * of 320 keys took 1.8x as long); so split only as far as it shortens the step, the longest thread's
 * share of work: ceil(tasks / threads) tasks of 1/splits of a sequence each. */
static int split_heads(int num_seqs, int num_kv_heads, int num_threads) {
    int best = 1;
    for (int splits = 2; splits <= num_kv_heads; splits++) {
        const int64_t rounds = ((int64_t)num_seqs * splits + num_threads - 1) / num_threads;
        const int64_t best_rounds = ((int64_t)num_seqs * best + num_threads - 1) / num_threads;
        if (rounds * best < best_rounds * splits) best = splits;
    }
    return best;
}

#define DEFINE_PAGED_DECODE(T, E)                                                                    \
    DEFINE_DOT(T, E)                                                                                 \
    DEFINE_AXPY(T, E)                                                                                \
    int paged_decode_##T(const E *query, int64_t q_row_stride, int64_t q_head_stride,               \
                         const E *k_cache, const E *v_cache, int64_t block_stride, int64_t slot_stride, \
                         const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, \
                         E *out, int64_t out_row_stride, int64_t out_head_stride,                   \
                         int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, \
                         float scale, int window, int num_threads) {                                \
        const int group = num_heads / num_kv_heads;                                                  \
        const int splits = split_heads(num_seqs, num_kv_heads, num_threads);                         \
        const int kv_per_task = (num_kv_heads + splits - 1) / splits;                                \
        int failed = 0;                                                                              \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)")        \
        for (int s = 0; s < num_seqs; s++) {                                                         \
            for (int part = 0; part < splits; part++) {                                              \
                const int kv0 = part * kv_per_task;                                                  \
                const int kv1 = kv0 + kv_per_task < num_kv_heads ? kv0 + kv_per_task : num_kv_heads; \
                const int heads = (kv1 - kv0) * group, h0 = kv0 * group;                             \
                const int ctx = context_lens[s];                                                     \
                const int first = (window > 0 && ctx > window) ? ctx - window : 0;                  \
                const int n = ctx > first ? ctx - first : 0;                                         \
                const int32_t *table = block_tables + (int64_t)s * table_stride;                     \
                if (heads <= 0) continue;                                                            \
                float *buf = malloc(sizeof(float) * ((size_t)heads * (n + 2 * head_dim)));          \
                if (buf == NULL) {                                                                   \
                    failed = 1;                                                                      \
                    continue;                                                                        \
                }                                                                                    \
                /* scores [heads, n]; q and acc [heads, head_dim] */                                \
                float *scores = buf, *q = buf + (size_t)heads * n, *acc = q + (size_t)heads * head_dim; \
                for (int h = 0; h < heads; h++) {                                                    \
                    const E *src = query + s * q_row_stride + (int64_t)(h0 + h) * q_head_stride;     \
                    for (int d = 0; d < head_dim; d++) q[h * head_dim + d] = widen_##T(src, d) * scale; \
                }                                                                                    \
                const int last_block = ctx > 0 ? (ctx - 1) / block_size : -1;                        \
                /* keys: a block's slots are consecutive in memory, every task head read per slot */ \
                for (int b = first / block_size, i = 0; b <= last_block; b++) {                      \
                    const E *k = k_cache + (int64_t)table[b] * block_stride + (int64_t)kv0 * head_dim; \
                    const int lo = b * block_size > first ? 0 : first - b * block_size;              \
                    const int hi = (b + 1) * block_size < ctx ? block_size : ctx - b * block_size;   \
                    for (int t = lo; t < hi; t++, i++)                                               \
                        for (int h = 0; h < heads; h++)                                              \
                            scores[(size_t)h * n + i] = dot_##T(q + h * head_dim,                    \
                                                                k + t * slot_stride + (h / group) * head_dim, head_dim); \
                }                                                                                    \
                for (int h = 0; h < heads; h++) {                                                    \
                    float *sh = scores + (size_t)h * n, top = n > 0 ? sh[0] : 0.f, total = 0.f;      \
                    for (int i = 1; i < n; i++) top = sh[i] > top ? sh[i] : top;                    \
                    for (int i = 0; i < n; i++) {                                                    \
                        sh[i] = expf(sh[i] - top);                                                   \
                        total += sh[i];                                                              \
                    }                                                                                \
                    const float inv = total > 0.f ? 1.f / total : 0.f;                               \
                    for (int i = 0; i < n; i++) sh[i] *= inv;                                        \
                }                                                                                    \
                memset(acc, 0, sizeof(float) * (size_t)heads * head_dim);                            \
                for (int b = first / block_size, i = 0; b <= last_block; b++) {                      \
                    const E *v = v_cache + (int64_t)table[b] * block_stride + (int64_t)kv0 * head_dim; \
                    const int lo = b * block_size > first ? 0 : first - b * block_size;              \
                    const int hi = (b + 1) * block_size < ctx ? block_size : ctx - b * block_size;   \
                    for (int t = lo; t < hi; t++, i++)                                               \
                        for (int h = 0; h < heads; h++)                                              \
                            axpy_##T(acc + h * head_dim, scores[(size_t)h * n + i],                  \
                                     v + t * slot_stride + (h / group) * head_dim, head_dim);       \
                }                                                                                    \
                for (int h = 0; h < heads; h++) {                                                    \
                    E *dst = out + s * out_row_stride + (int64_t)(h0 + h) * out_head_stride;         \
                    for (int d = 0; d < head_dim; d++) narrow_##T(dst, d, acc[h * head_dim + d]);   \
                }                                                                                    \
                free(buf);                                                                           \
            }                                                                                        \
        }                                                                                            \
        return failed;                                                                               \
    }

DEFINE_PAGED_DECODE(f32, float)
DEFINE_PAGED_DECODE(bf16, uint16_t)
