// Element types of activation storage for the CPU stages: each stage body is a template over the
// element type, so the float32 path stays a plain float loop the compiler vectorises and the
// bfloat16/float16 paths convert on load and round on store.
#pragma once
#include <cstdint>

#include "core/half.h"

namespace moe::cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float f32(float v) { return v; }
inline float f32(bf16 v) { return bf16_to_float(v.bits); }
inline float f32(f16 v) { return f16_to_float(v.bits); }
inline void put(float &dst, float v) { dst = v; }
inline void put(bf16 &dst, float v) { dst.bits = float_to_bf16(v); }
inline void put(f16 &dst, float v) { dst.bits = float_to_f16(v); }

// Calls f with a value of the element type of dtype (a tag: only its type is used).
template <class F>
void with_dtype(int dtype, F &&f) {
  switch (dtype) {
    case MOE_DTYPE_BF16:
      f(bf16{});
      break;
    case MOE_DTYPE_F16:
      f(f16{});
      break;
    default:
      f(float{});
      break;
  }
}

}  // namespace moe::cpu
