/* AVX2 helpers more than one kernel file uses (ort_api.h stays free of intrinsics). */

#ifndef LOWBIT_SIMD_H
#define LOWBIT_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* 16 float32 values (lo: 0..7, hi: 8..15) into y, the first `width` of them (at most 16). */
static inline void store16(float *y, __m256 lo, __m256 hi, int64_t width) {
  if (width == 16) {
    _mm256_storeu_ps(y, lo);
    _mm256_storeu_ps(y + 8, hi);
    return;
  }
  float out[16];
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
  memcpy(y, out, sizeof(float) * (size_t)width);
}

/* The largest of 8 floats (vmaxps' order: a NaN lane gives the other operand). */
static inline float max8(__m256 x) {
  const __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 h2 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_max_ss(h2, _mm_movehdup_ps(h2)));
}

#endif
