/* bfloat16 <-> float32 as PyTorch converts them: widening is exact, narrowing rounds to nearest
 * even and keeps NaN a NaN. Shared by the CPU kernels in this folder. */
#ifndef EMBER_BF16_H
#define EMBER_BF16_H
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint16_t float_to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#ifdef __AVX512F__
/* float_to_bf16 of 16 lanes. With AVX512-BF16 one instruction (round to nearest even as PyTorch
 * rounds; it reads float32 denormals, below 1.2e-38, as zero); else float_to_bf16's integer steps. */
static inline __m256i narrow16(__m512 x) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i kept = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(kept, 16));
#endif
}

static inline __m512 widen16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16_bf16(const uint16_t *p) { return widen16(_mm256_loadu_si256((const __m256i *)p)); }

/* x rounded to bfloat16 and back (round_bf16) */
static inline __m512 round16_bf16(__m512 x) { return widen16(narrow16(x)); }

static inline void store16_bf16(uint16_t *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, narrow16(x)); }
#endif
#endif
