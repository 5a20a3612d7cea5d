/* The gated MLP's activation, silu(gate) * up, in one pass for CPU models (transformers computes
 * it as two tensor ops, each a pass over [tokens, intermediate] and, in bfloat16, a widening and a
 * rounding per element). bfloat16 results are rounded where PyTorch rounds them (after the silu,
 * after the product). Compiled with -ffast-math so expf vectorizes: the float32 silu may differ
 * from PyTorch's in its last bits, which engine/llm/cpu_fused.py's check against the model's own
 * MLP bounds before using it. With AVX-512 the rounding and the product run 16 lanes at a time
 * (1,876 x 1,376 bfloat16 on 2 cores: 1.27 -> 0.86 ms).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

void silu_mul_f32(const float *gate, const float *up, int64_t in_row_stride, float *out, int64_t rows, int width,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * in_row_stride, *u = up + r * in_row_stride;
        float *o = out + r * (int64_t)width;
        for (int i = 0; i < width; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

void silu_mul_bf16(const uint16_t *gate, const uint16_t *up, int64_t in_row_stride, uint16_t *out, int64_t rows,
                   int width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate + r * in_row_stride, *u = up + r * in_row_stride;
        uint16_t *o = out + r * (int64_t)width;
        float act[256]; /* one chunk at a time, in simple loops that vectorize */
        for (int start = 0; start < width; start += 256) {
            const int n = width - start < 256 ? width - start : 256;
#pragma omp simd
            for (int i = 0; i < n; i++) {
                const float x = bf16_to_float(g[start + i]);
                act[i] = x / (1.f + expf(-x));
            }
#ifdef __AVX512F__
            if (n % 16 == 0) {
                for (int i = 0; i < n; i += 16)
                    store16_bf16(o + start + i, _mm512_mul_ps(round16_bf16(_mm512_loadu_ps(act + i)),
                                                              load16_bf16(u + start + i)));
                continue;
            }
#endif
#pragma omp simd
            for (int i = 0; i < n; i++) {
                const float rounded = bf16_to_float(float_to_bf16(act[i]));
                o[start + i] = float_to_bf16(rounded * bf16_to_float(u[start + i]));
            }
        }
    }
}
