// Built with -ffast-math (CMakeLists.txt) and cloned per ISA, so that GCC calls glibc's vector
// expf/erff (libmvec): the scalar calls cost more than the expert GEMMs' share of the FFN at
// d_ff ~ 1k. Only elementwise maps live here; no reductions, so the results stay deterministic.
#include "cpu/activation.h"

#include <cmath>

#include "moe/moe.h"

// Not under ThreadSanitizer: GCC instruments the clones' IFUNC resolver, which the dynamic loader
// runs before the TSan runtime is initialised, and the process dies in relocation.
#if defined(__SANITIZE_THREAD__)
#define MOE_CLONES
#else
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

namespace moe::cpu {
namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Each loop is its own function so that the clone dispatch happens once per call, not per element.
MOE_CLONES void silu_fwd(const float *h, const float *g, float *o, int64_t n) {
  if (g) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = h[i] / (1.0f + std::exp(-h[i])) * g[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = h[i] / (1.0f + std::exp(-h[i]));
  }
}

MOE_CLONES void gelu_fwd(const float *h, const float *g, float *o, int64_t n) {
  if (g) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = 0.5f * h[i] * (1.0f + std::erf(h[i] * kInvSqrt2)) * g[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = 0.5f * h[i] * (1.0f + std::erf(h[i] * kInvSqrt2));
  }
}

MOE_CLONES void relu_fwd(const float *h, float *o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = h[i] > 0.0f ? h[i] : 0.0f;
}

MOE_CLONES void silu_bwd(const float *h, const float *g, float *d, float *dg, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-h[i]));
    const float a = h[i] * s, da = s * (1.0f + h[i] * (1.0f - s));
    if (g) {
      dg[i] = d[i] * a;
      d[i] = d[i] * g[i] * da;
    } else {
      d[i] = d[i] * da;
    }
  }
}

MOE_CLONES void gelu_bwd(const float *h, const float *g, float *d, float *dg, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float cdf = 0.5f * (1.0f + std::erf(h[i] * kInvSqrt2));
    const float a = h[i] * cdf, da = cdf + h[i] * kInvSqrt2Pi * std::exp(-0.5f * h[i] * h[i]);
    if (g) {
      dg[i] = d[i] * a;
      d[i] = d[i] * g[i] * da;
    } else {
      d[i] = d[i] * da;
    }
  }
}

MOE_CLONES void relu_bwd(const float *h, float *d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = h[i] > 0.0f ? d[i] : 0.0f;
}

// gpt-oss's clamped SwiGLU (moe.h, MOE_ACT_SWIGLU_CLAMPED). The clamps pass the gradient on
// their closed interval, as torch.clamp does.
MOE_CLONES void swiglu_clamped_fwd(const float *h, const float *g, float *o, int64_t n, float alpha, float limit) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float hc = h[i] < limit ? h[i] : limit;
    const float uc = g[i] < -limit ? -limit : (g[i] > limit ? limit : g[i]);
    o[i] = (uc + 1.0f) * (hc / (1.0f + std::exp(-alpha * hc)));
  }
}

MOE_CLONES void swiglu_clamped_bwd(const float *h, const float *g, float *d, float *dg, int64_t n, float alpha,
                                   float limit) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float hc = h[i] < limit ? h[i] : limit;
    const float uc = g[i] < -limit ? -limit : (g[i] > limit ? limit : g[i]);
    const float s = 1.0f / (1.0f + std::exp(-alpha * hc));
    const float glu = hc * s, dglu = s * (1.0f + alpha * hc * (1.0f - s));
    const float up_pass = (g[i] >= -limit && g[i] <= limit) ? 1.0f : 0.0f;
    const float gate_pass = h[i] <= limit ? 1.0f : 0.0f;
    dg[i] = d[i] * glu * up_pass;
    d[i] = d[i] * (uc + 1.0f) * dglu * gate_pass;
  }
}

}  // namespace

void activation_forward(int kind, const float *h, const float *g, float *out, int64_t n, float alpha, float limit) {
  switch (kind) {
    case MOE_ACT_SWIGLU_CLAMPED: swiglu_clamped_fwd(h, g, out, n, alpha, limit); break;
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: silu_fwd(h, g, out, n); break;
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: gelu_fwd(h, g, out, n); break;
    default: relu_fwd(h, out, n); break;
  }
}

void activation_backward(int kind, const float *h, const float *g, float *da_dh, float *dg, int64_t n, float alpha,
                         float limit) {
  switch (kind) {
    case MOE_ACT_SWIGLU_CLAMPED: swiglu_clamped_bwd(h, g, da_dh, dg, n, alpha, limit); break;
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: silu_bwd(h, g, da_dh, dg, n); break;
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: gelu_bwd(h, g, da_dh, dg, n); break;
    default: relu_bwd(h, da_dh, n); break;
  }
}

}  // namespace moe::cpu
