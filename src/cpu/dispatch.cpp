// Rows of X gathered in expert order, and the backward gather that sums each token's rows.
#include <cstring>

#include "cpu/cpu.h"

namespace moe::cpu {

moe_status dispatch(void *st, const moe_rows_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d;
#pragma omp parallel for schedule(static) if (worth_threads(a->R * d))
    for (int64_t r = 0; r < a->R; ++r)
      std::memcpy(a->xe + r * d, a->x + static_cast<int64_t>(a->row_token[r]) * d, sizeof(float) * d);
  });
}

// A gather per token over its rows in a fixed order: deterministic, no atomics.
moe_status dispatch_bwd(void *st, const moe_rows_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d;
#pragma omp parallel for schedule(static) if (worth_threads(a->T * d))
    for (int64_t t = 0; t < a->T; ++t) {
      float *out = a->dx + t * d;
      std::memset(out, 0, sizeof(float) * d);
      int64_t b = a->token_offsets ? a->token_offsets[t] : t * a->k;
      int64_t e = a->token_offsets ? a->token_offsets[t + 1] : (t + 1) * a->k;
      for (int64_t i = b; i < e; ++i) {
        int32_t r = a->token_rows[i];
        if (r < 0) continue;
        const float *src = a->dxe + static_cast<int64_t>(r) * d;
        for (int64_t c = 0; c < d; ++c) out[c] += src[c];
      }
    }
  });
}

}  // namespace moe::cpu
