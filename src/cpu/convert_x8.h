// Eight float32 lanes to and from 16-bit storage, in registers, with core/half.h's bits (AVX2;
// float16 on F16C): for kernels that read and write 16-bit arrays in place (cpu/convert.cpp's
// array loops, few_rows.cpp's weight gradients). Callers compile for AVX2 and F16C at least and
// call only where the CPU has them.
#pragma once
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#include <cpuid.h>
#include <immintrin.h>

#include "moe/moe.h"

#define MOE_X8 __attribute__((target("avx2,f16c")))

namespace moe::cpu::x8 {

// Whether the CPU has what this header's functions need: AVX2 and F16C (F16C read from CPUID:
// clang 14's __builtin_cpu_supports does not know it).
inline bool supported() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
    return __builtin_cpu_supports("avx2") && f16c;
  }();
  return yes;
}

// float16. The instructions round to nearest even for every input (subnormal results too: MXCSR's
// FTZ and DAZ do not apply), so only NaNs need mending: a narrowed NaN becomes its sign and
// 0x7e00, and a widened signalling NaN stays signalling (the instruction sets its quiet bit).
MOE_X8 inline __m256 widen_f16(__m128i h) {
  const __m256i w = _mm256_cvtepu16_epi32(h);
  const __m256i signalling = _mm256_andnot_si256(
      _mm256_cmpeq_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x1ff)), _mm256_setzero_si256()),
      _mm256_cmpeq_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7e00)), _mm256_set1_epi32(0x7c00)));
  const __m256 f = _mm256_cvtph_ps(h);
  return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_and_si256(signalling, _mm256_set1_epi32(0x400000))), f);
}

MOE_X8 inline __m128i narrow_f16(__m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i nan = _mm_cmpgt_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_set1_epi16(0x7c00));
  const __m128i canonical =
      _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(h, canonical, nan);
}

// bfloat16: exact widening; narrowing to nearest even, a NaN kept with its quiet bit set.
MOE_X8 inline __m256 widen_bf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MOE_X8 inline __m128i narrow_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  // 32 -> 16 bits within each half, then the halves' low quarters together
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

MOE_X8 inline __m256 widen(int dtype, const void *p) {
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i *>(p));
  return dtype == MOE_DTYPE_BF16 ? widen_bf16(h) : widen_f16(h);
}

MOE_X8 inline void narrow(int dtype, void *p, __m256 v) {
  _mm_storeu_si128(static_cast<__m128i *>(p), dtype == MOE_DTYPE_BF16 ? narrow_bf16(v) : narrow_f16(v));
}

}  // namespace moe::cpu::x8
#endif
