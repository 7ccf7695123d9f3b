// SIMD pieces shared by the native CPU extension's sources (int_gemm.cpp, decode_ops.cpp).
// QRT_AVX2 is 1 when the build enabled AVX2, FMA and F16C (cpu_ext.py passes -mavx2 -mfma -mf16c only when the
// host has all three); every source then keeps a scalar path under #if !QRT_AVX2.
#pragma once

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QRT_AVX2 1
#else
#define QRT_AVX2 0
#endif

#if QRT_AVX2
// The sum of the 8 lanes of v.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
