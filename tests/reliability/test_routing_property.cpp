// Property test of routing: 10,000 random cases through the CPU backend's stage table (the table
// the core drives): select -> plan -> dispatch -> combine. Cases mix NaN rows, partly NaN rows,
// +-Inf logits, huge magnitudes, ties, NaN/Inf selection bias, T = 0, E = 1, k = E, group-limited
// routing, softmax and sigmoid scores, capacities 0, 1, 2, tiny and dropless, both drop policies,
// capacity per group of tokens (moe_plan_args.group_size, a shorter last group with its own
// capacity), and expert choice. For every case:
//  - every token gets k distinct expert ids in [0, E), equal to a reference top-k over the stage's
//    own scores (NaN counts as -inf, ties go to the lower index, groups per shared/DESIGN.md 4);
//  - counts are the histogram of the ids; kept + dropped = T*k; per-expert kept <= capacity and
//    = min(routed, capacity) in each token group, the kept slots being the reference's for the
//    drop policy;
//  - rows and slots are inverse maps; dispatch gathers the token's row; combine with unit weights
//    gives back the input exactly (one unit weight per token) or kept-count times it (all ones).
// Expert choice: every expert takes min(C, T) distinct tokens of each token group, the top-C by
// score (ties to the lower token), and the token-side index (token_offsets / token_rows) is
// consistent.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/backend.h"
#include "support/random.h"
#include "support/stages.h"

namespace {

using moe_test::Plan;
using moe_test::Rng;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kCases = 10000;

struct Case {
  int64_t T = 0, E = 1, k = 1, G = 1, TG = 1, d = 1;
  int score = MOE_SCORE_SOFTMAX, normalize = 1;
  float routed_scale = 1.0f;
  int64_t capacity = -1;
  int64_t group_size = 0, last_capacity = -1;  // capacity per group of tokens; 0: the whole call
  int policy = MOE_DROP_POSITION;
  bool expert_choice = false;
  std::vector<float> logits, bias;
  std::string describe() const {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "T %lld E %lld k %lld G %lld/%lld score %d norm %d C %lld groups of %lld (last C %lld) policy %d "
                  "ec %d",
                  (long long)T, (long long)E, (long long)k, (long long)G, (long long)TG, score, normalize,
                  (long long)capacity, (long long)group_size, (long long)last_capacity, policy, (int)expert_choice);
    return buf;
  }
  // Token groups as moe_plan_args defines them: group_size tokens each, the last one shorter when
  // group_size does not divide T and then capped at last_capacity.
  int64_t groups() const { return group_size > 0 && group_size < T ? (T + group_size - 1) / group_size : 1; }
  int64_t group_begin(int64_t g) const { return groups() == 1 ? 0 : g * group_size; }
  int64_t group_end(int64_t g) const { return groups() == 1 ? T : std::min(T, (g + 1) * group_size); }
  int64_t group_capacity(int64_t g) const {
    return groups() > 1 && g == groups() - 1 && T % group_size != 0 ? last_capacity : capacity;
  }
};

// One row of logits of a random kind.
void fill_row(Rng &rng, float *L, int64_t E) {
  const int kind = static_cast<int>(rng.range(0, 9));
  for (int64_t e = 0; e < E; ++e) L[e] = rng.uniform(-4.0f, 4.0f);
  switch (kind) {
    case 0: case 1: break;                                                        // plain
    case 2: for (int64_t e = 0; e < E; ++e) L[e] = static_cast<float>(rng.range(-1, 1)); break;  // ties
    case 3: for (int64_t e = 0; e < E; ++e) L[e] = kNaN; break;                   // NaN row
    case 4: for (int64_t e = 0; e < E; ++e) if (rng.chance(40)) L[e] = kNaN; break;  // partly NaN
    case 5: L[rng.range(0, E - 1)] = kInf; if (rng.chance(50)) L[rng.range(0, E - 1)] = kInf; break;
    case 6: for (int64_t e = 0; e < E; ++e) if (rng.chance(50)) L[e] = -kInf; break;
    case 7: for (int64_t e = 0; e < E; ++e) L[e] = rng.chance(50) ? FLT_MAX : -FLT_MAX; break;
    case 8: for (int64_t e = 0; e < E; ++e) L[e] = 0.5f; break;                   // all equal
    default: for (int64_t e = 0; e < E; ++e) L[e] = rng.uniform(-1e30f, 1e30f); break;
  }
}

Case make_case(Rng &rng) {
  Case c;
  const int shape = static_cast<int>(rng.range(0, 99));
  if (shape < 5) c.E = 1;
  else if (shape < 90) c.E = rng.range(2, 16);
  else c.E = rng.range(17, 64);
  c.k = rng.chance(20) ? c.E : rng.range(1, c.E);
  c.T = rng.chance(8) ? 0 : rng.range(1, 48);
  if (rng.chance(1)) c.T = rng.range(300, 600);  // large enough for the parallel regions
  c.d = rng.range(1, 6);
  c.expert_choice = rng.chance(15);
  c.score = c.expert_choice ? MOE_SCORE_SOFTMAX : (rng.chance(30) ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX);
  c.normalize = rng.chance(70);
  c.routed_scale = rng.chance(80) ? 1.0f : rng.uniform(0.1f, 3.0f);
  if (!c.expert_choice && c.E > 1 && rng.chance(25)) {
    std::vector<int64_t> divisors;
    for (int64_t g = 2; g <= c.E; ++g)
      if (c.E % g == 0) divisors.push_back(g);
    if (!divisors.empty()) {
      c.G = divisors[rng.range(0, static_cast<int64_t>(divisors.size()) - 1)];
      c.TG = rng.range(1, c.G);
      const int64_t reach = c.TG * (c.E / c.G);
      if (c.k > reach) c.k = rng.range(1, reach);
    }
  }
  // Capacity: dropless, 0, 1, 2, small, or the smallest a positive capacity factor gives.
  const int cap = static_cast<int>(rng.range(0, 6));
  const int64_t Tk = c.T * c.k;
  switch (cap) {
    case 0: c.capacity = -1; break;
    case 1: c.capacity = 0; break;
    case 2: c.capacity = 1; break;
    case 3: c.capacity = 2; break;
    case 4: c.capacity = rng.range(0, std::max<int64_t>(1, Tk)); break;
    case 5: c.capacity = static_cast<int64_t>(std::ceil(1e-30 * static_cast<double>(Tk) / c.E)); break;
    default: c.capacity = Tk + rng.range(0, 3); break;
  }
  if (c.expert_choice && c.capacity < 0) c.capacity = rng.range(0, c.T + 2);
  if (c.capacity >= 0 && c.T > 1 && rng.chance(30)) {
    c.group_size = rng.range(1, c.T + 1);  // T or more: one group
    c.capacity = rng.range(0, std::min<int64_t>(c.capacity, c.group_size * c.k) + 1);
    c.last_capacity = rng.range(0, (c.T % c.group_size) * c.k + 1);
  }
  c.policy = rng.chance(50) ? MOE_DROP_POSITION : MOE_DROP_PROBS;
  c.logits.resize(static_cast<size_t>(c.T * c.E));
  for (int64_t t = 0; t < c.T; ++t) fill_row(rng, c.logits.data() + t * c.E, c.E);
  c.bias.assign(static_cast<size_t>(c.E), 0.0f);
  const int b = static_cast<int>(rng.range(0, 9));
  if (b >= 6)
    for (float &v : c.bias) v = rng.uniform(-0.5f, 0.5f);
  if (b == 9) {
    c.bias[rng.range(0, c.E - 1)] = kNaN;
    c.bias[rng.range(0, c.E - 1)] = rng.chance(50) ? kInf : -kInf;
  }
  return c;
}

inline float key(float v) { return std::isnan(v) ? -kInf : v; }

// Index of the best entry not yet taken: highest key, ties to the lower index.
int64_t best_free(const std::vector<float> &v, const std::vector<char> &taken) {
  int64_t best = -1;
  for (size_t i = 0; i < v.size(); ++i)
    if (!taken[i] && (best < 0 || v[i] > v[best])) best = static_cast<int64_t>(i);
  return best;
}

// shared/DESIGN.md section 4 over the stage's own scores S: selection scores S + bias (NaN -> -inf),
// groups by the sum of their top-2, top-k with ties to the lower index.
std::vector<int32_t> reference_topk(const Case &c, const float *S) {
  const int64_t E = c.E, G = c.G, gs = E / G;
  std::vector<float> sel(E);
  for (int64_t e = 0; e < E; ++e) sel[e] = key(S[e] + c.bias[e]);
  if (G > 1) {
    std::vector<float> gscore(G);
    for (int64_t g = 0; g < G; ++g) {
      float b1 = -kInf, b2 = -kInf;
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
        if (sel[e] > b1) {
          b2 = b1;
          b1 = sel[e];
        } else if (sel[e] > b2) {
          b2 = sel[e];
        }
      }
      gscore[g] = key(gs == 1 ? b1 : b1 + b2);
    }
    std::vector<char> kept(G, 0);
    for (int64_t i = 0; i < c.TG; ++i) kept[best_free(gscore, kept)] = 1;
    for (int64_t g = 0; g < G; ++g)
      if (!kept[g])
        for (int64_t e = g * gs; e < (g + 1) * gs; ++e) sel[e] = -kInf;
  }
  std::vector<char> taken(E, 0);
  std::vector<int32_t> ids(c.k);
  for (int64_t j = 0; j < c.k; ++j) {
    const int64_t e = best_free(sel, taken);
    taken[e] = 1;
    ids[j] = static_cast<int32_t>(e);
  }
  return ids;
}

struct Totals {
  int64_t cases = 0, expert_choice = 0, nan_rows = 0, t0 = 0, e1 = 0, k_eq_e = 0, cap0 = 0, cap1 = 0, grouped = 0;
  int64_t token_groups = 0;
  int64_t slots = 0, dropped = 0;
} g_totals;

class RoutingProperty : public moe_test::CpuBackendTest<> {
 protected:
  // Dispatches x to the plan's rows, then combines rows (ye = xe) back with the given row weights.
  void dispatch_combine(const Case &c, const Plan &p, const std::vector<float> &x, const std::vector<float> &weights,
                        std::vector<float> &xe, std::vector<float> &y) {
    xe.assign(static_cast<size_t>(p.R * c.d), kNaN);
    y.assign(static_cast<size_t>(c.T * c.d), kNaN);
    moe_rows_args a = moe_test::rows_args(p, c.d);
    a.row_weight = weights.data();
    a.x = x.data();
    a.xe = xe.data();
    ASSERT_EQ(ops->dispatch(state, &a), MOE_OK) << err();
    a.ye = xe.data();
    a.y = y.data();
    ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
  }

  void run_case(const Case &c, Rng &rng);
  void run_expert_choice(const Case &c, const std::vector<float> &S, Rng &rng);

};

void RoutingProperty::run_case(const Case &c, Rng &rng) {
  const int64_t T = c.T, E = c.E, k = c.k, n = T * k;
  moe_test::SelectOut so;
  const moe_test::SelectParams sp{k, c.score, c.normalize, c.routed_scale, c.G, c.TG, c.expert_choice};
  ASSERT_EQ(moe_test::run_select(ops, state, T, E, sp, c.logits, c.bias, so), MOE_OK) << err();
  const std::vector<float> &scores = so.scores, &topk_w = so.topk_w;
  const std::vector<int32_t> &ids = so.ids;
  const std::vector<int64_t> &counts = so.counts;
  if (c.expert_choice) {
    run_expert_choice(c, scores, rng);
    return;
  }

  // Ids: in range, distinct, the reference's; counts: their histogram.
  std::vector<int64_t> hist(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> seen;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ids[t * k + j];
      ASSERT_GE(e, 0) << "token " << t;
      ASSERT_LT(e, E) << "token " << t;
      ASSERT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
      ++hist[e];
    }
    const std::vector<int32_t> want = reference_topk(c, scores.data() + t * E);
    ASSERT_EQ(std::vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k), want) << "token " << t;
  }
  ASSERT_EQ(counts, hist);

  // Plan.
  Plan p;
  ASSERT_EQ(moe_test::run_plan(ops, state, T, E, k, c.capacity, c.policy, ids, topk_w, p, c.group_size,
                               c.last_capacity),
            MOE_OK)
      << err();
  const std::vector<int32_t> &row_of_slot = p.row_of_slot, &row_token = p.row_token, &row_slot = p.row_slot;
  const std::vector<float> &row_weight = p.row_weight;
  const std::vector<int64_t> &offsets = p.offsets, &kept = p.kept;

  // The reference's kept slots, in each token group: POSITION keeps the first C in (choice, token)
  // order; PROBS the C largest weights (NaN as -inf), equal weights in that same order.
  std::vector<char> keep(n, 1);
  std::vector<int64_t> want_kept(hist);
  if (c.capacity >= 0) {
    std::fill(want_kept.begin(), want_kept.end(), 0);
    for (int64_t g = 0; g < c.groups(); ++g) {
      const size_t cap = static_cast<size_t>(c.group_capacity(g));
      std::vector<std::vector<int64_t>> slots(E);
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = c.group_begin(g); t < c.group_end(g); ++t) slots[ids[t * k + j]].push_back(t * k + j);
      for (int64_t e = 0; e < E; ++e) {
        auto &v = slots[e];
        if (c.policy == MOE_DROP_PROBS)
          std::stable_sort(v.begin(), v.end(), [&](int64_t x, int64_t y) { return key(topk_w[x]) > key(topk_w[y]); });
        for (size_t i = cap; i < v.size(); ++i) keep[v[i]] = 0;
        want_kept[e] += static_cast<int64_t>(std::min(cap, v.size()));
      }
    }
  }
  ASSERT_EQ(offsets[0], 0);
  int64_t dropped = 0;
  for (int64_t s = 0; s < n; ++s) {
    ASSERT_EQ(row_of_slot[s] >= 0, keep[s] != 0) << "slot " << s;
    dropped += row_of_slot[s] < 0;
  }
  const int64_t R = offsets[E];
  ASSERT_EQ(R + dropped, n) << "kept + dropped must be T*k";
  for (int64_t e = 0; e < E; ++e) {
    ASSERT_EQ(offsets[e + 1] - offsets[e], kept[e]);
    ASSERT_EQ(kept[e], want_kept[e]) << "expert " << e;
    if (c.capacity >= 0 && c.groups() == 1) {
      ASSERT_LE(kept[e], c.capacity);
    }
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      const int32_t s = row_slot[r];
      ASSERT_GE(s, 0);
      ASSERT_LT(s, n);
      ASSERT_EQ(ids[s], e) << "row " << r << " sits in expert " << e << "'s range";
      ASSERT_EQ(row_of_slot[s], r);
      ASSERT_EQ(row_token[r], s / k);
      ASSERT_EQ(std::memcmp(&row_weight[r], &topk_w[s], sizeof(float)), 0);
      if (r > offsets[e]) {
        ASSERT_LT(row_slot[r - 1], s) << "rows of an expert are in slot order";
      }
    }
  }
  g_totals.slots += n;
  g_totals.dropped += dropped;

  // Dispatch then combine: one unit weight per token (its first kept slot) gives x back exactly;
  // all-ones weights give kept-count times x.
  const std::vector<float> x = rng.ints(T * c.d, -8, 8);
  std::vector<float> first(R, 0.0f), ones(R, 1.0f), xe, y;
  std::vector<int64_t> nkept(T, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row_of_slot[t * k + j];
      if (r < 0) continue;
      if (nkept[t] == 0) first[r] = 1.0f;
      ++nkept[t];
    }
  dispatch_combine(c, p, x, first, xe, y);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < c.d; ++i) ASSERT_EQ(xe[r * c.d + i], x[row_token[r] * c.d + i]) << "dispatch row " << r;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < c.d; ++i)
      ASSERT_EQ(y[t * c.d + i], nkept[t] ? x[t * c.d + i] : 0.0f) << "token " << t << " not restored";
  dispatch_combine(c, p, x, ones, xe, y);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < c.d; ++i) ASSERT_EQ(y[t * c.d + i], static_cast<float>(nkept[t]) * x[t * c.d + i]);
}

void RoutingProperty::run_expert_choice(const Case &c, const std::vector<float> &S, Rng &rng) {
  const int64_t T = c.T, E = c.E;
  // Each expert takes min(C, group length) tokens of each token group.
  int64_t C = 0;
  for (int64_t g = 0; g < c.groups() && T > 0; ++g)
    C += std::min(c.group_capacity(g), c.group_end(g) - c.group_begin(g));
  const int64_t rows = E * C;
  Plan p;
  ASSERT_EQ(moe_test::run_plan_ec(ops, state, T, E, c.k, c.capacity, S, p, c.group_size, c.last_capacity), MOE_OK)
      << err();
  const std::vector<int32_t> &row_token = p.row_token, &row_slot = p.row_slot, &token_rows = p.token_rows;
  const std::vector<float> &row_weight = p.row_weight;
  const std::vector<int64_t> &offsets = p.offsets, &kept = p.kept, &token_offsets = p.token_offsets;
  ASSERT_EQ(offsets[E], rows);
  std::vector<int64_t> per_token(T, 0);
  for (int64_t e = 0; e < E; ++e) {
    ASSERT_EQ(kept[e], C);
    ASSERT_EQ(offsets[e], e * C);
    std::vector<char> chosen(T, 0);
    for (int64_t r = e * C; r < (e + 1) * C; ++r) {
      const int32_t t = row_token[r];
      ASSERT_GE(t, 0);
      ASSERT_LT(t, T);
      if (r > e * C) {
        ASSERT_LT(row_token[r - 1], t) << "an expert's tokens are distinct, in token order";
      }
      ASSERT_EQ(row_slot[r], t * E + e);
      ASSERT_EQ(std::memcmp(&row_weight[r], &S[t * E + e], sizeof(float)), 0);
      chosen[t] = 1;
      ++per_token[t];
    }
    // Top-C of each group: every chosen token beats every other of its group (key, then lower
    // token), and the group gave its share.
    for (int64_t g = 0; g < c.groups() && T > 0; ++g) {
      const int64_t t0 = c.group_begin(g), t1 = c.group_end(g);
      ASSERT_EQ(std::count(chosen.begin() + t0, chosen.begin() + t1, 1),
                std::min(c.group_capacity(g), t1 - t0))
          << "expert " << e << ", token group " << g;
      for (int64_t a = t0; a < t1; ++a)
        for (int64_t b = t0; b < t1; ++b)
          if (chosen[a] && !chosen[b]) {
            const float ka = key(S[a * E + e]), kb = key(S[b * E + e]);
            ASSERT_TRUE(ka > kb || (ka == kb && a < b)) << "expert " << e << " took token " << a << " over " << b;
          }
    }
  }
  ASSERT_EQ(token_offsets[0], 0);
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(token_offsets[t + 1] - token_offsets[t], per_token[t]);
    for (int64_t i = token_offsets[t]; i < token_offsets[t + 1]; ++i) {
      ASSERT_EQ(row_token[token_rows[i]], t);
      if (i > token_offsets[t]) {
        ASSERT_LT(token_rows[i - 1], token_rows[i]);
      }
    }
  }
  const std::vector<float> x = rng.ints(T * c.d, -8, 8);
  std::vector<float> ones(rows, 1.0f), xe, y;
  dispatch_combine(c, p, x, ones, xe, y);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < c.d; ++i) ASSERT_EQ(y[t * c.d + i], static_cast<float>(per_token[t]) * x[t * c.d + i]);
  g_totals.slots += rows;
}

TEST_F(RoutingProperty, TenThousandRandomCases) {
  Rng rng(20240611);
  for (int i = 0; i < kCases; ++i) {
    const Case c = make_case(rng);
    SCOPED_TRACE("case " + std::to_string(i) + ": " + c.describe());
    run_case(c, rng);
    if (HasFatalFailure()) return;
    ++g_totals.cases;
    g_totals.expert_choice += c.expert_choice;
    g_totals.t0 += c.T == 0;
    g_totals.e1 += c.E == 1;
    g_totals.k_eq_e += c.k == c.E;
    g_totals.cap0 += c.capacity == 0;
    g_totals.cap1 += c.capacity == 1;
    g_totals.grouped += c.G > 1;
    g_totals.token_groups += c.groups() > 1;
    for (int64_t t = 0; t < c.T; ++t) {
      bool bad = false;
      for (int64_t e = 0; e < c.E; ++e) bad |= !std::isfinite(c.logits[t * c.E + e]);
      g_totals.nan_rows += bad;
    }
  }
  std::printf("[ property ] %lld routing cases: %lld expert choice, %lld grouped, %lld with T = 0, %lld with E = 1, "
              "%lld with k = E, %lld with capacity 0, %lld with capacity 1, %lld with capacity per token group; "
              "%lld token rows with NaN/Inf logits; %lld slots, %lld dropped\n",
              (long long)g_totals.cases, (long long)g_totals.expert_choice, (long long)g_totals.grouped,
              (long long)g_totals.t0, (long long)g_totals.e1, (long long)g_totals.k_eq_e, (long long)g_totals.cap0,
              (long long)g_totals.cap1, (long long)g_totals.token_groups, (long long)g_totals.nan_rows, (long long)g_totals.slots,
              (long long)g_totals.dropped);
  EXPECT_EQ(g_totals.cases, kCases);
  EXPECT_GT(g_totals.token_groups, kCases / 20) << "capacity groups are part of the population";
}

}  // namespace
