// Each expert's FFN over its rows: GEMM (W1 and W3 together for GLU), the activation over every
// row at once, GEMM; and the backward. GEMMs are issued per expert on the layer's stream, sized
// from the host offsets the plan returned.
#include "cuda/activation.cuh"
#include "cuda/cuda.h"
#include "cuda/gemm.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;

bool glu(int kind) { return kind == MOE_ACT_SWIGLU || kind == MOE_ACT_GEGLU; }

struct Rows {
  int64_t begin, n;
};

Rows rows_of(const moe_ffn_args *a, int64_t e) {
  if (a->shared_input) return {e * a->offsets[1], a->offsets[1]};
  return {a->offsets[e], a->offsets[e + 1] - a->offsets[e]};
}

// Rows of every expert together; they start at row 0 (the core's offsets begin at 0), so the
// activation runs over all of them in one launch.
int64_t total_rows(const moe_ffn_args *a) {
  if (!a->shared_input && a->offsets[0] != 0)
    fail(MOE_ERR_INTERNAL, "expert_ffn: offsets[0] is %lld, expected 0", (long long)a->offsets[0]);
  return a->shared_input ? a->num_experts * a->offsets[1] : a->offsets[a->num_experts];
}

const float *input_of(const moe_ffn_args *a, const Rows &r) {
  return a->shared_input ? a->x : a->x + r.begin * a->d;
}

__global__ void act_fwd_kernel(int kind, const float *h, const float *g, float *out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float a = activation(kind, h[i]).a;
    out[i] = g ? a * g[i] : a;
  }
}

// From d = dLoss/d(out): dh = d * g * act'(h), dg = d * act(h) (GLU); dh overwrites d.
__global__ void act_bwd_kernel(int kind, const float *h, const float *g, float *d_dh, float *dg, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const Act v = activation(kind, h[i]);
    const float d = d_dh[i];
    if (kind == MOE_ACT_RELU) {
      d_dh[i] = h[i] > 0.0f ? d : 0.0f;  // a select, as on the CPU: an inf or NaN gradient stays out
    } else if (g) {
      dg[i] = d * v.a;
      d_dh[i] = d * g[i] * v.da;
    } else {
      d_dh[i] = d * v.da;
    }
  }
}

void act_forward(State &st, const moe_ffn_args *a, int64_t n) {
  if (n == 0) return;
  act_fwd_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(
      a->activation, a->h, glu(a->activation) ? a->g : nullptr, a->a, n);
  check_launch("activation");
}

}  // namespace

moe_status expert_ffn(void *state, const moe_ffn_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t d = a->d, ff = a->ff;
    const bool is_glu = glu(a->activation);
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (r.n == 0) continue;
      const float *x = input_of(a, r);
      sgemm(st, false, true, r.n, ff, d, 1.0f, x, d, a->w1 + e * ff * d, d, 0.0f, a->h + r.begin * ff, ff);
      if (is_glu) sgemm(st, false, true, r.n, ff, d, 1.0f, x, d, a->w3 + e * ff * d, d, 0.0f, a->g + r.begin * ff, ff);
    }
    act_forward(st, a, checked_mul(total_rows(a), ff, "rows * d_ff"));
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (r.n == 0) continue;
      sgemm(st, false, true, r.n, d, ff, 1.0f, a->a + r.begin * ff, ff, a->w2 + e * d * ff, ff, 0.0f,
            a->y + r.begin * d, d);
    }
  });
}

moe_status expert_ffn_bwd(void *state, const moe_ffn_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t d = a->d, ff = a->ff;
    const bool is_glu = glu(a->activation);
    const int64_t n = checked_mul(total_rows(a), ff, "rows * d_ff");
    // A is recomputed rather than saved: one pass over H and G instead of R*ff more memory.
    act_forward(st, a, n);
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (r.n == 0) continue;
      const float *dy = a->dy + r.begin * d;
      // dW2 += dY^T A ; dA = dY W2 (into dh)
      sgemm(st, true, false, d, ff, r.n, 1.0f, dy, d, a->a + r.begin * ff, ff, 1.0f, a->dw2 + e * d * ff, ff);
      sgemm(st, false, false, r.n, ff, d, 1.0f, dy, d, a->w2 + e * d * ff, ff, 0.0f, a->dh + r.begin * ff, ff);
    }
    if (n > 0) {
      act_bwd_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(
          a->activation, a->h, is_glu ? a->g : nullptr, a->dh, is_glu ? a->dg : nullptr, n);
      check_launch("activation backward");
    }
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (r.n == 0) continue;
      const float *x = input_of(a, r);
      const float *dh = a->dh + r.begin * ff, *dg = is_glu ? a->dg + r.begin * ff : nullptr;
      sgemm(st, true, false, ff, d, r.n, 1.0f, dh, ff, x, d, 1.0f, a->dw1 + e * ff * d, d);
      if (is_glu) sgemm(st, true, false, ff, d, r.n, 1.0f, dg, ff, x, d, 1.0f, a->dw3 + e * ff * d, d);
      if (a->dx) {
        // Shared experts all read the same x, so their input gradients add into the caller's dx.
        float *dx = a->shared_input ? a->dx : a->dx + r.begin * d;
        const float beta = a->shared_input ? 1.0f : 0.0f;
        sgemm(st, false, false, r.n, d, ff, 1.0f, dh, ff, a->w1 + e * ff * d, d, beta, dx, d);
        if (is_glu) sgemm(st, false, false, r.n, d, ff, 1.0f, dg, ff, a->w3 + e * ff * d, d, 1.0f, dx, d);
      }
    }
  });
}

}  // namespace moe::cuda
