// Rows of X gathered in expert order (16-byte accesses where the layout allows), and the backward
// gather that sums each token's rows.
#include "cuda/cuda.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 128;

template <bool kVec>
__global__ void gather_rows_kernel(const float *x, const int32_t *row_token, float *xe, int64_t R, int64_t d) {
  using Io = RowIo<kVec>;
  const int64_t n = d / Io::kWidth;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *src = x + int64_t{row_token[r]} * d;
    float *dst = xe + r * d;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) Io::store(dst, i, Io::load(src, i));
  }
}

}  // namespace

moe_status dispatch(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) {
    if (a->R == 0 || a->d == 0) return;
    const unsigned g = grid_rows(a->R);
    if (vec4_ok(a->d, {a->x, a->xe}))
      gather_rows_kernel<true><<<g, kThreads, 0, st.stream>>>(a->x, a->row_token, a->xe, a->R, a->d);
    else
      gather_rows_kernel<false><<<g, kThreads, 0, st.stream>>>(a->x, a->row_token, a->xe, a->R, a->d);
    check_launch("dispatch");
  });
}

// Each token's input gradient: the unweighted sum of its rows' gradients.
moe_status dispatch_bwd(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) { sum_token_rows(st, a, a->dxe, nullptr, a->dx); });
}

}  // namespace moe::cuda
