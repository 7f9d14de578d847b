// bfloat16 and IEEE float16 storage on the host: conversions to and from float32 (round to nearest
// even, NaN kept quiet, overflow to infinity) and the element size of each moe_dtype. Written out
// bit by bit so that the CPU backend and the host copies of parameters round exactly as the CUDA
// intrinsics (__float2bfloat16_rn, __float2half_rn) do, whatever the compiler supports.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moe/moe.h"

namespace moe {

inline size_t dtype_size(int dtype) { return dtype == MOE_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t); }

inline const char *dtype_name(int dtype) {
  switch (dtype) {
    case MOE_DTYPE_F32:
      return "float32";
    case MOE_DTYPE_BF16:
      return "bfloat16";
    case MOE_DTYPE_F16:
      return "float16";
    default:
      return "unknown";
  }
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; a carry into the exponent is right
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                        // below 2^-14: subnormal or zero
    const uint32_t e = a >> 23;
    if (e < 102) return sign;                        // below 2^-25: rounds to zero
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;  // value = m * 2^(e-150); want m * 2^(e-126)
    const uint32_t shift = 126 - e;                  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = a - (112u << 23);  // rebias the exponent from 127 to 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

// v as stored in dtype, back in float32.
inline float round_to(int dtype, float v) {
  switch (dtype) {
    case MOE_DTYPE_BF16:
      return bf16_to_float(float_to_bf16(v));
    case MOE_DTYPE_F16:
      return f16_to_float(float_to_f16(v));
    default:
      return v;
  }
}

// One element of a moe_dtype array, as float32.
inline float load_elem(const void *p, int dtype, int64_t i) {
  switch (dtype) {
    case MOE_DTYPE_BF16:
      return bf16_to_float(static_cast<const uint16_t *>(p)[i]);
    case MOE_DTYPE_F16:
      return f16_to_float(static_cast<const uint16_t *>(p)[i]);
    default:
      return static_cast<const float *>(p)[i];
  }
}

inline void store_elem(void *p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case MOE_DTYPE_BF16:
      static_cast<uint16_t *>(p)[i] = float_to_bf16(v);
      break;
    case MOE_DTYPE_F16:
      static_cast<uint16_t *>(p)[i] = float_to_f16(v);
      break;
    default:
      static_cast<float *>(p)[i] = v;
  }
}

// Element i of a moe_dtype array.
inline const void *elem_at(const void *p, int dtype, int64_t i) {
  return static_cast<const unsigned char *>(p) + static_cast<size_t>(i) * dtype_size(dtype);
}
inline void *elem_at(void *p, int dtype, int64_t i) {
  return static_cast<unsigned char *>(p) + static_cast<size_t>(i) * dtype_size(dtype);
}

// n elements from one dtype to another on the host, one thread (see the CPU backend's convert).
inline void convert_host(void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  if (dst_dtype == src_dtype) {
    if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(dst_dtype));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_elem(dst, dst_dtype, i, load_elem(src, src_dtype, i));
}

}  // namespace moe
