// Each token's weighted sum of its expert rows (a gather, no atomics), the shared experts'
// contribution, and their backward.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu.h"

namespace moe::cpu {

// out[t] = sum over t's rows r of weight[r] * src[r] (weight NULL: 1), a gather in the order the
// rows are listed: deterministic, no atomics. Shared with dispatch_bwd.
void sum_token_rows(const moe_rows_args *a, const float *src, const float *weight, float *out_rows) {
  const int64_t d = a->d;
#pragma omp parallel for schedule(static) if (worth_threads(a->T * d))
  for (int64_t t = 0; t < a->T; ++t) {
    float *out = out_rows + t * d;
    std::memset(out, 0, sizeof(float) * d);
    const int64_t b = a->token_offsets ? a->token_offsets[t] : t * a->k;
    const int64_t e = a->token_offsets ? a->token_offsets[t + 1] : (t + 1) * a->k;
    for (int64_t i = b; i < e; ++i) {
      const int32_t r = a->token_rows[i];
      if (r < 0) continue;
      const float *row = src + static_cast<int64_t>(r) * d;
      if (weight) {
        const float w = weight[r];
        for (int64_t c = 0; c < d; ++c) out[c] += w * row[c];
      } else {
        for (int64_t c = 0; c < d; ++c) out[c] += row[c];
      }
    }
  }
}

moe_status combine(void *st, const moe_rows_args *a) {
  return guarded(st, [&] { sum_token_rows(a, a->ye, a->row_weight, a->y); });
}

moe_status combine_bwd(void *st, const moe_rows_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d;
#pragma omp parallel for schedule(static) if (worth_threads(a->R * d))
    for (int64_t r = 0; r < a->R; ++r) {
      const float *g = a->dy + static_cast<int64_t>(a->row_token[r]) * d;
      const float *ye = a->ye + r * d;
      float *dye = a->dye + r * d;
      const float w = a->row_weight[r];
      float dot = 0.0f;
      for (int64_t c = 0; c < d; ++c) {
        dye[c] = w * g[c];
        dot += g[c] * ye[c];
      }
      a->drow_weight[r] = dot;
    }
  });
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

moe_status shared_combine(void *st, const moe_shared_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d, T = a->T;
#pragma omp parallel for schedule(static) if (worth_threads(T * d))
    for (int64_t t = 0; t < T; ++t) {
      const float *x = a->x + t * d;
      float gv = 1.0f;
      if (a->gate_w) {
        float z = 0.0f;
        for (int64_t c = 0; c < d; ++c) z += x[c] * a->gate_w[c];
        gv = sigmoid(z);
        if (a->gate) a->gate[t] = gv;
      }
      float *y = a->y + t * d;
      for (int64_t s = 0; s < a->S; ++s) {
        const float *ys = a->ys + (s * T + t) * d;
        for (int64_t c = 0; c < d; ++c) y[c] += gv * ys[c];
      }
    }
  });
}

moe_status shared_combine_bwd(void *st, const moe_shared_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d, T = a->T;
    std::vector<float> own(a->gate_w && !a->scratch ? static_cast<size_t>(T) : 0);
    float *dpre = a->scratch ? a->scratch : own.data();
#pragma omp parallel for schedule(static) if (worth_threads(T * d * a->S))
    for (int64_t t = 0; t < T; ++t) {
      const float *dy = a->dy + t * d;
      const float gv = a->gate_w ? a->gate[t] : 1.0f;
      float dgate = 0.0f;
      for (int64_t s = 0; s < a->S; ++s) {
        const float *ys = a->ys + (s * T + t) * d;
        float *dys = a->dys + (s * T + t) * d;
        for (int64_t c = 0; c < d; ++c) {
          dys[c] = gv * dy[c];
          dgate += dy[c] * ys[c];
        }
      }
      if (a->gate_w) {
        float dp = dgate * gv * (1.0f - gv);
        dpre[t] = dp;
        if (a->dx) {
          float *dx = a->dx + t * d;
          for (int64_t c = 0; c < d; ++c) dx[c] += dp * a->gate_w[c];
        }
      }
    }
    if (a->gate_w) {
      // Column sums in token order: the same bits for any thread count.
#pragma omp parallel for schedule(static) if (worth_threads(T * d))
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.0f;
        for (int64_t t = 0; t < T; ++t) acc += dpre[t] * a->x[t * d + c];
        a->dgate_w[c] += acc;
      }
    }
  });
}

}  // namespace moe::cpu
