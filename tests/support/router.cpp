#include "router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/rng.h"

namespace moe_test {

namespace {

bool near(double a, double b) {
  return std::fabs(a - b) <= kNearTie * std::max({std::fabs(a), std::fabs(b), 1e-30});
}

// Indices of v (over the candidates given) in routing order: larger first, ties to the lower index.
std::vector<int64_t> ranked(const std::vector<double> &v, std::vector<int64_t> idx) {
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  return idx;
}

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

// Whether any two neighbours among the first `upto` + 1 entries of order are at a near-tie.
bool near_in(const std::vector<double> &v, const std::vector<int64_t> &order, size_t upto) {
  for (size_t j = 0; j < upto && j + 1 < order.size(); ++j)
    if (near(v[order[j]], v[order[j + 1]])) return true;
  return false;
}

double softplus(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

// Slots per expert (core/pipeline.cpp capacity_of), or -1 when dropless.
int64_t capacity_of(const moe_config &c, int64_t Tk) {
  if (!(c.capacity_factor > 0)) return -1;
  const double cap = std::ceil(static_cast<double>(c.capacity_factor) * static_cast<double>(Tk) / c.num_experts);
  return cap > static_cast<double>(Tk) ? Tk : static_cast<int64_t>(cap);
}

}  // namespace

Routing route(const RouterInputs &in, bool training, uint64_t step) {
  const moe_config &c = in.cfg;
  const int64_t T = in.T, d = c.d_model, E = c.num_experts, k = c.top_k;
  const int noise = training ? c.noise : MOE_NOISE_NONE;
  const bool ec = c.routing == MOE_ROUTE_EXPERT_CHOICE;
  Routing r;
  r.near.assign(static_cast<size_t>(T), 0);
  std::vector<char> &out = r.near;

  // Logits, with the training noise drawn as the backends draw it (src/core/rng.h).
  std::vector<double> L(static_cast<size_t>(T * E));
  std::vector<float> row(static_cast<size_t>(d));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      float v = in.x[t * d + i];
      if (noise == MOE_NOISE_JITTER) {
        const float u = moe::rng_uniform(c.seed, moe::kStreamJitter + step, static_cast<uint64_t>(t * d + i));
        v *= 1.0f - c.noise_eps + 2.0f * c.noise_eps * u;
      }
      row[i] = v;
    }
    for (int64_t e = 0; e < E; ++e) {
      double acc = 0.0, pre = 0.0;
      for (int64_t i = 0; i < d; ++i) acc += static_cast<double>(row[i]) * in.weight[e * d + i];
      if (!in.logit_bias.empty()) acc += in.logit_bias[e];  // router_logit_bias, before the noise
      if (noise == MOE_NOISE_GAUSSIAN) {
        for (int64_t i = 0; i < d; ++i) pre += static_cast<double>(row[i]) * in.noise_weight[e * d + i];
        const double z = moe::rng_normal(c.seed, moe::kStreamNoise + step, static_cast<uint64_t>(t * E + e));
        acc += z * softplus(pre);
      }
      L[t * E + e] = acc;
    }
  }
  // Scores.
  std::vector<double> S(L.size());
  const bool softmax = ec || c.score == MOE_SCORE_SOFTMAX;
  for (int64_t t = 0; t < T; ++t) {
    const double *l = &L[t * E];
    double *s = &S[t * E];
    if (softmax) {
      const double m = *std::max_element(l, l + E);
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) sum += s[e] = std::exp(l[e] - m);
      for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    } else {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-l[e]));
    }
  }

  if (ec) {
    // Each expert's C best tokens: the boundary between the C-th and the next.
    const int64_t C = std::min(capacity_of(c, T * k), T);
    std::vector<double> col(static_cast<size_t>(T));
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t t = 0; t < T; ++t) col[t] = S[t * E + e];
      std::vector<int64_t> order = ranked(col, iota(T));
      if (C >= 1 && C < T && near(col[order[C - 1]], col[order[C]])) out[order[C - 1]] = out[order[C]] = 1;
      order.resize(static_cast<size_t>(std::max<int64_t>(C, 0)));
      std::sort(order.begin(), order.end());
      for (int64_t t : order) {
        r.assignment_token.push_back(static_cast<int32_t>(t));
        r.assignment_expert.push_back(static_cast<int32_t>(e));
      }
    }
    return r;
  }

  const int64_t G = c.num_groups > 1 ? c.num_groups : 1, gsize = E / G;
  std::vector<double> sel(static_cast<size_t>(E)), gscore(static_cast<size_t>(G));
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<double> w(static_cast<size_t>(T * k));
  std::vector<std::vector<int64_t>> reach(static_cast<size_t>(T));  // the first k + 1 candidates
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) sel[e] = S[t * E + e] + (in.bias.empty() ? 0.0 : in.bias[e]);
    std::vector<int64_t> candidates = iota(E);
    if (G > 1) {
      for (int64_t g = 0; g < G; ++g) {
        std::vector<int64_t> members(static_cast<size_t>(gsize));
        std::iota(members.begin(), members.end(), g * gsize);
        const std::vector<int64_t> top = ranked(sel, members);
        gscore[g] = gsize == 1 ? sel[top[0]] : sel[top[0]] + sel[top[1]];
      }
      const std::vector<int64_t> groups = ranked(gscore, iota(G));
      const int64_t keep = c.topk_groups;
      if (keep < G && near(gscore[groups[keep - 1]], gscore[groups[keep]])) out[t] = 1;
      candidates.clear();
      for (int64_t j = 0; j < keep; ++j)
        for (int64_t e = groups[j] * gsize; e < (groups[j] + 1) * gsize; ++e) candidates.push_back(e);
      std::sort(candidates.begin(), candidates.end());
    }
    const std::vector<int64_t> order = ranked(sel, candidates);
    if (near_in(sel, order, static_cast<size_t>(k))) out[t] = 1;
    reach[t].assign(order.begin(), order.begin() + std::min<size_t>(order.size(), static_cast<size_t>(k + 1)));
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      ids[t * k + j] = static_cast<int32_t>(order[j]);
      sum += w[t * k + j] = S[t * E + order[j]];
    }
    for (int64_t j = 0; j < k; ++j) {
      if (c.normalize_topk) w[t * k + j] /= sum + 1e-20;
      w[t * k + j] *= c.routed_scale;
    }
    // Shazeer's load loss sends gradient to the k-th and (k+1)-th largest noisy logits.
    if (noise == MOE_NOISE_GAUSSIAN && c.load_loss_coef != 0.0f) {
      const std::vector<double> l(L.begin() + t * E, L.begin() + (t + 1) * E);
      if (near_in(l, ranked(l, iota(E)), static_cast<size_t>(k + 1))) out[t] = 1;
    }
  }
  // Capacity: an over-full expert keeps its first C slots in position order (choice j, then token
  // t), or (PROBS) its C largest weights, ties in position order; the others read -1.
  const int64_t C = capacity_of(c, T * k);
  if (C >= 0) {
    std::vector<int32_t> kept(ids.size(), -1);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> slots;  // in position order
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = 0; t < T; ++t)
          if (ids[t * k + j] == e) slots.push_back(t * k + j);
      const std::vector<int64_t> order = c.drop_policy == MOE_DROP_PROBS ? ranked(w, slots) : slots;
      const int64_t n = static_cast<int64_t>(order.size());
      for (int64_t i = 0; i < std::min(n, C); ++i) kept[order[i]] = static_cast<int32_t>(e);
      if (c.drop_policy == MOE_DROP_PROBS && C >= 1 && n > C && near(w[order[C - 1]], w[order[C]]))
        out[order[C - 1] / k] = out[order[C] / k] = 1;
    }
    // A token at a near-tie may take another slot, or another position, at an over-full expert:
    // which of that expert's slots are kept may then change for every token routed there.
    std::vector<int64_t> load(static_cast<size_t>(E), 0);
    for (int32_t e : ids) ++load[e];
    std::vector<char> unsettled(static_cast<size_t>(E), 0);
    for (int64_t t = 0; t < T && C > 0; ++t)
      if (out[t])
        for (int64_t e : reach[t]) unsettled[e] |= load[e] >= C;
    for (int64_t s = 0; s < T * k; ++s)
      if (unsettled[ids[s]]) out[s / k] = 1;
    ids = std::move(kept);
  }
  r.ids = std::move(ids);
  return r;
}

bool draw_without_near_ties(RouterInputs &in, uint64_t step, Rng &rng,
                            const std::function<std::vector<float>(Rng &)> &draw_row, int max_rounds) {
  const int64_t d = in.cfg.d_model;
  for (int round = 0;; ++round) {
    std::vector<char> bad = near_ties(in, false);
    if (in.cfg.noise != MOE_NOISE_NONE) {
      const std::vector<char> noisy = near_ties(in, true, step);
      for (size_t t = 0; t < bad.size(); ++t) bad[t] |= noisy[t];
    }
    if (std::find(bad.begin(), bad.end(), 1) == bad.end()) return true;
    if (round == max_rounds) return false;
    for (size_t t = 0; t < bad.size(); ++t)
      if (bad[t]) {
        const std::vector<float> r = draw_row(rng);
        std::copy(r.begin(), r.begin() + d, in.x.begin() + static_cast<int64_t>(t) * d);
      }
  }
}

}  // namespace moe_test
