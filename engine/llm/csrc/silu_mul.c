/* The gated MLP's activation, silu(gate) * up, in one pass for CPU models (transformers computes
 * it as two tensor ops, each a pass over [tokens, intermediate] and, in bfloat16, a widening and a
 * rounding per element). bfloat16 results are rounded where PyTorch rounds them (after the silu,
 * after the product). Compiled with -ffast-math so expf vectorizes: the float32 silu may differ
 * from PyTorch's in its last bits, which engine/llm/cpu_fused.py's check against the model's own
 * MLP bounds before using it.
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
#pragma omp simd
            for (int i = 0; i < n; i++) {
                const float rounded = bf16_to_float(float_to_bf16(act[i]));
                o[start + i] = float_to_bf16(rounded * bf16_to_float(u[start + i]));
            }
        }
    }
}
