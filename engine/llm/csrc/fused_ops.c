/* Elementwise steps of a decoder layer fused into one pass each, for CPU models: RMSNorm and rotary
 * position embeddings. Each reproduces the rounding of the PyTorch code it replaces (transformers'
 * LlamaRMSNorm and apply_rotary_pos_emb): bfloat16 results are rounded where PyTorch rounds them,
 * and this file is compiled without -ffast-math or FMA contraction, so float32 products and sums
 * are the ones PyTorch computes (engine/llm/cpu_fused.py checks each against the original before
 * using it). With AVX-512, bfloat16 rows run 16 lanes at a time through the same per-element steps
 * (with AVX512-BF16 each rounding is one instruction); at 1,876 tokens of the serving benchmark's
 * model on 2 cores, rotary of q and k 1.0 -> 0.37 ms, RMSNorm 0.28 -> 0.16 ms.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

static inline float widen_f32(const float *p, int64_t i) { return p[i]; }
static inline float round_f32(float x) { return x; }
static inline void narrow_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline float widen_bf16(const uint16_t *p, int64_t i) { return bf16_to_float(p[i]); }

/* x rounded to bfloat16 and back: what a bfloat16 tensor op stores */
static inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

static inline void narrow_bf16(uint16_t *p, int64_t i, float x) { p[i] = float_to_bf16(x); }

/* bfloat16 rows 16 elements at a time with AVX-512 (where the row length is a multiple of 16):
 * the same products, sums and roundings as the scalar loops, in the same order per element. */
#ifdef __AVX512F__
static void scale_row16_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *y, int hidden, float inv) {
    const __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < hidden; i += 16)
        store16_bf16(y + i, _mm512_mul_ps(load16_bf16(weight + i), round16_bf16(_mm512_mul_ps(load16_bf16(x + i), scale))));
}

/* y = x * cos + rotate_half(x) * sin over one head of 2 * half elements */
static void rotate16_bf16(const uint16_t *x, uint16_t *y, const uint16_t *cos, const uint16_t *sin, int half) {
    for (int j = 0; j < half; j += 16) {
        const __m512 x1 = load16_bf16(x + j), x2 = load16_bf16(x + half + j);
        const __m512 a1 = round16_bf16(_mm512_mul_ps(x1, load16_bf16(cos + j)));
        const __m512 b1 = round16_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16_bf16(sin + j)));
        const __m512 a2 = round16_bf16(_mm512_mul_ps(x2, load16_bf16(cos + half + j)));
        const __m512 b2 = round16_bf16(_mm512_mul_ps(x1, load16_bf16(sin + half + j)));
        store16_bf16(y + j, _mm512_add_ps(a1, b1));
        store16_bf16(y + half + j, _mm512_add_ps(a2, b2));
    }
}
#define VECTOR_ROWS_bf16(n) ((n) % 16 == 0)
#else
#define VECTOR_ROWS_bf16(n) 0
#define scale_row16_bf16(...)
#define rotate16_bf16(...)
#endif
#define VECTOR_ROWS_f32(n) 0
#define scale_row16_f32(...)
#define rotate16_f32(...)

/* out = weight * dtype(x * rsqrt(mean(x^2) + eps)), statistics in float32, per row of `hidden`. */
#define DEFINE_RMS_NORM(T, E)                                                                        \
    void rms_norm_##T(const E *x, int64_t x_row_stride, const E *weight, E *out, int64_t out_row_stride, \
                      int64_t rows, int hidden, float eps, int num_threads) {                       \
        _Pragma("omp parallel for num_threads(num_threads) if (rows * hidden >= 65536)")              \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            const E *xr = x + r * x_row_stride;                                                      \
            E *yr = out + r * out_row_stride;                                                        \
            float sum = 0.f;                                                                         \
            _Pragma("omp simd reduction(+ : sum)")                                                   \
            for (int i = 0; i < hidden; i++) {                                                       \
                const float v = widen_##T(xr, i);                                                    \
                sum += v * v;                                                                        \
            }                                                                                        \
            const float inv = 1.f / sqrtf(sum / (float)hidden + eps);                                \
            if (VECTOR_ROWS_##T(hidden)) {                                                           \
                scale_row16_##T(xr, weight, yr, hidden, inv);                                        \
                continue;                                                                            \
            }                                                                                        \
            for (int i = 0; i < hidden; i++)                                                         \
                narrow_##T(yr, i, widen_##T(weight, i) * round_##T(widen_##T(xr, i) * inv));        \
        }                                                                                            \
    }

/* q and k [tokens, heads, head_dim] (strided) rotated by cos/sin [tokens, head_dim]:
 * out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]). */
#define DEFINE_ROTARY(T, E)                                                                          \
    static void rotate_##T(const E *x, int64_t x_tok, int64_t x_head, E *y, int64_t y_tok, int64_t y_head, \
                           const E *cos, const E *sin, int64_t cs_tok, int tokens, int heads, int head_dim, \
                           int num_threads) {                                                        \
        const int half = head_dim / 2;                                                               \
        _Pragma("omp parallel for num_threads(num_threads) if ((int64_t)tokens * heads * head_dim >= 65536)") \
        for (int t = 0; t < tokens; t++) {                                                           \
            const E *c = cos + t * cs_tok, *s = sin + t * cs_tok;                                    \
            for (int h = 0; h < heads; h++) {                                                        \
                const E *xh = x + t * x_tok + h * x_head;                                            \
                E *yh = y + t * y_tok + h * y_head;                                                  \
                if (VECTOR_ROWS_##T(half)) {                                                         \
                    rotate16_##T(xh, yh, c, s, half);                                                \
                    continue;                                                                        \
                }                                                                                    \
                for (int d = 0; d < head_dim; d++) {                                                 \
                    const float rot = d < half ? -widen_##T(xh, d + half) : widen_##T(xh, d - half); \
                    const float a = round_##T(widen_##T(xh, d) * widen_##T(c, d));                  \
                    const float b = round_##T(rot * widen_##T(s, d));                                \
                    narrow_##T(yh, d, a + b);                                                        \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    void rotary_##T(const E *q, int64_t q_tok, int64_t q_head, E *q_out, int64_t qo_tok, int64_t qo_head, \
                    int q_heads, const E *k, int64_t k_tok, int64_t k_head, E *k_out, int64_t ko_tok,   \
                    int64_t ko_head, int k_heads, const E *cos, const E *sin, int64_t cs_tok, int tokens, \
                    int head_dim, int num_threads) {                                                 \
        rotate_##T(q, q_tok, q_head, q_out, qo_tok, qo_head, cos, sin, cs_tok, tokens, q_heads, head_dim, \
                   num_threads);                                                                     \
        rotate_##T(k, k_tok, k_head, k_out, ko_tok, ko_head, cos, sin, cs_tok, tokens, k_heads, head_dim, \
                   num_threads);                                                                     \
    }

DEFINE_RMS_NORM(f32, float)
DEFINE_RMS_NORM(bf16, uint16_t)
DEFINE_ROTARY(f32, float)
DEFINE_ROTARY(bf16, uint16_t)
