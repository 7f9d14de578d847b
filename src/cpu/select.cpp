// Scores, selection bias, group limiting, top-k and weights; and the backward from routing
// weights and auxiliary-loss terms to router logits. The capacity plan is in plan.cpp.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu.h"

namespace moe::cpu {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 256;  // tokens per reduction block: sums do not depend on thread count

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// Index of the best not-yet-taken entry: highest value, ties to the lower index. Values are never NaN.
inline int64_t argmax_free(const float *v, const unsigned char *taken, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

// Shazeer et al. 2017: the k-th largest noisy logit excluding expert e is the (k+1)-th largest when
// e is among the top k, else the k-th. Ordering as in top-k (NaN as -inf, ties to the lower index).
struct Thresholds {
  int64_t kth = -1, k1th = -1;  // indices of the k-th and (k+1)-th largest (k1th -1 when k == E)
};

Thresholds thresholds(const float *L, int64_t E, int64_t k, float *clean, unsigned char *taken) {
  Thresholds th;
  if (E <= 0) return th;
  for (int64_t e = 0; e < E; ++e) clean[e] = std::isnan(L[e]) ? kNegInf : L[e];
  std::fill(taken, taken + E, 0);
  const int64_t want = std::min(k + 1, E);
  for (int64_t j = 0; j < want; ++j) {
    int64_t e = argmax_free(clean, taken, E);
    taken[e] = 1;
    if (j == k - 1) th.kth = e;
    if (j == k) th.k1th = e;
  }
  // taken[] now marks the top k (and the (k+1)-th); unmark the latter so it reads "in top k".
  if (th.k1th >= 0) taken[th.k1th] = 0;
  return th;
}

inline float normal_cdf(float z) { return 0.5f * std::erfc(-z * 0.70710678118654752f); }
inline float normal_pdf(float z) { return 0.39894228040143268f * std::exp(-0.5f * z * z); }

}  // namespace

moe_status select(void *st, const moe_select_args *a) {
  return guarded(st, [&] {
    const int64_t T = a->T, E = a->E, k = a->k, G = a->num_groups;
    const int nthreads = omp_get_max_threads();
    const int64_t gsize = E / G;
    std::vector<float> sel_buf(checked_count(nthreads, E, "select scratch"));
    std::vector<float> gscore_buf(checked_count(nthreads, G, "select scratch"));
    std::vector<unsigned char> taken_buf(checked_count(nthreads, std::max(E, G), "select scratch"));
    const int64_t nblocks = (T + kBlock - 1) / kBlock;
    std::vector<double> block_p(checked_count(nblocks, E, "select sums"), 0.0), block_z(nblocks, 0.0);
    const bool load = a->clean_logits != nullptr;
    std::vector<double> block_load(load ? checked_count(nblocks, E, "select sums") : 0, 0.0);
    std::vector<float> ord_buf(load ? checked_count(nthreads, E, "select scratch") : 0);

#pragma omp parallel for schedule(static) if (worth_threads(T * E))
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int tid = omp_get_thread_num();
      float *sel = sel_buf.data() + static_cast<size_t>(tid) * E;
      float *gscore = gscore_buf.data() + static_cast<size_t>(tid) * G;
      unsigned char *taken = taken_buf.data() + static_cast<size_t>(tid) * std::max(E, G);
      double *psum = block_p.data() + blk * E;
      for (int64_t t = blk * kBlock; t < std::min(T, (blk + 1) * kBlock); ++t) {
        const float *L = a->logits + t * E;
        float *S = a->scores + t * E;
        float m = kNegInf;
        bool nan = false;
        for (int64_t e = 0; e < E; ++e) {
          if (std::isnan(L[e])) nan = true;
          else if (L[e] > m) m = L[e];
        }
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(L[e] - m);
        const float lse = nan ? std::numeric_limits<float>::quiet_NaN() : m + std::log(sum);
        a->lse[t] = lse;
        block_z[blk] += static_cast<double>(lse) * lse;
        if (a->score == MOE_SCORE_SOFTMAX) {
          for (int64_t e = 0; e < E; ++e) S[e] = std::exp(L[e] - m) / sum;
        } else {
          for (int64_t e = 0; e < E; ++e) S[e] = sigmoid(L[e]);
        }
        // P for the load-balance loss: S itself, or S normalised per token for sigmoid scores.
        float norm = 1.0f;
        if (a->score == MOE_SCORE_SIGMOID) {
          float s = 0.0f;
          for (int64_t e = 0; e < E; ++e) s += S[e];
          norm = 1.0f / s;
        }
        for (int64_t e = 0; e < E; ++e) psum[e] += static_cast<double>(S[e] * norm);
        if (load) {
          float *ord = ord_buf.data() + static_cast<size_t>(tid) * E;
          Thresholds th = thresholds(L, E, k, ord, taken);
          double *lsum = block_load.data() + blk * E;
          for (int64_t e = 0; e < E; ++e) {
            int64_t ti = taken[e] ? th.k1th : th.kth;
            float p = 1.0f;
            if (ti >= 0) {
              const float sd = a->noise_std[t * E + e];
              p = normal_cdf((a->clean_logits[t * E + e] - L[ti]) / sd);
            }
            lsum[e] += static_cast<double>(p);
          }
        }
        if (a->expert_choice) continue;

        for (int64_t e = 0; e < E; ++e) {
          float v = S[e] + a->bias[e];
          sel[e] = std::isnan(v) ? kNegInf : v;
        }
        if (G > 1) {
          for (int64_t g = 0; g < G; ++g) {
            float b1 = kNegInf, b2 = kNegInf;
            for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
              if (sel[e] > b1) { b2 = b1; b1 = sel[e]; }
              else if (sel[e] > b2) b2 = sel[e];
            }
            float v = gsize == 1 ? b1 : b1 + b2;
            gscore[g] = std::isnan(v) ? kNegInf : v;
            taken[g] = 0;
          }
          // taken[] marks kept groups here; the experts of the others are masked.
          for (int64_t i = 0; i < a->topk_groups; ++i) {
            int64_t g = argmax_free(gscore, taken, G);
            taken[g] = 1;
          }
          for (int64_t g = 0; g < G; ++g)
            if (!taken[g])
              for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) sel[e] = kNegInf;
        }
        std::fill(taken, taken + E, 0);
        int32_t *ids = a->topk_ids + t * k;
        float *w = a->topk_w + t * k;
        float wsum = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          int64_t e = argmax_free(sel, taken, E);
          taken[e] = 1;
          ids[j] = static_cast<int32_t>(e);
          w[j] = S[e];
          wsum += S[e];
        }
        const float scale = a->normalize ? a->routed_scale / (wsum + 1e-20f) : a->routed_scale;
        for (int64_t j = 0; j < k; ++j) w[j] *= scale;
      }
    }
    std::fill(a->counts, a->counts + E, 0);
    if (!a->expert_choice)
      for (int64_t i = 0; i < T * k; ++i) ++a->counts[a->topk_ids[i]];
    if (load) {
      std::fill(a->load_sum, a->load_sum + E, 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk)
        for (int64_t e = 0; e < E; ++e) a->load_sum[e] += block_load[blk * E + e];
    }
    std::fill(a->prob_sum, a->prob_sum + E, 0.0);
    double z = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      for (int64_t e = 0; e < E; ++e) a->prob_sum[e] += block_p[blk * E + e];
      z += block_z[blk];
    }
    *a->lse_sq_sum = z;
  });
}

moe_status select_bwd(void *st, const moe_select_bwd_args *a) {
  return guarded(st, [&] {
    const int64_t T = a->T, E = a->E, k = a->k;
    const int nthreads = omp_get_max_threads();
    std::vector<float> ds_buf(checked_count(nthreads, E, "select_bwd scratch"));
    std::vector<float> ord_buf(a->load_coef ? checked_count(nthreads, E, "select_bwd scratch") : 0);
    std::vector<unsigned char> taken_buf(a->load_coef ? checked_count(nthreads, E, "select_bwd scratch") : 0);
    const float zscale = a->z_coef * 2.0f / static_cast<float>(T);
#pragma omp parallel for schedule(static) if (worth_threads(T * E))
    for (int64_t t = 0; t < T; ++t) {
      float *dS = ds_buf.data() + static_cast<size_t>(omp_get_thread_num()) * E;
      const float *S = a->scores + t * E;
      const float *L = a->logits + t * E;
      std::fill(dS, dS + E, 0.0f);
      if (a->expert_choice) {
        for (int64_t i = a->token_offsets[t]; i < a->token_offsets[t + 1]; ++i) {
          const int32_t r = a->token_rows[i];
          const int64_t e = a->row_slot[r] % E;
          dS[e] = a->drow_weight[r] + (a->gate_coef ? a->gate_coef[e] : 0.0f);
        }
      }
      const int32_t *ids = a->topk_ids + t * k;
      float usum = 0.0f, dot = 0.0f;
      for (int64_t j = 0; j < (a->expert_choice ? 0 : k); ++j) {
        int32_t r = a->row_of_slot[t * k + j];
        float dw = 0.0f;
        if (r >= 0) {
          dw = a->drow_weight[r];
          if (a->gate_coef) dw += a->gate_coef[ids[j]];
        }
        usum += S[ids[j]];
        dot += dw * S[ids[j]];
        dS[ids[j]] = dw;  // held as dw for now; turned into dS below
      }
      if (a->expert_choice) {
      } else if (a->normalize) {
        const float s = usum + 1e-20f;
        for (int64_t j = 0; j < k; ++j) dS[ids[j]] = a->routed_scale * (dS[ids[j]] / s - dot / (s * s));
      } else {
        for (int64_t j = 0; j < k; ++j) dS[ids[j]] *= a->routed_scale;
      }
      if (a->score == MOE_SCORE_SOFTMAX) {
        for (int64_t e = 0; e < E; ++e) dS[e] += a->lb_coef[e];
        float sd = 0.0f;
        for (int64_t e = 0; e < E; ++e) sd += dS[e] * S[e];
        float *dL = a->dlogits + t * E;
        for (int64_t e = 0; e < E; ++e) dL[e] = S[e] * (dS[e] - sd);
      } else {
        float ssum = 0.0f, cp = 0.0f;
        for (int64_t e = 0; e < E; ++e) ssum += S[e];
        for (int64_t e = 0; e < E; ++e) cp += a->lb_coef[e] * S[e];
        cp /= ssum;
        float *dL = a->dlogits + t * E;
        for (int64_t e = 0; e < E; ++e) {
          float d = dS[e] + (a->lb_coef[e] - cp) / ssum;
          dL[e] = d * S[e] * (1.0f - S[e]);
        }
      }
      if (a->z_coef != 0.0f) {
        float *dL = a->dlogits + t * E;
        const float lse = a->lse[t];
        for (int64_t e = 0; e < E; ++e) dL[e] += zscale * lse * std::exp(L[e] - lse);
      }
      if (a->load_coef) {
        // P[t,e] = Phi((clean - thr) / sd): gradients to the clean logit, the noise scale, and
        // through the threshold to the noisy logit it was read from.
        const int tid = omp_get_thread_num();
        float *ord = ord_buf.data() + static_cast<size_t>(tid) * E;
        unsigned char *taken = taken_buf.data() + static_cast<size_t>(tid) * E;
        Thresholds th = thresholds(L, E, k, ord, taken);
        float *dL = a->dlogits + t * E;
        for (int64_t e = 0; e < E; ++e) {
          const int64_t i = t * E + e;
          const int64_t ti = taken[e] ? th.k1th : th.kth;
          a->dclean_extra[i] = 0.0f;
          a->dstd_extra[i] = 0.0f;
          if (ti < 0) continue;
          const float sd = a->noise_std[i];
          const float z = (a->clean_logits[i] - L[ti]) / sd;
          const float gp = a->load_coef[e] * normal_pdf(z) / sd;
          a->dclean_extra[i] = gp;
          a->dstd_extra[i] = -gp * z;
          dL[ti] -= gp;
        }
      }
    }
  });
}

}  // namespace moe::cpu
