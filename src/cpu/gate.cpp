// Router logits L = X Wr^T, with the training noise of shared/DESIGN.md section 4 (Gaussian noise
// scaled by softplus(X Wn^T), or multiplicative jitter of the router input), and their backward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "cpu/cpu.h"

namespace moe::cpu {

namespace {

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

inline float jitter(const moe_gate_args *a, int64_t i) {
  return 1.0f - a->noise_eps + 2.0f * a->noise_eps * rng_uniform(a->seed, kStreamJitter + a->step, static_cast<uint64_t>(i));
}

// m[T,E] rows += b[E].
void add_bias(float *m, const float *b, int64_t T, int64_t E) {
#pragma omp parallel for schedule(static) if (worth_threads(T * E))
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) m[t * E + e] += b[e];
}

// db[E] += column sums of g[T,E], each summed in token order (the same bits for any thread count).
void add_column_sums(float *db, const float *g, int64_t T, int64_t E) {
#pragma omp parallel for schedule(static) if (worth_threads(T * E))
  for (int64_t e = 0; e < E; ++e) {
    double s = 0.0;
    for (int64_t t = 0; t < T; ++t) s += g[t * E + e];
    db[e] += static_cast<float>(s);
  }
}

// out[T, E] = X Wr^T (the logits, or the noise scale's X Wn^T). Where small_rows().router says
// so, on the few-rows kernel: the tokens in slices of about kSliceRows, each slice a product of
// one batch whose chunks (slice by router rows) the threads share, each logit the kernel's sum
// whatever the slicing or the thread count. (oneDNN's matmul, with as many columns as experts,
// took up to 3 times as long, and about as long at the largest shapes; see gemm.cpp.)
void logits(State &st, int64_t T, int64_t E, int64_t d, const float *x, const float *w, float *out) {
  if (!small_rows().router) return router_gemm(st, false, true, T, E, d, x, d, w, d, 0.0f, out, E);
  constexpr int64_t kSliceRows = 12, kMaxSlices = 64;
  const int64_t slices = std::clamp<int64_t>((T + kSliceRows - 1) / kSliceRows, 1, kMaxSlices);
  XwtProduct p[kMaxSlices];
  for (int64_t i = 0; i < slices; ++i) {
    const int64_t t0 = T * i / slices, t1 = T * (i + 1) / slices;
    p[i] = {x + t0 * d, d, w, d, t1 - t0, E, d, out + t0 * E, E};
  }
  XwtBatch batch(p, slices, MOE_DTYPE_F32);
#pragma omp parallel if (batch.chunks() > 1 && T * E * d >= (int64_t{1} << 16))
  batch.drain();
}

// out[T, d] (+)= G W, G [T, E] the logits' gradient, W [E, d] (dX of the logits X W^T). Where
// small_rows().router says so, on few_rows_xw (k over the E experts in order, the same bits for
// any thread count); elsewhere on oneDNN, prepared in the dry run.
void input_grad(State &st, int64_t T, int64_t E, int64_t d, const float *g, const float *w, float *out, bool accumulate,
                bool dry) {
  if (!small_rows().router)
    return router_gemm(st, false, false, T, d, E, g, E, w, d, accumulate ? 1.0f : 0.0f, out, d, dry);
  if (!dry) few_rows_xw(g, E, w, d, MOE_DTYPE_F32, T, d, E, out, d, accumulate);
}

}  // namespace

moe_status gate(void *state, const moe_gate_args *a) {
  return guarded(state, [&] {
    State &st = *static_cast<State *>(state);
    const int64_t T = a->T, d = a->d, E = a->E;
    st.gemms.trim(512);  // a forward begins: the cache may be emptied here
    if (T == 0) return;
    if (a->noise == MOE_NOISE_JITTER) {
#pragma omp parallel for schedule(static) if (worth_threads(T * d))
      for (int64_t i = 0; i < T * d; ++i) a->xr[i] = a->x[i] * jitter(a, i);
      logits(st, T, E, d, a->xr, a->w, a->logits);
      if (a->logit_bias) add_bias(a->logits, a->logit_bias, T, E);
    } else if (a->noise == MOE_NOISE_GAUSSIAN) {
      logits(st, T, E, d, a->x, a->w, a->clean_logits);
      logits(st, T, E, d, a->x, a->wn, a->noise_std);
      if (a->logit_bias) add_bias(a->clean_logits, a->logit_bias, T, E);
#pragma omp parallel for schedule(static) if (worth_threads(T * E))
      for (int64_t i = 0; i < T * E; ++i) {
        const float n = rng_normal(a->seed, kStreamNoise + a->step, static_cast<uint64_t>(i));
        const float sd = softplus(a->noise_std[i]);
        a->noise_draws[i] = n;
        a->noise_std[i] = sd;
        a->logits[i] = a->clean_logits[i] + n * sd;
      }
    } else {
      logits(st, T, E, d, a->x, a->w, a->logits);
      if (a->logit_bias) add_bias(a->logits, a->logit_bias, T, E);
    }
  });
}

moe_status gate_bwd(void *state, const moe_gate_args *a) {
  return guarded(state, [&] {
    State &st = *static_cast<State *>(state);
    const int64_t T = a->T, d = a->d, E = a->E;
    if (T == 0) return;
    // Scratch first: nothing may fail for lack of memory once dw has been added to.
    std::vector<float> own(a->noise == MOE_NOISE_JITTER && a->dx && !a->scratch ? checked_count(T, d, "gate_bwd scratch")
                                                                                 : 0);
    // Twice: dry, preparing every GEMM, then for real (prepare: the dry run only).
    for (const bool dry : {true, false}) {
      if (!dry && a->prepare) break;
      if (a->noise == MOE_NOISE_JITTER) {
        float *dxr = a->scratch ? a->scratch : own.data();
        router_gemm(st, true, false, E, d, T, a->dlogits, E, a->xr, d, 1.0f, a->dw, d, dry);
        if (!dry && a->dlogit_bias) add_column_sums(a->dlogit_bias, a->dlogits, T, E);
        if (a->dx) {
          input_grad(st, T, E, d, a->dlogits, a->w, dxr, false, dry);
          if (!dry) {
#pragma omp parallel for schedule(static) if (worth_threads(T * d))
            for (int64_t i = 0; i < T * d; ++i) a->dx[i] += dxr[i] * jitter(a, i);
          }
        }
      } else if (a->noise == MOE_NOISE_GAUSSIAN) {
        float *dclean = a->scratch, *dpre = a->scratch + T * E;
        if (!dry) {
#pragma omp parallel for schedule(static) if (worth_threads(T * E))
          for (int64_t i = 0; i < T * E; ++i) {
            const float dl = a->dlogits[i];
            float dsd = dl * a->noise_draws[i];
            float dc = dl;
            if (a->dclean_extra) dc += a->dclean_extra[i];
            if (a->dstd_extra) dsd += a->dstd_extra[i];
            dclean[i] = dc;
            // d softplus(p)/dp = sigmoid(p) = 1 - exp(-softplus(p))
            dpre[i] = dsd * -std::expm1(-a->noise_std[i]);
          }
        }
        router_gemm(st, true, false, E, d, T, dclean, E, a->x, d, 1.0f, a->dw, d, dry);
        if (!dry && a->dlogit_bias) add_column_sums(a->dlogit_bias, dclean, T, E);
        router_gemm(st, true, false, E, d, T, dpre, E, a->x, d, 1.0f, a->dwn, d, dry);
        if (a->dx) {
          input_grad(st, T, E, d, dclean, a->w, a->dx, true, dry);
          input_grad(st, T, E, d, dpre, a->wn, a->dx, true, dry);
        }
      } else {
        if (a->dx) input_grad(st, T, E, d, a->dlogits, a->w, a->dx, true, dry);
        router_gemm(st, true, false, E, d, T, a->dlogits, E, a->x, d, 1.0f, a->dw, d, dry);
        if (!dry && a->dlogit_bias) add_column_sums(a->dlogit_bias, a->dlogits, T, E);
      }
    }
  });
}

}  // namespace moe::cpu
