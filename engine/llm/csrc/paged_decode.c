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
 * A decode step of many sequences is bound by reading their caches, and a sequence's blocks lie
 * anywhere in the pool, where the hardware prefetcher cannot follow: while a block is read, the same
 * slot of the next block in the table is prefetched into L2 (most of the gain engine/llm/cpu_kernels.py
 * reports: 64 rows of 256-384 keys, 8 layers of 8 KV heads of 64, bf16, 2 cores, 22 -> 16-17 ms).
 *
 * bfloat16 with AVX512-BF16 and a head_dim that is a multiple of 32 takes the paired path: q.k with
 * `vdpbf16ps` straight from the cached bfloat16 (exact products, float32 sums), and values weighted
 * two slots at a time by probabilities rounded to bfloat16 (as PyTorch's bfloat16 SDPA on CPU rounds
 * them before its product with V), accumulated in float32; about half the instructions of widening
 * every element (same shapes: 16-17 -> 15 ms; with the caches hot in L2/L3, 9.9 -> 7.1 ms). Otherwise, with
 * AVX-512 and a head_dim that is a multiple of 16, dot products and the weighted sum of values run
 * 16 lanes at a time (elements widened to float32 in registers), and plain loops elsewhere.
 * Built by engine/llm/cpu_kernels.py: compiled with -ffast-math (so the softmax's expf vectorizes)
 * but linked without it, so loading the library never changes the process's floating-point mode.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

static inline float widen_f32(const float *p, int i) { return p[i]; }

static inline float widen_bf16(const uint16_t *p, int i) { return bf16_to_float(p[i]); }

static inline void narrow_f32(float *p, int i, float x) { p[i] = x; }

static inline void narrow_bf16(uint16_t *p, int i, float x) { p[i] = float_to_bf16(x); }

#ifdef __AVX512F__
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
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

/* What one task attends: a sequence's context (its last `n` positions from `first`) through its
 * block table, for KV heads [kv0, kv0 + kv_heads) and the `heads` query heads that share them. */
typedef struct {
    const int32_t *table;
    int first, ctx, n, block_size;
    int kv0, kv_heads, heads, group, head_dim;
    int64_t block_stride, slot_stride;
} Task;

/* Slots [lo, hi) of table block b that lie in the task's context. */
static inline void block_span(const Task *task, int b, int *lo, int *hi) {
    const int start = b * task->block_size;
    *lo = start > task->first ? 0 : task->first - start;
    *hi = start + task->block_size < task->ctx ? task->block_size : task->ctx - start;
}

/* Elements from the start of the cache to the task's first KV head in table block b. */
static inline int64_t block_offset(const Task *task, int b) {
    return (int64_t)task->table[b] * task->block_stride + (int64_t)task->kv0 * task->head_dim;
}

/* Into L2: the task's part of slot t of the block after b (of b itself, already read, at the last
 * block). Always inlined: a function that only prefetches has no side effects to GCC, which then
 * deletes the calls. */
static inline __attribute__((always_inline)) void prefetch_next(const Task *task, const char *cache, int element_size, int b, int last_block, int t) {
    const char *row = cache + (block_offset(task, b < last_block ? b + 1 : b) + t * task->slot_stride) * element_size;
    for (int c = 0; c < task->kv_heads * task->head_dim * element_size; c += 64) __builtin_prefetch(row + c, 0, 2);
}

/* Each of the task's rows of `scores` (row stride `stride`) becomes its softmax over the first n. */
static void softmax_rows(float *scores, int heads, int n, int stride) {
    for (int h = 0; h < heads; h++) {
        float *sh = scores + (size_t)h * stride, top = n > 0 ? sh[0] : 0.f, total = 0.f;
        for (int i = 1; i < n; i++) top = sh[i] > top ? sh[i] : top;
        for (int i = 0; i < n; i++) {
            sh[i] = expf(sh[i] - top);
            total += sh[i];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int i = 0; i < n; i++) sh[i] *= inv;
    }
}

/* scratch floats a task needs: scores [heads, n + 2] (two spare slots for the paired path's last
 * pair), then q and acc [heads, head_dim] each */
static size_t scratch_floats(const Task *task) {
    return (size_t)task->heads * (task->n + 2 + 2 * task->head_dim);
}

#define DEFINE_TASK(T, E)                                                                            \
    /* q . k over head_dim (q already float32) */                                                    \
    static inline float dot_##T(const float *q, const E *k, int head_dim) {                         \
        VECTOR_DOT(T)                                                                                \
        float sum = 0.f;                                                                             \
        for (int d = 0; d < head_dim; d++) sum += q[d] * widen_##T(k, d);                           \
        return sum;                                                                                  \
    }                                                                                                \
    /* acc += p * v over head_dim */                                                                 \
    static inline void axpy_##T(float *acc, float p, const E *v, int head_dim) {                    \
        VECTOR_AXPY(T)                                                                               \
        for (int d = 0; d < head_dim; d++) acc[d] += p * widen_##T(v, d);                           \
    }                                                                                                \
    static void attend_##T(const Task *task, const E *query, int64_t q_head_stride, const E *k_cache, \
                           const E *v_cache, E *out, int64_t out_head_stride, float scale, float *scratch) { \
        const int heads = task->heads, head_dim = task->head_dim, n = task->n, stride = n + 2;       \
        const int last_block = (task->ctx - 1) / task->block_size;                                   \
        float *scores = scratch, *q = scratch + (size_t)heads * stride, *acc = q + (size_t)heads * head_dim; \
        for (int h = 0; h < heads; h++)                                                              \
            for (int d = 0; d < head_dim; d++) q[h * head_dim + d] = widen_##T(query + h * q_head_stride, d) * scale; \
        /* keys: a block's slots are consecutive in memory, every task head read per slot */         \
        for (int b = task->first / task->block_size, i = 0, lo, hi; b <= last_block; b++) {          \
            const E *k = k_cache + block_offset(task, b);                                             \
            block_span(task, b, &lo, &hi);                                                           \
            for (int t = lo; t < hi; t++, i++) {                                                     \
                prefetch_next(task, (const char *)k_cache, sizeof(E), b, last_block, t);            \
                for (int h = 0; h < heads; h++)                                                      \
                    scores[(size_t)h * stride + i] = dot_##T(q + h * head_dim,                       \
                                                             k + t * task->slot_stride + (h / task->group) * head_dim, head_dim); \
            }                                                                                        \
        }                                                                                            \
        softmax_rows(scores, heads, n, stride);                                                      \
        memset(acc, 0, sizeof(float) * (size_t)heads * head_dim);                                    \
        for (int b = task->first / task->block_size, i = 0, lo, hi; b <= last_block; b++) {          \
            const E *v = v_cache + block_offset(task, b);                                             \
            block_span(task, b, &lo, &hi);                                                           \
            for (int t = lo; t < hi; t++, i++) {                                                     \
                prefetch_next(task, (const char *)v_cache, sizeof(E), b, last_block, t);            \
                for (int h = 0; h < heads; h++)                                                      \
                    axpy_##T(acc + h * head_dim, scores[(size_t)h * stride + i],                     \
                             v + t * task->slot_stride + (h / task->group) * head_dim, head_dim);   \
            }                                                                                        \
        }                                                                                            \
        for (int h = 0; h < heads; h++)                                                              \
            for (int d = 0; d < head_dim; d++) narrow_##T(out + h * out_head_stride, d, acc[h * head_dim + d]); \
    }

DEFINE_TASK(f32, float)
DEFINE_TASK(bf16, uint16_t)

#ifdef __AVX512BF16__
/* The paired bfloat16 path (head_dim a multiple of 32). Values are weighted two slots at a time:
 * `vpunpck{l,h}wd` interleave the two slots' elements so each float32 lane holds one dimension's
 * pair and `vdpbf16ps` adds p0 * v0 + p1 * v1 to it. The interleave works within 128-bit lanes, so
 * acc holds each 32-dimension chunk permuted: lanes 0-15 dimensions {0-3, 8-11, 16-19, 24-27},
 * lanes 16-31 {4-7, 12-15, 20-23, 28-31}; the output is written back in order. */
static void attend_bf16_paired(const Task *task, const uint16_t *query, int64_t q_head_stride,
                               const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
                               int64_t out_head_stride, float scale, float *scratch) {
    const int heads = task->heads, head_dim = task->head_dim, n = task->n, stride = n + 2;
    const int last_block = (task->ctx - 1) / task->block_size;
    float *scores = scratch, *acc = scratch + (size_t)heads * stride + (size_t)heads * head_dim;
    for (int b = task->first / task->block_size, i = 0, lo, hi; b <= last_block; b++) {
        const uint16_t *k = k_cache + block_offset(task, b);
        block_span(task, b, &lo, &hi);
        for (int t = lo; t < hi; t++, i++) {
            prefetch_next(task, (const char *)k_cache, 2, b, last_block, t);
            for (int h = 0; h < heads; h++) {
                const uint16_t *q = query + h * q_head_stride;
                const uint16_t *key = k + t * task->slot_stride + (h / task->group) * head_dim;
                __m512 sum = _mm512_setzero_ps();
                for (int d = 0; d < head_dim; d += 32)
                    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(key + d));
                scores[(size_t)h * stride + i] = scale * _mm512_reduce_add_ps(sum);
            }
        }
    }
    softmax_rows(scores, heads, n, stride);
    memset(acc, 0, sizeof(float) * (size_t)heads * head_dim);
    for (int b = task->first / task->block_size, i = 0, lo, hi; b <= last_block; b++) {
        const uint16_t *v = v_cache + block_offset(task, b);
        block_span(task, b, &lo, &hi);
        for (int t = lo; t < hi; t += 2, i += 2) {
            const int paired = t + 1 < hi;
            prefetch_next(task, (const char *)v_cache, 2, b, last_block, t);
            if (paired) prefetch_next(task, (const char *)v_cache, 2, b, last_block, t + 1);
            for (int h = 0; h < heads; h++) {
                const float *p = scores + (size_t)h * stride + i;
                const uint32_t weights = (uint32_t)float_to_bf16(p[0]) | (uint32_t)float_to_bf16(paired ? p[1] : 0.f) << 16;
                const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)weights);
                const uint16_t *v0 = v + t * task->slot_stride + (h / task->group) * head_dim;
                float *a = acc + h * head_dim;
                for (int d = 0; d < head_dim; d += 32) {
                    const __m512i x = _mm512_loadu_si512(v0 + d);
                    const __m512i y = paired ? _mm512_loadu_si512(v0 + task->slot_stride + d) : _mm512_setzero_si512();
                    _mm512_storeu_ps(a + d, _mm512_dpbf16_ps(_mm512_loadu_ps(a + d), (__m512bh)_mm512_unpacklo_epi16(x, y), pair));
                    _mm512_storeu_ps(a + d + 16,
                                     _mm512_dpbf16_ps(_mm512_loadu_ps(a + d + 16), (__m512bh)_mm512_unpackhi_epi16(x, y), pair));
                }
            }
        }
        i -= (hi - lo) % 2; /* an odd span's last pair had one slot */
    }
    for (int h = 0; h < heads; h++) {
        uint16_t *dst = out + h * out_head_stride;
        const float *a = acc + h * head_dim;
        for (int c = 0; c < head_dim; c += 32)
            for (int j = 0; j < 16; j++) {
                const int d = c + (j / 4) * 8 + j % 4;
                dst[d] = float_to_bf16(a[c + j]);
                dst[d + 4] = float_to_bf16(a[c + 16 + j]);
            }
    }
}
#define PAIRED_bf16(head_dim) ((head_dim) % 32 == 0)
#else
#define PAIRED_bf16(head_dim) 0
#define attend_bf16_paired attend_bf16
#endif
#define PAIRED_f32(head_dim) 0
#define attend_f32_paired attend_f32

#define DEFINE_PAGED_DECODE(T, E)                                                                    \
    int paged_decode_##T(const E *query, int64_t q_row_stride, int64_t q_head_stride,               \
                         const E *k_cache, const E *v_cache, int64_t block_stride, int64_t slot_stride, \
                         const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens, \
                         E *out, int64_t out_row_stride, int64_t out_head_stride,                   \
                         int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, \
                         float scale, int window, int num_threads) {                                \
        const int group = num_heads / num_kv_heads;                                                  \
        const int splits = split_heads(num_seqs, num_kv_heads, num_threads);                         \
        const int kv_per_task = (num_kv_heads + splits - 1) / splits;                                \
        const int paired = PAIRED_##T(head_dim);                                                     \
        int failed = 0;                                                                              \
        _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)")        \
        for (int s = 0; s < num_seqs; s++) {                                                         \
            for (int part = 0; part < splits; part++) {                                              \
                const int kv0 = part * kv_per_task;                                                  \
                const int kv1 = kv0 + kv_per_task < num_kv_heads ? kv0 + kv_per_task : num_kv_heads; \
                const int ctx = context_lens[s];                                                     \
                const int first = (window > 0 && ctx > window) ? ctx - window : 0;                  \
                Task task = {block_tables + (int64_t)s * table_stride, first, ctx, ctx - first,      \
                             block_size, kv0, kv1 - kv0, (kv1 - kv0) * group, group, head_dim,      \
                             block_stride, slot_stride};                                             \
                const E *q = query + s * q_row_stride + (int64_t)kv0 * group * q_head_stride;        \
                E *o = out + s * out_row_stride + (int64_t)kv0 * group * out_head_stride;            \
                if (task.heads <= 0) continue;                                                       \
                if (task.n <= 0) { /* an empty context attends to nothing: zeros */                  \
                    for (int h = 0; h < task.heads; h++)                                             \
                        for (int d = 0; d < head_dim; d++) narrow_##T(o + h * out_head_stride, d, 0.f); \
                    continue;                                                                        \
                }                                                                                    \
                float *scratch = malloc(sizeof(float) * scratch_floats(&task));                      \
                if (scratch == NULL) {                                                               \
                    failed = 1;                                                                      \
                    continue;                                                                        \
                }                                                                                    \
                if (paired)                                                                          \
                    attend_##T##_paired(&task, q, q_head_stride, k_cache, v_cache, o, out_head_stride, scale, scratch); \
                else                                                                                 \
                    attend_##T(&task, q, q_head_stride, k_cache, v_cache, o, out_head_stride, scale, scratch); \
                free(scratch);                                                                       \
            }                                                                                        \
        }                                                                                            \
        return failed;                                                                               \
    }

DEFINE_PAGED_DECODE(f32, float)
DEFINE_PAGED_DECODE(bf16, uint16_t)
