// moe_config.capacity_group_size through the C API: each group of tokens gets its own capacity,
// computed from its own token count (a shorter last group included), for both routings and both
// drop policies; the expected kept slots are worked out here from the dropless routing of the
// same tokens. Its check and its text form.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int64_t kD = 8, kFF = 16, kE = 4;

moe_config base(moe_routing routing, int64_t k, float capacity_factor, int64_t group_size) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = kD;
  c.d_ff = kFF;
  c.num_experts = kE;
  c.top_k = k;
  c.routing = routing;
  c.normalize_topk = 0;
  c.capacity_factor = capacity_factor;
  c.capacity_group_size = group_size;
  c.seed = 9;
  return c;
}

std::vector<float> normal(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float &f : v) f = dist(rng);
  return v;
}

struct Routed {
  std::vector<int32_t> ids;  // token choice [T,k], -1 dropped
  std::vector<float> weights;
  std::vector<int32_t> token, expert;  // every kept assignment
  std::vector<int64_t> counts = std::vector<int64_t>(kE);
  moe_stats stats{};
};

Routed route(const moe_config &cfg, const std::vector<float> &router, const std::vector<float> &x, int64_t T) {
  Routed r;
  moe_layer *l = nullptr;
  moe_context *ctx = nullptr;
  EXPECT_EQ(moe_layer_create(&cfg, &l), MOE_OK) << moe_last_error();
  if (!l) return r;
  EXPECT_EQ(moe_layer_set_param(l, "router.weight", router.data(), static_cast<int64_t>(router.size())), MOE_OK);
  EXPECT_EQ(moe_context_create(l, &ctx), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_route(l, x.data(), T, ctx), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_context_expert_counts(ctx, r.counts.data()), MOE_OK) << moe_last_error();
  r.stats.struct_size = sizeof r.stats;
  EXPECT_EQ(moe_context_stats(ctx, &r.stats), MOE_OK) << moe_last_error();
  if (cfg.routing == MOE_ROUTE_TOKEN_CHOICE) {
    r.ids.resize(T * cfg.top_k);
    r.weights.resize(T * cfg.top_k);
    EXPECT_EQ(moe_context_topk(ctx, r.ids.data(), r.weights.data()), MOE_OK) << moe_last_error();
  }
  int64_t n = 0;
  EXPECT_EQ(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &n), MOE_OK) << moe_last_error();
  r.token.resize(n);
  r.expert.resize(n);
  EXPECT_EQ(moe_context_assignments(ctx, n, r.token.data(), r.expert.data(), nullptr, &n), MOE_OK);
  moe_context_destroy(ctx);
  moe_layer_destroy(l);
  return r;
}

// C = max(min_capacity, ceil(cf * n * k / E)), at most n*k, for a group of n tokens (moe.h).
int64_t capacity(double cf, int64_t n, int64_t k) {
  return std::min<int64_t>(static_cast<int64_t>(std::ceil(cf * n * k / kE)), n * k);
}

// Token choice with position dropping: in each group, first choices before second ones, token
// order within a choice, each expert keeping its first C slots.
std::vector<int32_t> position_kept(const std::vector<int32_t> &ids, int64_t T, int64_t k, double cf,
                                   int64_t group) {
  std::vector<int32_t> out(ids);
  for (int64_t t0 = 0; t0 < T; t0 += group) {
    const int64_t t1 = std::min(T, t0 + group), C = capacity(cf, t1 - t0, k);
    std::vector<int64_t> used(kE, 0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = t0; t < t1; ++t)
        if (used[ids[t * k + j]]++ >= C) out[t * k + j] = -1;
  }
  return out;
}

TEST(CapacityGroups, TokenChoicePositionKeepsEachGroupsFirstSlots) {
  // T 28 in groups of 6: four full groups (C = ceil(0.5 * 6 * 2 / 4) = 2) and a last group of 4
  // (C = 1); the whole call would have C = ceil(0.5 * 28 * 2 / 4) = 7.
  const int64_t T = 28, k = 2, group = 6;
  const double cf = 0.5;
  const std::vector<float> x = normal(T * kD, 1), router = normal(kE * kD, 2);
  const Routed all = route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.0f, 0), router, x, T);
  ASSERT_EQ(all.stats.dropped_slots, 0);
  const Routed got = route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.5f, group), router, x, T);
  const std::vector<int32_t> want = position_kept(all.ids, T, k, cf, group);
  EXPECT_EQ(got.ids, want);
  const int64_t dropped = std::count(want.begin(), want.end(), -1);
  EXPECT_GT(dropped, 0) << "the groups must drop something for this test to mean anything";
  EXPECT_EQ(got.stats.dropped_slots, dropped);
  // Kept slots keep their weight (not renormalised); dropped ones read 0.
  for (size_t s = 0; s < want.size(); ++s) EXPECT_EQ(got.weights[s], want[s] < 0 ? 0.0f : all.weights[s]) << s;
  // The same tokens as one group drop less: the grouping is what changed the result.
  const Routed whole = route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.5f, 0), router, x, T);
  EXPECT_EQ(whole.ids, position_kept(all.ids, T, k, cf, T));
  EXPECT_NE(whole.ids, got.ids);
  // A group of T or more is the whole call.
  EXPECT_EQ(route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.5f, T), router, x, T).ids, whole.ids);
  EXPECT_EQ(route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.5f, 1000), router, x, T).ids, whole.ids);
  // Without a capacity factor the groups change nothing (dropless stays dropless).
  EXPECT_EQ(route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.0f, group), router, x, T).ids, all.ids);
}

TEST(CapacityGroups, TokenChoiceProbsKeepsEachGroupsLargestWeights) {
  const int64_t T = 30, k = 1, group = 8;  // groups 8, 8, 8, 6: C = 1, 1, 1, 1 (cf 0.5)
  const std::vector<float> x = normal(T * kD, 3), router = normal(kE * kD, 4);
  const Routed all = route(base(MOE_ROUTE_TOKEN_CHOICE, k, 0.0f, 0), router, x, T);
  moe_config c = base(MOE_ROUTE_TOKEN_CHOICE, k, 0.5f, group);
  c.drop_policy = MOE_DROP_PROBS;
  const Routed got = route(c, router, x, T);
  for (int64_t t0 = 0; t0 < T; t0 += group) {
    const int64_t t1 = std::min(T, t0 + group);
    for (int64_t e = 0; e < kE; ++e) {
      // The group's tokens that chose e, largest weight first: the first one is kept.
      int64_t best = -1;
      for (int64_t t = t0; t < t1; ++t)
        if (all.ids[t] == e && (best < 0 || all.weights[t] > all.weights[best])) best = t;
      for (int64_t t = t0; t < t1; ++t) {
        if (all.ids[t] == e) {
          EXPECT_EQ(got.ids[t], t == best ? e : -1) << "token " << t << ", expert " << e;
        }
      }
    }
  }
  EXPECT_GT(got.stats.dropped_slots, 0);
}

TEST(CapacityGroups, ExpertChoiceTakesEachGroupsShare) {
  // T 29 in groups of 8 (the last 5): C = ceil(1 * 8 * 2 / 4) = 4 per full group, ceil(2.5) = 3 in
  // the last; each expert takes 3 * 4 + 3 = 15 tokens, each group giving exactly its C.
  const int64_t T = 29, k = 2, group = 8;
  const std::vector<float> x = normal(T * kD, 5), router = normal(kE * kD, 6);
  const Routed got = route(base(MOE_ROUTE_EXPERT_CHOICE, k, 1.0f, group), router, x, T);
  EXPECT_EQ(got.stats.num_slots, kE * 15);
  for (int64_t e = 0; e < kE; ++e) EXPECT_EQ(got.counts[e], 15) << "expert " << e;
  std::vector<std::vector<int64_t>> per_group(kE, std::vector<int64_t>(4, 0));
  for (size_t i = 0; i < got.token.size(); ++i) ++per_group[got.expert[i]][got.token[i] / group];
  for (int64_t e = 0; e < kE; ++e)
    EXPECT_EQ(per_group[e], (std::vector<int64_t>{4, 4, 4, 3})) << "expert " << e;
  // A capacity above the group's size takes the whole group: cf 3 gives C = 12 > 8 and 8 > 5.
  const Routed full = route(base(MOE_ROUTE_EXPERT_CHOICE, k, 3.0f, group), router, x, T);
  EXPECT_EQ(full.stats.num_slots, kE * T);
}

TEST(CapacityGroups, IsCheckedAndSetByName) {
  moe_config c = base(MOE_ROUTE_TOKEN_CHOICE, 2, 1.0f, 0);
  EXPECT_EQ(c.capacity_group_size, 0);
  ASSERT_EQ(moe_config_set(&c, "capacity_group_size", "-3"), MOE_OK);  // the form is fine; the range is create's
  moe_layer *l = nullptr;
  EXPECT_EQ(moe_layer_create(&c, &l), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("cfg->capacity_group_size is -3, must be >= 0"), std::string::npos)
      << moe_last_error();
  EXPECT_EQ(l, nullptr);
  ASSERT_EQ(moe_config_set(&c, "capacity_group_size", "512"), MOE_OK);
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
  moe_config got;
  got.struct_size = sizeof got;
  ASSERT_EQ(moe_layer_get_config(l, &got), MOE_OK);
  EXPECT_EQ(got.capacity_group_size, 512);
  char text[32];
  ASSERT_EQ(moe_config_get(&got, "capacity_group_size", text, sizeof text), MOE_OK);
  EXPECT_STREQ(text, "512");
  moe_layer_destroy(l);
  // Presets leave it 0 (the sequence length is the caller's to give).
  ASSERT_EQ(moe_config_preset(&c, "switch"), MOE_OK);
  EXPECT_EQ(c.capacity_group_size, 0);
}

}  // namespace
