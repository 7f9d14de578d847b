// Conversions between activation dtypes, and the search for the first non-finite element.
#include <cmath>

#include "cpu/convert.h"

#include <cstring>

#include "cpu/cpu.h"
#include "cpu/elem.h"

// Not under ThreadSanitizer: see activation.cpp.
#if defined(__SANITIZE_THREAD__)
#define MOE_CLONES
#else
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

namespace moe::cpu {
namespace {

// Branch-free forms of core/half.h's conversions, so that the loops below vectorise.
inline uint16_t bf16_bits(uint32_t u) {
  const uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

MOE_CLONES void bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
  uint32_t *d = reinterpret_cast<uint32_t *>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(src[i]) << 16;
}

MOE_CLONES void f32_to_bf16(uint16_t *dst, const float *src, int64_t n) {
  const uint32_t *s = reinterpret_cast<const uint32_t *>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(s[i]);
}

MOE_CLONES void f32_store_bf16(uint16_t *dst, float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = bf16_bits(u[i]);
    dst[i] = b;
    u[i] = static_cast<uint32_t>(b) << 16;
  }
}

MOE_CLONES void f32_round_bf16(float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = static_cast<uint32_t>(bf16_bits(u[i])) << 16;
}

}  // namespace

void widen(float *dst, const void *src, int dtype, int64_t n) {
  if (n <= 0) return;
  if (dtype == MOE_DTYPE_BF16) return bf16_to_f32(dst, static_cast<const uint16_t *>(src), n);
  if (dtype == MOE_DTYPE_F32) {
    if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t *s = static_cast<const uint16_t *>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
}

void narrow(void *dst, int dtype, const float *src, int64_t n) {
  if (n <= 0) return;
  if (dtype == MOE_DTYPE_BF16) return f32_to_bf16(static_cast<uint16_t *>(dst), src, n);
  if (dtype == MOE_DTYPE_F32) {
    if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  uint16_t *d = static_cast<uint16_t *>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_f16(src[i]);
}

void narrow_rounded(void *dst, int dtype, float *v, int64_t n) {
  if (n <= 0 || dtype == MOE_DTYPE_F32) return;
  if (dtype == MOE_DTYPE_BF16) return f32_store_bf16(static_cast<uint16_t *>(dst), v, n);
  uint16_t *d = static_cast<uint16_t *>(dst);
  for (int64_t i = 0; i < n; ++i) {
    d[i] = float_to_f16(v[i]);
    v[i] = f16_to_float(d[i]);
  }
}

void round_in_place(float *v, int dtype, int64_t n) {
  if (dtype == MOE_DTYPE_BF16) return f32_round_bf16(v, n);
  if (dtype == MOE_DTYPE_F16)
    for (int64_t i = 0; i < n; ++i) v[i] = f16_to_float(float_to_f16(v[i]));
}

moe_status convert(void *st, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  return guarded(st, [&] {
    if (dst_dtype == src_dtype) {
      convert_host(dst, dst_dtype, src, src_dtype, n);
      return;
    }
    with_dtype(dst_dtype, [&](auto dtag) {
      with_dtype(src_dtype, [&](auto stag) {
        using D = decltype(dtag);
        using S = decltype(stag);
        D *out = static_cast<D *>(dst);
        const S *in = static_cast<const S *>(src);
#pragma omp parallel for schedule(static) if (worth_threads(n))
        for (int64_t i = 0; i < n; ++i) put(out[i], f32(in[i]));
      });
    });
  });
}

moe_status find_nonfinite(void *st, const void *p, int dtype, int64_t n, int64_t *first) {
  return guarded(st, [&] {
    *first = -1;
    with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      const E *v = static_cast<const E *>(p);
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(f32(v[i]))) {
          *first = i;
          break;
        }
    });
  });
}

}  // namespace moe::cpu
