// Rows of X gathered in expert order, and the backward gather that sums each token's rows.
#include <cstring>

#include "core/half.h"
#include "cpu/cpu.h"

namespace moe::cpu {

moe_status dispatch(void *st, const moe_rows_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d;
#pragma omp parallel for schedule(static) if (worth_threads(a->R * d))
    for (int64_t r = 0; r < a->R; ++r)
      std::memcpy(elem_at(a->xe, a->dtype, r * d), elem_at(a->x, a->dtype, static_cast<int64_t>(a->row_token[r]) * d),
                  dtype_size(a->dtype) * d);
  });
}

// Each token's input gradient: the unweighted sum of its rows' gradients.
moe_status dispatch_bwd(void *st, const moe_rows_args *a) {
  return guarded(st, [&] { sum_token_rows(a, a->dxe, nullptr, a->dx); });
}

}  // namespace moe::cpu
