// The expert FFN's elementwise kernels, vectorised (see activation.cpp).
#pragma once
#include <cstdint>

namespace moe::cpu {

// out = act(h) * g (GLU) or act(h) (g == nullptr), over n elements; MOE_ACT_SWIGLU_CLAMPED:
// out = (clamp(g, -limit, limit) + 1) * hc * sigmoid(alpha * hc), hc = min(h, limit).
void activation_forward(int kind, const float *h, const float *g, float *out, int64_t n, float alpha = 0.0f,
                        float limit = 0.0f);

// From da = dLoss/d(out): dh = da * g * act'(h), dg = da * act(h) (GLU; g, dg nullptr otherwise).
// dh may alias da.
void activation_backward(int kind, const float *h, const float *g, float *da_dh, float *dg, int64_t n,
                         float alpha = 0.0f, float limit = 0.0f);

}  // namespace moe::cpu
