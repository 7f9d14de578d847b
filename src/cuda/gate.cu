// Router logits L = X Wr^T, with the training noise of shared/DESIGN.md section 4, and their
// backward. The noise comes from the same counter-based generator as the CPU backend
// (src/core/rng.h), keyed by the element index, so both backends draw the same numbers.
#include "core/rng.h"
#include "cuda/cuda.h"
#include "cuda/gemm.h"

namespace moe::cuda {
namespace {

__device__ inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

__device__ inline float jitter(float eps, uint64_t seed, uint64_t step, int64_t i) {
  return 1.0f - eps + 2.0f * eps * rng_uniform(seed, kStreamJitter + step, static_cast<uint64_t>(i));
}

__global__ void jitter_kernel(const float *x, float *xr, int64_t n, float eps, uint64_t seed, uint64_t step) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    xr[i] = x[i] * jitter(eps, seed, step, i);
}

// dx += dxr * jitter
__global__ void jitter_bwd_kernel(const float *dxr, float *dx, int64_t n, float eps, uint64_t seed, uint64_t step) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dx[i] += dxr[i] * jitter(eps, seed, step, i);
}

// noise_std holds x Wn^T on entry and softplus of it on exit.
__global__ void gaussian_kernel(const float *clean, float *noise_std, float *draws, float *logits, int64_t n,
                                uint64_t seed, uint64_t step) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float z = rng_normal(seed, kStreamNoise + step, static_cast<uint64_t>(i));
    const float sd = softplus(noise_std[i]);
    draws[i] = z;
    noise_std[i] = sd;
    logits[i] = clean[i] + z * sd;
  }
}

__global__ void gaussian_bwd_kernel(const float *dlogits, const float *draws, const float *noise_std,
                                    const float *dclean_extra, const float *dstd_extra, float *dclean, float *dpre,
                                    int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float dl = dlogits[i];
    float dsd = dl * draws[i], dc = dl;
    if (dclean_extra) dc += dclean_extra[i];
    if (dstd_extra) dsd += dstd_extra[i];
    dclean[i] = dc;
    // d softplus(p)/dp = sigmoid(p) = 1 - exp(-softplus(p))
    dpre[i] = dsd * -expm1f(-noise_std[i]);
  }
}

constexpr int kThreads = 256;

// m [T,E] rows += b [E] (router_logit_bias).
__global__ void add_bias_kernel(float *m, const float *b, int64_t n, int64_t E) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    m[i] += b[i % E];
}

// db [E] += column sums of g [T,E], each in token order (deterministic).
__global__ void column_sums_kernel(float *db, const float *g, int64_t T, int64_t E) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < E; e += int64_t{gridDim.x} * blockDim.x) {
    float s = 0.0f;
    for (int64_t t = 0; t < T; ++t) s += g[t * E + e];
    db[e] += s;
  }
}

void add_bias(State &st, float *m, const float *b, int64_t T, int64_t E) {
  if (!b) return;
  const int64_t n = T * E;
  add_bias_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(m, b, n, E);
  check_launch("router logit bias");
}

void add_column_sums(State &st, float *db, const float *g, int64_t T, int64_t E) {
  if (!db) return;
  column_sums_kernel<<<stride_blocks(st, E, kThreads), kThreads, 0, st.stream>>>(db, g, T, E);
  check_launch("router logit bias backward");
}

}  // namespace

moe_status gate(void *state, const moe_gate_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t T = a->T, d = a->d, E = a->E;
    if (T == 0) return;
    if (a->noise == MOE_NOISE_JITTER) {
      const int64_t n = T * d;
      jitter_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(a->x, a->xr, n, a->noise_eps, a->seed,
                                                                                a->step);
      check_launch("jitter");
      sgemm(st, false, true, T, E, d, 1.0f, a->xr, d, a->w, d, 0.0f, a->logits, E);
      add_bias(st, a->logits, a->logit_bias, T, E);
    } else if (a->noise == MOE_NOISE_GAUSSIAN) {
      sgemm(st, false, true, T, E, d, 1.0f, a->x, d, a->w, d, 0.0f, a->clean_logits, E);
      sgemm(st, false, true, T, E, d, 1.0f, a->x, d, a->wn, d, 0.0f, a->noise_std, E);
      add_bias(st, a->clean_logits, a->logit_bias, T, E);
      const int64_t n = T * E;
      gaussian_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(
          a->clean_logits, a->noise_std, a->noise_draws, a->logits, n, a->seed, a->step);
      check_launch("gaussian noise");
    } else {
      sgemm(st, false, true, T, E, d, 1.0f, a->x, d, a->w, d, 0.0f, a->logits, E);
      add_bias(st, a->logits, a->logit_bias, T, E);
    }
  });
}

moe_status gate_bwd(void *state, const moe_gate_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t T = a->T, d = a->d, E = a->E;
    if (T == 0 || (a->prepare && a->noise != MOE_NOISE_JITTER)) return;  // only jitter needs scratch
    if (a->noise == MOE_NOISE_JITTER) {
      // Scratch first: nothing may fail for lack of memory once dw has been added to.
      float *dxr = a->scratch;
      if (a->dx && !dxr) {
        st.scratch[0].ensure(checked_bytes(checked_mul(T, d, "num_tokens * d_model"), sizeof(float), "gate_bwd"), st);
        dxr = st.scratch[0].as<float>();
      }
      if (a->prepare) return;
      sgemm(st, true, false, E, d, T, 1.0f, a->dlogits, E, a->xr, d, 1.0f, a->dw, d);
      add_column_sums(st, a->dlogit_bias, a->dlogits, T, E);
      if (a->dx) {
        sgemm(st, false, false, T, d, E, 1.0f, a->dlogits, E, a->w, d, 0.0f, dxr, d);
        const int64_t n = T * d;
        jitter_bwd_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(dxr, a->dx, n, a->noise_eps,
                                                                                      a->seed, a->step);
        check_launch("jitter backward");
      }
    } else if (a->noise == MOE_NOISE_GAUSSIAN) {
      float *dclean = a->scratch, *dpre = a->scratch + T * E;
      const int64_t n = T * E;
      gaussian_bwd_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(
          a->dlogits, a->noise_draws, a->noise_std, a->dclean_extra, a->dstd_extra, dclean, dpre, n);
      check_launch("gaussian noise backward");
      sgemm(st, true, false, E, d, T, 1.0f, dclean, E, a->x, d, 1.0f, a->dw, d);
      add_column_sums(st, a->dlogit_bias, dclean, T, E);
      sgemm(st, true, false, E, d, T, 1.0f, dpre, E, a->x, d, 1.0f, a->dwn, d);
      if (a->dx) {
        sgemm(st, false, false, T, d, E, 1.0f, dclean, E, a->w, d, 1.0f, a->dx, d);
        sgemm(st, false, false, T, d, E, 1.0f, dpre, E, a->wn, d, 1.0f, a->dx, d);
      }
    } else {
      if (a->dx) sgemm(st, false, false, T, d, E, 1.0f, a->dlogits, E, a->w, d, 1.0f, a->dx, d);
      sgemm(st, true, false, E, d, T, 1.0f, a->dlogits, E, a->x, d, 1.0f, a->dw, d);
      add_column_sums(st, a->dlogit_bias, a->dlogits, T, E);
    }
  });
}

}  // namespace moe::cuda
