// Each token's weighted sum of its expert rows (a gather over the token's rows, no atomics), the
// shared experts' contribution, and their backward. Rows are read in the activation dtype and
// summed in float32.
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 128;

// out[t] = sum over t's rows, in the order they are listed, of (weight[r] *) src[r].
template <class T, int W>
__global__ void sum_rows_kernel(const T *src, const float *weight, const int64_t *token_offsets,
                                const int32_t *token_rows, int64_t k, int64_t nt, int64_t d, float *out) {
  const int64_t n = d / W;
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    const int64_t b = token_offsets ? token_offsets[t] : t * k;
    const int64_t e = token_offsets ? token_offsets[t + 1] : (t + 1) * k;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      Frag<W> acc = zero<W>();
      for (int64_t j = b; j < e; ++j) {
        const int32_t r = token_rows[j];
        if (r < 0) continue;
        const Frag<W> v = load<W>(src + int64_t{r} * d, i);
        acc = weight ? axpy(weight[r], v, acc) : add(v, acc);
      }
      store<W>(out + t * d, i, acc);
    }
  }
}

// dye[r] = w_r dy[t];  drow_weight[r] = <dy[t], ye[r]>
template <class T, int W>
__global__ void combine_bwd_kernel(const T *dy, const T *ye, const int32_t *row_token, const float *row_weight,
                                   int64_t R, int64_t d, T *dye, float *drow_weight) {
  __shared__ float part[32];
  const int64_t n = d / W;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const T *g = dy + int64_t{row_token[r]} * d;
    const float w = row_weight[r];
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const Frag<W> gv = load<W>(g, i);
      store<W>(dye + r * d, i, scale(w, gv));
      acc += dot(gv, load<W>(ye + r * d, i));
    }
    acc = block_sum(acc, part);
    if (threadIdx.x == 0) drow_weight[r] = acc;
  }
}

__device__ inline float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

// y[t] += gate[t] * sum_s ys[s, t], gate[t] = sigmoid(x[t] . gate_w) (1 without a gate).
template <class T, int W>
__global__ void shared_combine_kernel(const T *x, const float *gate_w, const T *ys, int64_t S, int64_t nt, int64_t d,
                                      float *gate, float *y) {
  __shared__ float part[32];
  const int64_t n = d / W;
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    float gv = 1.0f;
    if (gate_w) {
      float z = 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) z += dot(load<W>(x + t * d, i), load<W>(gate_w, i));
      gv = sigmoidf(block_sum(z, part));
      if (threadIdx.x == 0 && gate) gate[t] = gv;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      Frag<W> acc = load<W>(y + t * d, i);
      for (int64_t s = 0; s < S; ++s) acc = axpy(gv, load<W>(ys + (s * nt + t) * d, i), acc);
      store<W>(y + t * d, i, acc);
    }
  }
}

// dys[s, t] = gate[t] dy[t]; with a gate: dpre[t] = <dy[t], sum_s ys[s, t]> gate (1 - gate) and
// dx[t] += dpre[t] gate_w.
template <class T, int W>
__global__ void shared_combine_bwd_kernel(const T *dy, const T *ys, const float *gate_w, const float *gate, int64_t S,
                                          int64_t nt, int64_t d, T *dys, float *dpre, float *dx) {
  __shared__ float part[32];
  const int64_t n = d / W;
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    const float gv = gate_w ? gate[t] : 1.0f;
    float dg = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const Frag<W> g = load<W>(dy + t * d, i);
      for (int64_t s = 0; s < S; ++s) {
        store<W>(dys + (s * nt + t) * d, i, scale(gv, g));
        dg += dot(g, load<W>(ys + (s * nt + t) * d, i));
      }
    }
    if (!gate_w) continue;
    const float dp = block_sum(dg, part) * gv * (1.0f - gv);
    if (threadIdx.x == 0) dpre[t] = dp;
    if (dx)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        store<W>(dx + t * d, i, axpy(dp, load<W>(gate_w, i), load<W>(dx + t * d, i)));
  }
}

// Column sums of diag(dpre) X for 16-bit X, which cuBLAS cannot pair with a float32 dpre: each
// column summed over fixed chunks of tokens in token order, then the chunks in order, so the
// result does not depend on the grid.
constexpr int64_t kChunk = 128;

template <class T>
__global__ void weighted_colsum_kernel(const T *x, const float *dpre, int64_t nt, int64_t d, int64_t chunks,
                                       float *partial) {
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t t0 = c * kChunk, t1 = t0 + kChunk < nt ? t0 + kChunk : nt;
    for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < d; j += int64_t{gridDim.x} * blockDim.x) {
      float acc = 0.0f;
      for (int64_t t = t0; t < t1; ++t) acc += dpre[t] * to_float(x[t * d + j]);
      partial[c * d + j] = acc;
    }
  }
}

__global__ void add_chunk_sums_kernel(const float *partial, int64_t chunks, int64_t d, float *out) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < d; j += int64_t{gridDim.x} * blockDim.x) {
    float s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * d + j];
    out[j] += s;
  }
}

}  // namespace

void sum_token_rows(State &st, const moe_rows_args *a, const void *src, const float *weight, float *out) {
  if (a->T == 0 || a->d == 0) return;
  with_dtype(a->dtype, "sum of token rows", [&](auto type) {
    using T = typename decltype(type)::type;
    with_width<T>(vec_ok(a->d, kVecWidth<T>, {src, out}), [&](auto width) {
      constexpr int W = decltype(width)::value;
      sum_rows_kernel<T, W><<<grid_rows(a->T), kThreads, 0, st.stream>>>(
          static_cast<const T *>(src), weight, a->token_offsets, a->token_rows, a->k, a->T, a->d, out);
    });
  });
  check_launch("sum of token rows");
}

moe_status combine(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) { sum_token_rows(st, a, a->ye, a->row_weight, a->y); });
}

moe_status combine_bwd(void *state, const moe_rows_args *a) {
  return guarded(state, [&](State &st) {
    if (a->R == 0) return;
    with_dtype(a->dtype, "combine_bwd", [&](auto type) {
      using T = typename decltype(type)::type;
      with_width<T>(vec_ok(a->d, kVecWidth<T>, {a->dy, a->ye, a->dye}), [&](auto width) {
        constexpr int W = decltype(width)::value;
        combine_bwd_kernel<T, W><<<grid_rows(a->R), kThreads, 0, st.stream>>>(
            static_cast<const T *>(a->dy), static_cast<const T *>(a->ye), a->row_token, a->row_weight, a->R, a->d,
            static_cast<T *>(a->dye), a->drow_weight);
      });
    });
    check_launch("combine backward");
  });
}

moe_status shared_combine(void *state, const moe_shared_args *a) {
  return guarded(state, [&](State &st) {
    if (a->T == 0) return;
    with_dtype(a->dtype, "shared_combine", [&](auto type) {
      using T = typename decltype(type)::type;
      with_width<T>(vec_ok(a->d, kVecWidth<T>, {a->x, a->gate_w, a->ys, a->y}), [&](auto width) {
        constexpr int W = decltype(width)::value;
        shared_combine_kernel<T, W><<<grid_rows(a->T), kThreads, 0, st.stream>>>(
            static_cast<const T *>(a->x), a->gate_w, static_cast<const T *>(a->ys), a->S, a->T, a->d, a->gate, a->y);
      });
    });
    check_launch("shared combine");
  });
}

moe_status shared_combine_bwd(void *state, const moe_shared_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t nt = a->T, d = a->d;
    if (nt == 0) return;
    with_dtype(a->dtype, "shared_combine_bwd", [&](auto type) {
      using T = typename decltype(type)::type;
      constexpr bool kNarrow = sizeof(T) < sizeof(float);
      // Scratch first: nothing may fail for lack of memory once dx has been added to.
      float *dpre = a->scratch, *partial = nullptr;
      const int64_t chunks = (nt + kChunk - 1) / kChunk;
      if (a->gate_w && !dpre) {
        st.scratch[0].ensure(checked_bytes(nt, sizeof(float), "shared_combine_bwd scratch"), st);
        dpre = st.scratch[0].as<float>();
      }
      if (a->gate_w && kNarrow) {
        st.scratch[1].ensure(
            checked_bytes(checked_mul(chunks, d, "chunks * d_model"), sizeof(float), "shared_combine_bwd scratch"), st);
        partial = st.scratch[1].as<float>();
      }
      // Sized before the core's first gradient update (the prepare call), not after it.
      if (a->prepare) return;
      with_width<T>(vec_ok(d, kVecWidth<T>, {a->dy, a->ys, a->gate_w, a->dys, a->dx}), [&](auto width) {
        constexpr int W = decltype(width)::value;
        shared_combine_bwd_kernel<T, W><<<grid_rows(nt), kThreads, 0, st.stream>>>(
            static_cast<const T *>(a->dy), static_cast<const T *>(a->ys), a->gate_w, a->gate, a->S, nt, d,
            static_cast<T *>(a->dys), dpre, a->dx);
      });
      check_launch("shared combine backward");
      if (!a->gate_w || d == 0) return;
      // dgate_w += dpre^T X, deterministic either way.
      if constexpr (!kNarrow) {
        sgemm(st, false, false, 1, d, nt, 1.0f, dpre, nt, static_cast<const float *>(a->x), d, 1.0f, a->dgate_w, d);
      } else {
        constexpr int kColThreads = 128;
        const dim3 grid(blocks_for(d, kColThreads), static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
        weighted_colsum_kernel<T>
            <<<grid, kColThreads, 0, st.stream>>>(static_cast<const T *>(a->x), dpre, nt, d, chunks, partial);
        check_launch("shared gate column sums");
        add_chunk_sums_kernel<<<blocks_for(d, kColThreads), kColThreads, 0, st.stream>>>(partial, chunks, d,
                                                                                         a->dgate_w);
        check_launch("shared gate column sums");
      }
    });
  });
}

}  // namespace moe::cuda
