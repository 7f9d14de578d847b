// The expert FFN's elementwise maps, the same formulas as the CPU backend (src/cpu/activation.cpp).
#pragma once
#include "moe/moe.h"

namespace moe::cuda {

struct Act {
  float a, da;  // act(h) and act'(h)
};

__device__ inline Act activation(int kind, float h) {
  switch (kind) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: {
      const float s = 1.0f / (1.0f + expf(-h));
      return {h * s, s * (1.0f + h * (1.0f - s))};
    }
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: {
      const float cdf = 0.5f * (1.0f + erff(h * 0.70710678118654752f));
      return {h * cdf, cdf + h * 0.39894228040143268f * expf(-0.5f * h * h)};
    }
    default:
      return {h > 0.0f ? h : 0.0f, h > 0.0f ? 1.0f : 0.0f};
  }
}

// gpt-oss's clamped SwiGLU (moe.h, MOE_ACT_SWIGLU_CLAMPED) of gate h and up u: the output, and
// its derivatives in h and u (the clamps pass the gradient on their closed interval, as
// torch.clamp does).
struct Clamped {
  float a, dh, du;
};

__device__ inline Clamped swiglu_clamped(float h, float u, float alpha, float limit) {
  const float hc = h < limit ? h : limit;
  const float uc = u < -limit ? -limit : (u > limit ? limit : u);
  const float s = 1.0f / (1.0f + expf(-alpha * hc));
  const float glu = hc * s, dglu = s * (1.0f + alpha * hc * (1.0f - s));
  return {(uc + 1.0f) * glu, h <= limit ? (uc + 1.0f) * dglu : 0.0f, (u >= -limit && u <= limit) ? glu : 0.0f};
}

}  // namespace moe::cuda
