// Each token's weighted sum of its expert rows (a gather over the token's rows, no atomics), the
// shared experts' contribution, and their backward.
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 128;

// out[t] = sum over t's rows, in the order they are listed, of (weight[r] *) src[r].
template <bool kVec>
__global__ void sum_rows_kernel(const float *src, const float *weight, const int64_t *token_offsets,
                                const int32_t *token_rows, int64_t k, int64_t T, int64_t d, float *out) {
  using Io = RowIo<kVec>;
  const int64_t n = d / Io::kWidth;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t b = token_offsets ? token_offsets[t] : t * k;
    const int64_t e = token_offsets ? token_offsets[t + 1] : (t + 1) * k;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      typename Io::V acc = Io::zero();
      for (int64_t j = b; j < e; ++j) {
        const int32_t r = token_rows[j];
        if (r < 0) continue;
        const typename Io::V v = Io::load(src + int64_t{r} * d, i);
        acc = weight ? Io::fma(weight[r], v, acc) : Io::add(v, acc);
      }
      Io::store(out + t * d, i, acc);
    }
  }
}

// dye[r] = w_r dy[t];  drow_weight[r] = <dy[t], ye[r]>
template <bool kVec>
__global__ void combine_bwd_kernel(const float *dy, const float *ye, const int32_t *row_token, const float *row_weight,
                                   int64_t R, int64_t d, float *dye, float *drow_weight) {
  using Io = RowIo<kVec>;
  __shared__ float part[32];
  const int64_t n = d / Io::kWidth;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *g = dy + int64_t{row_token[r]} * d;
    const float w = row_weight[r];
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const typename Io::V gv = Io::load(g, i);
      Io::store(dye + r * d, i, Io::scale(w, gv));
      dot += Io::dot(gv, Io::load(ye + r * d, i));
    }
    dot = block_sum(dot, part);
    if (threadIdx.x == 0) drow_weight[r] = dot;
  }
}

__device__ inline float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

// y[t] += gate[t] * sum_s ys[s, t], gate[t] = sigmoid(x[t] . gate_w) (1 without a gate).
template <bool kVec>
__global__ void shared_combine_kernel(const float *x, const float *gate_w, const float *ys, int64_t S, int64_t T,
                                      int64_t d, float *gate, float *y) {
  using Io = RowIo<kVec>;
  __shared__ float part[32];
  const int64_t n = d / Io::kWidth;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float gv = 1.0f;
    if (gate_w) {
      float z = 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) z += Io::dot(Io::load(x + t * d, i), Io::load(gate_w, i));
      gv = sigmoidf(block_sum(z, part));
      if (threadIdx.x == 0 && gate) gate[t] = gv;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      typename Io::V acc = Io::load(y + t * d, i);
      for (int64_t s = 0; s < S; ++s) acc = Io::fma(gv, Io::load(ys + (s * T + t) * d, i), acc);
      Io::store(y + t * d, i, acc);
    }
  }
}

// dys[s, t] = gate[t] dy[t]; with a gate: dpre[t] = <dy[t], sum_s ys[s, t]> gate (1 - gate) and
// dx[t] += dpre[t] gate_w.
template <bool kVec>
__global__ void shared_combine_bwd_kernel(const float *dy, const float *ys, const float *gate_w, const float *gate,
                                          int64_t S, int64_t T, int64_t d, float *dys, float *dpre, float *dx) {
  using Io = RowIo<kVec>;
  __shared__ float part[32];
  const int64_t n = d / Io::kWidth;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float gv = gate_w ? gate[t] : 1.0f;
    float dg = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const typename Io::V g = Io::load(dy + t * d, i);
      for (int64_t s = 0; s < S; ++s) {
        Io::store(dys + (s * T + t) * d, i, Io::scale(gv, g));
        dg += Io::dot(g, Io::load(ys + (s * T + t) * d, i));
      }
    }
    if (!gate_w) continue;
    const float dp = block_sum(dg, part) * gv * (1.0f - gv);
    if (threadIdx.x == 0) dpre[t] = dp;
    if (dx)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        Io::store(dx + t * d, i, Io::fma(dp, Io::load(gate_w, i), Io::load(dx + t * d, i)));
  }
}

}  // namespace

void sum_token_rows(State &st, const moe_rows_args *a, const float *src, const float *weight, float *out) {
  if (a->T == 0) return;
  if (a->d == 0) return;
  if (vec4_ok(a->d, {src, out}))
    sum_rows_kernel<true><<<grid_rows(a->T), kThreads, 0, st.stream>>>(src, weight, a->token_offsets, a->token_rows,
                                                                       a->k, a->T, a->d, out);
  else
    sum_rows_kernel<false><<<grid_rows(a->T), kThreads, 0, st.stream>>>(src, weight, a->token_offsets, a->token_rows,
                                                                        a->k, a->T, a->d, out);
  check_launch("sum of token rows");
}

moe_status combine(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) { sum_token_rows(st, a, a->ye, a->row_weight, a->y); });
}

moe_status combine_bwd(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) {
    if (a->R == 0) return;
    if (vec4_ok(a->d, {a->dy, a->ye, a->dye}))
      combine_bwd_kernel<true><<<grid_rows(a->R), kThreads, 0, st.stream>>>(a->dy, a->ye, a->row_token,
                                                                            a->row_weight, a->R, a->d, a->dye,
                                                                            a->drow_weight);
    else
      combine_bwd_kernel<false><<<grid_rows(a->R), kThreads, 0, st.stream>>>(a->dy, a->ye, a->row_token,
                                                                             a->row_weight, a->R, a->d, a->dye,
                                                                             a->drow_weight);
    check_launch("combine backward");
  });
}

moe_status shared_combine(void *state, const moe_shared_args *a) {
  return guarded(state, [&](State &st) {
    if (a->T == 0) return;
    if (vec4_ok(a->d, {a->x, a->gate_w, a->ys, a->y}))
      shared_combine_kernel<true><<<grid_rows(a->T), kThreads, 0, st.stream>>>(a->x, a->gate_w, a->ys, a->S, a->T,
                                                                               a->d, a->gate, a->y);
    else
      shared_combine_kernel<false><<<grid_rows(a->T), kThreads, 0, st.stream>>>(a->x, a->gate_w, a->ys, a->S, a->T,
                                                                                a->d, a->gate, a->y);
    check_launch("shared combine");
  });
}

moe_status shared_combine_bwd(void *state, const moe_shared_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t T = a->T, d = a->d;
    if (T == 0) return;
    float *dpre = a->scratch;
    if (a->gate_w && !dpre) {
      st.scratch[0].ensure(checked_bytes(T, sizeof(float), "shared_combine_bwd scratch"), st);
      dpre = st.scratch[0].as<float>();
    }
    if (vec4_ok(d, {a->dy, a->ys, a->gate_w, a->dys, a->dx}))
      shared_combine_bwd_kernel<true><<<grid_rows(T), kThreads, 0, st.stream>>>(a->dy, a->ys, a->gate_w, a->gate,
                                                                                 a->S, T, d, a->dys, dpre, a->dx);
    else
      shared_combine_bwd_kernel<false><<<grid_rows(T), kThreads, 0, st.stream>>>(a->dy, a->ys, a->gate_w, a->gate,
                                                                                  a->S, T, d, a->dys, dpre, a->dx);
    check_launch("shared combine backward");
    // dgate_w += dpre^T X: a GEMV through cuBLAS, deterministic.
    if (a->gate_w) sgemm(st, false, false, 1, d, T, 1.0f, dpre, T, a->x, d, 1.0f, a->dgate_w, d);
  });
}

}  // namespace moe::cuda
