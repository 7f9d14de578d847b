// The fused router: scores, lse, selection bias, group limiting, top-k, normalisation and scale,
// and the per-token terms of the aux losses, in one pass over each logits row (one warp per
// token); then the aux-loss sums, reduced in a fixed order so they are the same on every run.
// Also the backward from routing weights and aux-loss terms to the logits.
#include <algorithm>
#include <climits>
#include <vector>

#include "cuda/cuda.h"
#include "cuda/route.cuh"
#include "cuda/scratch.h"

namespace moe::cuda {
namespace {

constexpr int kMaxWarps = 8;
constexpr int kSmemBudget = 40 * 1024;  // below the 48 KiB a kernel gets without opting in

__device__ inline float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }
__device__ inline float normal_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }
__device__ inline float normal_pdf(float z) { return 0.39894228040143268f * expf(-0.5f * z * z); }

struct RouterParams {
  int T, E, k, G, topk_groups;
  int score, normalize, expert_choice;
  float routed_scale;
  const float *logits, *bias, *clean, *noise_std;
  float *scores, *lse, *topk_w, *norm, *loadp;
  int32_t *topk_ids;
  unsigned long long *counts;
};

__global__ void router_kernel(RouterParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, E = p.E;
  float *S = smem + warp * (2 * E + p.G);
  float *sel = S + E;
  float *gsc = sel + E;
  for (int64_t t = int64_t{blockIdx.x} * (blockDim.x >> 5) + warp; t < p.T; t += int64_t{gridDim.x} * (blockDim.x >> 5)) {
    const float *L = p.logits + t * E;
    float m = -INFINITY;
    bool nan = false;
    for (int e = lane; e < E; e += 32) {
      const float v = L[e];
      if (isnan(v)) nan = true;
      else m = fmaxf(m, v);
    }
    m = warp_max(m);
    nan = warp_any(nan);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf(L[e] - m);
    sum = warp_sum(sum);
    if (lane == 0) p.lse[t] = nan ? NAN : m + logf(sum);

    float ssum = 0.0f;
    for (int e = lane; e < E; e += 32) {
      const float s = p.score == MOE_SCORE_SOFTMAX ? expf(L[e] - m) / sum : sigmoidf(L[e]);
      S[e] = s;
      p.scores[t * E + e] = s;
      ssum += s;
    }
    // P for the load-balance loss: S itself, or S normalised per token for sigmoid scores.
    if (p.score == MOE_SCORE_SIGMOID) ssum = warp_sum(ssum);
    if (lane == 0) p.norm[t] = p.score == MOE_SCORE_SIGMOID ? 1.0f / ssum : 1.0f;

    if (p.loadp) {
      for (int e = lane; e < E; e += 32) sel[e] = nan_to_neginf(L[e]);
      __syncwarp();
      const Thresholds th = warp_thresholds(sel, E, p.k);
      for (int e = lane; e < E; e += 32) {
        const int ti = in_top(th, sel, e) ? th.k1th : th.kth;
        float prob = 1.0f;
        if (ti >= 0) prob = normal_cdf((p.clean[t * E + e] - L[ti]) / p.noise_std[t * E + e]);
        p.loadp[t * E + e] = prob;
      }
      __syncwarp();
    }
    if (p.expert_choice) continue;

    __syncwarp();
    for (int e = lane; e < E; e += 32) sel[e] = nan_to_neginf(S[e] + p.bias[e]);
    __syncwarp();
    if (p.G > 1) {
      const int gsize = E / p.G;
      for (int g = lane; g < p.G; g += 32) {
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int e = g * gsize; e < (g + 1) * gsize; ++e) {
          const float v = sel[e];
          if (v > b1) {
            b2 = b1;
            b1 = v;
          } else if (v > b2) {
            b2 = v;
          }
        }
        gsc[g] = nan_to_neginf(gsize == 1 ? b1 : b1 + b2);
      }
      __syncwarp();
      // Groups kept: the topk_groups best; the experts of the others are masked.
      const Thresholds th = warp_thresholds(gsc, p.G, p.topk_groups);
      __syncwarp();
      for (int e = lane; e < E; e += 32)
        if (!in_top(th, gsc, e / gsize)) sel[e] = -INFINITY;
      __syncwarp();
    }
    int32_t *ids = p.topk_ids + t * p.k;
    float *w = p.topk_w + t * p.k;
    float wsum = 0.0f, pv = 0.0f;
    int pi = -1;
    for (int j = 0; j < p.k; ++j) {
      const int e = warp_next_best(sel, E, pv, pi);
      pv = sel[e];
      pi = e;
      wsum += S[e];
      if (lane == 0) {
        ids[j] = e;
        w[j] = S[e];
        atomicAdd(p.counts + e, 1ull);  // integer: the count does not depend on the order
      }
    }
    __syncwarp();
    const float scale = p.normalize ? p.routed_scale / (wsum + 1e-20f) : p.routed_scale;
    for (int j = lane; j < p.k; j += 32) w[j] *= scale;
    __syncwarp();
  }
}

// Column sums of a [T, E] matrix (times a per-row scale) in double: partial sums over fixed
// chunks of rows, each in a fixed order, so the total does not depend on scheduling.
constexpr int kChunk = 1024;

template <bool kSquare>
__global__ void colsum_kernel(const float *m, const float *row_scale, int64_t T, int E, int64_t chunks,
                              double *partial) {
  __shared__ double part[8][33];
  const int e = blockIdx.x * 32 + threadIdx.x;
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t t0 = c * kChunk, t1 = min(T, t0 + kChunk);
    double acc = 0.0;
    if (e < E)
      for (int64_t t = t0 + threadIdx.y; t < t1; t += 8) {
        const float v = m[t * E + e];
        if (kSquare) acc += static_cast<double>(v) * v;
        else acc += static_cast<double>(row_scale ? v * row_scale[t] : v);
      }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && e < E) {
      double s = 0.0;
      for (int i = 0; i < 8; ++i) s += part[i][threadIdx.x];
      partial[c * E + e] = s;
    }
    __syncthreads();
  }
}

__global__ void finish_sums_kernel(const double *partial, int64_t chunks, int E, double *out) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * E + e];
  out[e] = s;
}

void column_sums(State &st, const float *m, const float *scale, bool square, int64_t T, int E, double *partial,
                 double *out) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  if (chunks == 0) {
    check(cudaMemsetAsync(out, 0, sizeof(double) * E, st.stream), "cudaMemsetAsync");
    return;
  }
  const dim3 grid((E + 31) / 32, static_cast<unsigned>(chunks < 65535 ? chunks : 65535)), block(32, 8);
  if (square) colsum_kernel<true><<<grid, block, 0, st.stream>>>(m, scale, T, E, chunks, partial);
  else colsum_kernel<false><<<grid, block, 0, st.stream>>>(m, scale, T, E, chunks, partial);
  check_launch("column sums");
  finish_sums_kernel<<<blocks_for(E, 128), 128, 0, st.stream>>>(partial, chunks, E, out);
  check_launch("finish sums");
}

int warps_for(int64_t per_warp_floats) {
  const int64_t w = kSmemBudget / (per_warp_floats * static_cast<int64_t>(sizeof(float)));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, w)));
}

int router_grid(const State &st, int64_t T, int warps) {
  const int64_t want = (T + warps - 1) / warps, cap = std::max(1, st.sm_count) * int64_t{16};
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

}  // namespace

moe_status select(void *state, const moe_select_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t T = a->T, E = a->E, k = a->k;
    if (checked_mul(T, std::max(E, k), "num_tokens * num_experts") > INT32_MAX)
      fail(MOE_ERR_INVALID_ARGUMENT, "select: num_tokens %lld is too large for int32 routing indices", (long long)T);
    const bool load = a->clean_logits != nullptr;
    const int64_t chunks = (T + kChunk - 1) / kChunk;
    ScratchPlan plan;
    const size_t h_norm = plan.add<float>(T, "select scratch");
    const size_t h_loadp = plan.add<float>(load ? checked_mul(T, E, "select scratch") : 0, "select scratch");
    const size_t h_partial = plan.add<double>(checked_mul(std::max<int64_t>(chunks, 1), E, "select sums"), "select sums");
    // Results that travel to the host together: prob_sum[E], load_sum[E], lse_sq[1], counts[E].
    const int64_t nres = 3 * E + 1;
    const size_t h_res = plan.add<double>(nres, "select sums");
    plan.commit(st.scratch[1], st);
    double *res = plan.get<double>(h_res);
    double *partial = plan.get<double>(h_partial);
    auto *counts = reinterpret_cast<unsigned long long *>(res + 2 * E + 1);
    check(cudaMemsetAsync(res, 0, sizeof(double) * nres, st.stream), "cudaMemsetAsync");

    if (T > 0) {
      RouterParams p{};
      p.T = static_cast<int>(T);
      p.E = static_cast<int>(E);
      p.k = static_cast<int>(k);
      p.G = static_cast<int>(a->num_groups > 1 ? a->num_groups : 1);
      p.topk_groups = static_cast<int>(a->topk_groups);
      p.score = a->score;
      p.normalize = a->normalize;
      p.expert_choice = a->expert_choice;
      p.routed_scale = a->routed_scale;
      p.logits = a->logits;
      p.bias = a->bias;
      p.clean = a->clean_logits;
      p.noise_std = a->noise_std;
      p.scores = a->scores;
      p.lse = a->lse;
      p.topk_w = a->topk_w;
      p.topk_ids = a->topk_ids;
      p.norm = plan.get<float>(h_norm);
      p.loadp = load ? plan.get<float>(h_loadp) : nullptr;
      p.counts = counts;
      const int64_t per_warp = 2 * E + p.G;
      const int warps = warps_for(per_warp);
      const size_t smem = sizeof(float) * per_warp * warps;
      router_kernel<<<router_grid(st, T, warps), 32 * warps, smem, st.stream>>>(p);
      check_launch("router");
      column_sums(st, a->scores, p.norm, false, T, p.E, partial, res);
      if (load) column_sums(st, p.loadp, nullptr, false, T, p.E, partial, res + E);
      column_sums(st, a->lse, nullptr, true, T, 1, partial, res + 2 * E);
    }
    st.host.ensure(sizeof(double) * nres);
    double *h = st.host.as<double>();
    check(cudaMemcpyAsync(h, res, sizeof(double) * nres, cudaMemcpyDeviceToHost, st.stream), "cudaMemcpyAsync");
    // The one host sync of routing: the aux losses and the exchange need the counts on the host.
    check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize (select)");
    const auto *hc = reinterpret_cast<const unsigned long long *>(h + 2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      a->prob_sum[e] = h[e];
      if (load) a->load_sum[e] = h[E + e];
      a->counts[e] = a->expert_choice ? 0 : static_cast<int64_t>(hc[e]);
    }
    *a->lse_sq_sum = h[2 * E];
  });
}

namespace {

struct SelectBwdParams {
  int T, E, k, score, normalize, expert_choice;
  float routed_scale, zscale;
  const float *logits, *scores, *lse, *drow_weight;
  const int32_t *topk_ids, *row_of_slot, *token_rows, *row_slot;
  const int64_t *token_offsets;
  const float *lb_coef, *gate_coef, *load_coef;  // device copies of the host coefficients
  const float *clean, *noise_std;
  float *dlogits, *dclean_extra, *dstd_extra;
};

__global__ void select_bwd_kernel(SelectBwdParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, E = p.E;
  float *dS = smem + warp * 2 * E;
  float *ord = dS + E;
  for (int64_t t = int64_t{blockIdx.x} * (blockDim.x >> 5) + warp; t < p.T; t += int64_t{gridDim.x} * (blockDim.x >> 5)) {
    const float *S = p.scores + t * E;
    const float *L = p.logits + t * E;
    for (int e = lane; e < E; e += 32) dS[e] = 0.0f;
    __syncwarp();
    if (p.expert_choice) {
      for (int64_t i = p.token_offsets[t] + lane; i < p.token_offsets[t + 1]; i += 32) {
        const int32_t r = p.token_rows[i];
        const int e = p.row_slot[r] % E;
        dS[e] = p.drow_weight[r] + (p.gate_coef ? p.gate_coef[e] : 0.0f);
      }
    } else if (lane == 0) {
      // k is small: one lane, in the CPU backend's order.
      const int32_t *ids = p.topk_ids + t * p.k;
      float usum = 0.0f, dot = 0.0f;
      for (int j = 0; j < p.k; ++j) {
        const int32_t r = p.row_of_slot[t * p.k + j];
        float dw = 0.0f;
        if (r >= 0) {
          dw = p.drow_weight[r];
          if (p.gate_coef) dw += p.gate_coef[ids[j]];
        }
        usum += S[ids[j]];
        dot += dw * S[ids[j]];
        dS[ids[j]] = dw;
      }
      if (p.normalize) {
        const float s = usum + 1e-20f;
        for (int j = 0; j < p.k; ++j) dS[ids[j]] = p.routed_scale * (dS[ids[j]] / s - dot / (s * s));
      } else {
        for (int j = 0; j < p.k; ++j) dS[ids[j]] *= p.routed_scale;
      }
    }
    __syncwarp();
    // dS becomes dL in place: each lane owns its experts.
    if (p.score == MOE_SCORE_SOFTMAX) {
      float sd = 0.0f;
      for (int e = lane; e < E; e += 32) {
        dS[e] += p.lb_coef[e];
        sd += dS[e] * S[e];
      }
      sd = warp_sum(sd);
      for (int e = lane; e < E; e += 32) dS[e] = S[e] * (dS[e] - sd);
    } else {
      float ssum = 0.0f, cp = 0.0f;
      for (int e = lane; e < E; e += 32) {
        ssum += S[e];
        cp += p.lb_coef[e] * S[e];
      }
      ssum = warp_sum(ssum);
      cp = warp_sum(cp) / ssum;
      for (int e = lane; e < E; e += 32) {
        const float d = dS[e] + (p.lb_coef[e] - cp) / ssum;
        dS[e] = d * S[e] * (1.0f - S[e]);
      }
    }
    if (p.zscale != 0.0f) {
      const float lse = p.lse[t];
      for (int e = lane; e < E; e += 32) dS[e] += p.zscale * lse * expf(L[e] - lse);
    }
    if (p.load_coef) {
      // P[t,e] = Phi((clean - thr) / sd): gradients to the clean logit, the noise scale, and
      // through the threshold to the noisy logit it was read from (summed per threshold, in a
      // fixed order, instead of scattered).
      for (int e = lane; e < E; e += 32) ord[e] = nan_to_neginf(L[e]);
      __syncwarp();
      const Thresholds th = warp_thresholds(ord, E, p.k);
      float to_kth = 0.0f, to_k1th = 0.0f;
      for (int e = lane; e < E; e += 32) {
        const int64_t i = t * E + e;
        const int ti = in_top(th, ord, e) ? th.k1th : th.kth;
        float dc = 0.0f, dsd = 0.0f;
        if (ti >= 0) {
          const float sd = p.noise_std[i];
          const float z = (p.clean[i] - L[ti]) / sd;
          const float gp = p.load_coef[e] * normal_pdf(z) / sd;
          dc = gp;
          dsd = -gp * z;
          if (ti == th.kth) to_kth += gp;
          else to_k1th += gp;
        }
        p.dclean_extra[i] = dc;
        p.dstd_extra[i] = dsd;
      }
      to_kth = warp_sum(to_kth);
      to_k1th = warp_sum(to_k1th);
      __syncwarp();
      if (lane == 0) {
        if (th.kth >= 0) dS[th.kth] -= to_kth;
        if (th.k1th >= 0) dS[th.k1th] -= to_k1th;
      }
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32) p.dlogits[t * E + e] = dS[e];
    __syncwarp();
  }
}

}  // namespace

moe_status select_bwd(void *state, const moe_select_bwd_args *a) {
  return guarded(state, [&](State &st) {
    const int64_t T = a->T, E = a->E;
    if (T == 0) return;
    ScratchPlan plan;
    const size_t h_coef = plan.add<float>(3 * E, "select_bwd coefficients");
    plan.commit(st.scratch[1], st);
    float *coef = plan.get<float>(h_coef);
    const size_t eb = sizeof(float) * static_cast<size_t>(E);
    // From pageable host memory: the call returns once the source has been staged.
    check(cudaMemcpyAsync(coef, a->lb_coef, eb, cudaMemcpyHostToDevice, st.stream), "cudaMemcpyAsync");
    if (a->gate_coef)
      check(cudaMemcpyAsync(coef + E, a->gate_coef, eb, cudaMemcpyHostToDevice, st.stream), "cudaMemcpyAsync");
    if (a->load_coef)
      check(cudaMemcpyAsync(coef + 2 * E, a->load_coef, eb, cudaMemcpyHostToDevice, st.stream), "cudaMemcpyAsync");
    SelectBwdParams p{};
    p.T = static_cast<int>(T);
    p.E = static_cast<int>(E);
    p.k = static_cast<int>(a->k);
    p.score = a->score;
    p.normalize = a->normalize;
    p.expert_choice = a->expert_choice;
    p.routed_scale = a->routed_scale;
    p.zscale = a->z_coef * 2.0f / static_cast<float>(T);
    p.logits = a->logits;
    p.scores = a->scores;
    p.lse = a->lse;
    p.drow_weight = a->drow_weight;
    p.topk_ids = a->topk_ids;
    p.row_of_slot = a->row_of_slot;
    p.token_rows = a->token_rows;
    p.row_slot = a->row_slot;
    p.token_offsets = a->token_offsets;
    p.lb_coef = coef;
    p.gate_coef = a->gate_coef ? coef + E : nullptr;
    p.load_coef = a->load_coef ? coef + 2 * E : nullptr;
    p.clean = a->clean_logits;
    p.noise_std = a->noise_std;
    p.dlogits = a->dlogits;
    p.dclean_extra = a->dclean_extra;
    p.dstd_extra = a->dstd_extra;
    const int warps = warps_for(2 * E);
    select_bwd_kernel<<<router_grid(st, T, warps), 32 * warps, sizeof(float) * 2 * E * warps, st.stream>>>(p);
    check_launch("select backward");
  });
}

}  // namespace moe::cuda
