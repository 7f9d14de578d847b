// Rows of X gathered in expert order (16-byte accesses where the layout allows), and the backward
// gather that sums each token's rows.
#include "cuda/cuda.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 128;

// A row copy moves bits, whatever the dtype: U is the unit moved (16 bytes, or one element), n the
// units per row.
template <class U>
__global__ void gather_rows_kernel(const U *x, const int32_t *row_token, U *xe, int64_t R, int64_t n) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const U *src = x + int64_t{row_token[r]} * n;
    U *dst = xe + r * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

template <class U>
void gather(State &st, const moe_rows_args *a, int64_t units_per_row) {
  gather_rows_kernel<U><<<grid_rows(a->R), kThreads, 0, st.stream>>>(static_cast<const U *>(a->x), a->row_token,
                                                                     static_cast<U *>(a->xe), a->R, units_per_row);
}

}  // namespace

moe_status dispatch(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) {
    if (a->R == 0 || a->d == 0) return;
    with_dtype(a->dtype, "dispatch", [&](auto type) {
      using T = typename decltype(type)::type;
      const int64_t row_bytes = checked_mul(a->d, static_cast<int64_t>(sizeof(T)), "d_model * element size");
      if (vec_ok(row_bytes, 16, {a->x, a->xe}))
        gather<uint4>(st, a, row_bytes / 16);
      else
        gather<T>(st, a, a->d);
    });
    check_launch("dispatch");
  });
}

// Each token's input gradient: the unweighted sum of its rows' gradients, in float32.
moe_status dispatch_bwd(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) { sum_token_rows(st, a, a->dxe, nullptr, a->dx); });
}

}  // namespace moe::cuda
