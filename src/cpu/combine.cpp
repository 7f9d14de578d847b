// Each token's weighted sum of its expert rows (a gather, no atomics), the shared experts'
// contribution, and their backward. Rows are in the args' dtype; sums are float32.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/elem.h"

namespace moe::cpu {

// out[t] = sum over t's rows r of weight[r] * src[r] (weight NULL: 1), a gather in the order the
// rows are listed: deterministic, no atomics. Shared with dispatch_bwd.
void sum_token_rows(const moe_rows_args *a, const void *src_rows, const float *weight, float *out_rows) {
  const int64_t d = a->d;
  with_dtype(a->dtype, [&](auto tag) {
    using E = decltype(tag);
    const E *src = static_cast<const E *>(src_rows);
#pragma omp parallel for schedule(static) if (worth_threads(a->T * d))
    for (int64_t t = 0; t < a->T; ++t) {
      float *out = out_rows + t * d;
      std::memset(out, 0, sizeof(float) * d);
      const int64_t b = a->token_offsets ? a->token_offsets[t] : t * a->k;
      const int64_t e = a->token_offsets ? a->token_offsets[t + 1] : (t + 1) * a->k;
      for (int64_t i = b; i < e; ++i) {
        const int32_t r = a->token_rows[i];
        if (r < 0) continue;
        const E *row = src + static_cast<int64_t>(r) * d;
        if (weight) {
          const float w = weight[r];
          for (int64_t c = 0; c < d; ++c) out[c] += w * f32(row[c]);
        } else {
          for (int64_t c = 0; c < d; ++c) out[c] += f32(row[c]);
        }
      }
    }
  });
}

moe_status combine(void *st, const moe_rows_args *a) {
  return guarded(st, [&] { sum_token_rows(a, a->ye, a->row_weight, a->y); });
}

moe_status combine_bwd(void *st, const moe_rows_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d;
    with_dtype(a->dtype, [&](auto tag) {
      using E = decltype(tag);
#pragma omp parallel for schedule(static) if (worth_threads(a->R * d))
      for (int64_t r = 0; r < a->R; ++r) {
        const E *g = static_cast<const E *>(a->dy) + static_cast<int64_t>(a->row_token[r]) * d;
        const E *ye = static_cast<const E *>(a->ye) + r * d;
        E *dye = static_cast<E *>(a->dye) + r * d;
        const float w = a->row_weight[r];
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          const float gc = f32(g[c]);
          put(dye[c], w * gc);
          dot += gc * f32(ye[c]);
        }
        a->drow_weight[r] = dot;
      }
    });
  });
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

moe_status shared_combine(void *st, const moe_shared_args *a) {
  return guarded(st, [&] {
    const int64_t d = a->d, T = a->T;
    with_dtype(a->dtype, [&](auto tag) {
      using E = decltype(tag);
#pragma omp parallel for schedule(static) if (worth_threads(T * d))
      for (int64_t t = 0; t < T; ++t) {
        const E *x = static_cast<const E *>(a->x) + t * d;
        float gv = 1.0f;
        if (a->gate_w) {
          float z = 0.0f;
          for (int64_t c = 0; c < d; ++c) z += f32(x[c]) * a->gate_w[c];
          gv = sigmoid(z);
          if (a->gate) a->gate[t] = gv;
        }
        float *y = a->y + t * d;
        for (int64_t s = 0; s < a->S; ++s) {
          const E *ys = static_cast<const E *>(a->ys) + (s * T + t) * d;
          for (int64_t c = 0; c < d; ++c) y[c] += gv * f32(ys[c]);
        }
      }
    });
  });
}

moe_status shared_combine_bwd(void *st, const moe_shared_args *a) {
  return guarded(st, [&] {
    if (a->prepare) return;  // nothing to make ready: the core passes the scratch
    const int64_t d = a->d, T = a->T;
    std::vector<float> own(a->gate_w && !a->scratch ? static_cast<size_t>(T) : 0);
    float *dpre = a->scratch ? a->scratch : own.data();
    with_dtype(a->dtype, [&](auto tag) {
      using E = decltype(tag);
      const E *xs = static_cast<const E *>(a->x);
#pragma omp parallel for schedule(static) if (worth_threads(T * d * a->S))
      for (int64_t t = 0; t < T; ++t) {
        const E *dy = static_cast<const E *>(a->dy) + t * d;
        const float gv = a->gate_w ? a->gate[t] : 1.0f;
        float dgate = 0.0f;
        for (int64_t s = 0; s < a->S; ++s) {
          const E *ys = static_cast<const E *>(a->ys) + (s * T + t) * d;
          E *dys = static_cast<E *>(a->dys) + (s * T + t) * d;
          for (int64_t c = 0; c < d; ++c) {
            const float g = f32(dy[c]);
            put(dys[c], gv * g);
            dgate += g * f32(ys[c]);
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
          for (int64_t t = 0; t < T; ++t) acc += dpre[t] * f32(xs[t * d + c]);
          a->dgate_w[c] += acc;
        }
      }
    });
  });
}

}  // namespace moe::cpu
