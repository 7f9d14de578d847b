// Each expert's FFN over its rows: GEMM, activation (GLU or plain), GEMM; and the backward.
#include <algorithm>

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "cpu/cpu.h"

namespace moe::cpu {

namespace {

// Elementwise work split into contiguous chunks, one per thread, each a vectorised call.
template <class F>
void chunked(int64_t n, F &&f) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk) - c * kChunk);
}

bool glu(int kind) { return kind == MOE_ACT_SWIGLU || kind == MOE_ACT_GEGLU; }

struct Rows {
  int64_t begin, n;
};

Rows rows_of(const moe_ffn_args *a, int64_t e) {
  if (a->shared_input) return {e * a->offsets[1], a->offsets[1]};
  return {a->offsets[e], a->offsets[e + 1] - a->offsets[e]};
}

const float *input_of(const moe_ffn_args *a, const Rows &r) {
  return a->shared_input ? a->x : a->x + r.begin * a->d;
}

}  // namespace

moe_status expert_ffn(void *st, const moe_ffn_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d, ff = a->ff;
    const bool is_glu = glu(a->activation);
    for (int64_t e = 0; e < a->num_experts; ++e) {
      Rows r = rows_of(a, e);
      if (r.n == 0) continue;
      const float *x = input_of(a, r);
      float *h = a->h + r.begin * ff;
      float *g = is_glu ? a->g + r.begin * ff : nullptr;
      float *act_out = a->a + r.begin * ff;
      sgemm(false, true, r.n, ff, d, 1.0f, x, d, a->w1 + e * ff * d, d, 0.0f, h, ff);
      if (is_glu) sgemm(false, true, r.n, ff, d, 1.0f, x, d, a->w3 + e * ff * d, d, 0.0f, g, ff);
      chunked(r.n * ff, [&](int64_t at, int64_t len) {
        activation_forward(a->activation, h + at, g ? g + at : nullptr, act_out + at, len);
      });
      sgemm(false, true, r.n, d, ff, 1.0f, act_out, ff, a->w2 + e * d * ff, ff, 0.0f, a->y + r.begin * d, d);
    }
  });
}

moe_status expert_ffn_bwd(void *st, const moe_ffn_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d, ff = a->ff;
    const bool is_glu = glu(a->activation);
    const int kind = a->activation;
    for (int64_t e = 0; e < a->num_experts; ++e) {
      Rows r = rows_of(a, e);
      if (r.n == 0) {
        continue;
      }
      const float *x = input_of(a, r);
      const float *h = a->h + r.begin * ff;
      const float *g = is_glu ? a->g + r.begin * ff : nullptr;
      const float *dy = a->dy + r.begin * d;
      float *act_out = a->a + r.begin * ff;
      float *dh = a->dh + r.begin * ff;
      float *dg = is_glu ? a->dg + r.begin * ff : nullptr;
      const float *w1 = a->w1 + e * ff * d, *w2 = a->w2 + e * d * ff;
      const float *w3 = is_glu ? a->w3 + e * ff * d : nullptr;
      // A is recomputed rather than saved: one pass over H and G instead of R*ff more memory.
      chunked(r.n * ff, [&](int64_t at, int64_t len) {
        activation_forward(kind, h + at, g ? g + at : nullptr, act_out + at, len);
      });
      // dW2 += dY^T A ; dA = dY W2 (into dh)
      sgemm(true, false, d, ff, r.n, 1.0f, dy, d, act_out, ff, 1.0f, a->dw2 + e * d * ff, ff);
      sgemm(false, false, r.n, ff, d, 1.0f, dy, d, w2, ff, 0.0f, dh, ff);
      chunked(r.n * ff, [&](int64_t at, int64_t len) {
        activation_backward(kind, h + at, g ? g + at : nullptr, dh + at, dg ? dg + at : nullptr, len);
      });
      sgemm(true, false, ff, d, r.n, 1.0f, dh, ff, x, d, 1.0f, a->dw1 + e * ff * d, d);
      if (is_glu) sgemm(true, false, ff, d, r.n, 1.0f, dg, ff, x, d, 1.0f, a->dw3 + e * ff * d, d);
      if (a->dx) {
        // Shared experts all read the same x, so their input gradients add into the caller's dx.
        float *dx = a->shared_input ? a->dx : a->dx + r.begin * d;
        const float beta = a->shared_input ? 1.0f : 0.0f;
        sgemm(false, false, r.n, d, ff, 1.0f, dh, ff, w1, d, beta, dx, d);
        if (is_glu) sgemm(false, false, r.n, d, ff, 1.0f, dg, ff, w3, d, 1.0f, dx, d);
      }
    }
  });
}

}  // namespace moe::cpu
