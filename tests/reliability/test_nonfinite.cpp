// Non-finite inputs through the public API.
//  - check_finite on: NaN, +Inf or -Inf anywhere in x (forward, training forward, route) or dy
//    (backward) gives MOE_ERR_NONFINITE naming the first bad element as x[t][c] / dy[t][c], and
//    changes nothing: the next call with good data gives the bits a fresh layer gives.
//  - check_finite off: non-finite x, dy or router weights never crash; every token still gets k
//    distinct experts in [0, E); no parameter changes; the gradients of experts that no bad token
//    reached stay finite and equal those of the same batch without the bad tokens.
//  - The smallest capacity a positive capacity factor gives (C = 1) keeps at most one slot per expert.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "support/compare.h"
#include "support/layer.h"
#include "support/random.h"

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

using moe_test::all_params;
using moe_test::get_grad;
using moe_test::get_param;
using moe_test::inputs;
using moe_test::LayerPtr;
using moe_test::make_context;
using moe_test::make_layer;
using moe_test::same;

moe_config base_config() { return moe_test::config(8, 16, 6, 2, 3); }

// ---- check_finite on ---------------------------------------------------------------------------

TEST(CheckFinite, FirstBadElementOfXIsNamedAndNothingChanges) {
  moe_config cfg = base_config();
  cfg.check_finite = 1;
  cfg.bias_update_rate = 0.01f;  // a training forward that got through would change router.bias
  const int64_t T = 10, d = cfg.d_model;
  const std::vector<float> x = inputs(T * d, 1);
  int tried = 0;
  for (float bad : {kNaN, kInf, -kInf}) {
    for (int64_t first : {int64_t{0}, int64_t{17}, T * d - 1}) {
      const LayerPtr layer = make_layer(cfg), fresh = make_layer(cfg);
      const moe_test::ContextPtr ctx = make_context(layer.get());
      ASSERT_NE(ctx, nullptr);
      std::vector<float> xb = x;
      xb[first] = bad;
      if (first + 5 < T * d) xb[first + 5] = kNaN;  // a later bad element is not the one named
      const std::string want = "x[" + std::to_string(first / d) + "][" + std::to_string(first % d) + "]";
      std::vector<float> y(T * d, 1.0f);
      const std::vector<float> y0 = y;
      for (int mode = 0; mode < 3; ++mode) {
        moe_status s = mode == 0   ? moe_forward(layer.get(), xb.data(), T, y.data(), nullptr)
                       : mode == 1 ? moe_forward(layer.get(), xb.data(), T, y.data(), ctx.get())
                                   : moe_route(layer.get(), xb.data(), T, ctx.get());
        ++tried;
        EXPECT_EQ(s, MOE_ERR_NONFINITE) << "mode " << mode;
        EXPECT_NE(std::string(moe_last_error()).find(want), std::string::npos)
            << "expected " << want << " in: " << moe_last_error();
        EXPECT_TRUE(same("y", y, y0)) << "y was written by a refused call";
      }
      // The refused calls changed nothing: one training step gives the bits of a fresh layer.
      const moe_test::ContextPtr ctx2 = make_context(fresh.get());
      ASSERT_NE(ctx2, nullptr);
      std::vector<float> ya(T * d), yb(T * d);
      ASSERT_EQ(moe_forward(layer.get(), x.data(), T, ya.data(), ctx.get()), MOE_OK) << moe_last_error();
      ASSERT_EQ(moe_forward(fresh.get(), x.data(), T, yb.data(), ctx2.get()), MOE_OK) << moe_last_error();
      EXPECT_TRUE(same("y", ya, yb));
      EXPECT_TRUE(same("router.bias", get_param(layer.get(), "router.bias"), get_param(fresh.get(), "router.bias")));
    }
  }
  EXPECT_EQ(tried, 27);
}

TEST(CheckFinite, FirstBadElementOfDyIsNamedAndGradientsAreUntouched) {
  moe_config cfg = base_config();
  cfg.check_finite = 1;
  const int64_t T = 10, d = cfg.d_model;
  const std::vector<float> x = inputs(T * d, 1), dy = inputs(T * d, 2);
  for (float bad : {kNaN, kInf, -kInf}) {
    for (int64_t first : {int64_t{0}, int64_t{42}, T * d - 1}) {
      const LayerPtr layer = make_layer(cfg);
      const moe_test::ContextPtr ctx = make_context(layer.get());
      ASSERT_NE(ctx, nullptr);
      std::vector<float> y(T * d), dx(T * d, 5.0f);
      ASSERT_EQ(moe_forward(layer.get(), x.data(), T, y.data(), ctx.get()), MOE_OK);
      std::vector<float> dyb = dy;
      dyb[first] = bad;
      if (first > 0) dyb[first - 1] = 0.0f;
      const std::string want = "dy[" + std::to_string(first / d) + "][" + std::to_string(first % d) + "]";
      EXPECT_EQ(moe_backward(layer.get(), ctx.get(), dyb.data(), dx.data()), MOE_ERR_NONFINITE);
      EXPECT_NE(std::string(moe_last_error()).find(want), std::string::npos) << moe_last_error();
      for (float v : dx) ASSERT_EQ(v, 5.0f) << "dx was written by a refused backward";
      for (const moe_test::Param &p : moe_test::params(layer.get())) {
        if (!p.trainable) continue;
        for (float g : get_grad(layer.get(), p)) ASSERT_EQ(g, 0.0f) << p.name << " changed";
      }
      // The context survives: the good dy now goes through.
      EXPECT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK) << moe_last_error();
      for (float v : dx) ASSERT_TRUE(std::isfinite(v));
    }
  }
}

// ---- check_finite off --------------------------------------------------------------------------

// Per-token experts from moe_context_topk, checked to be k distinct ids in [0, E) (or -1 if dropped).
std::vector<int32_t> topk_checked(moe_context *ctx, int64_t T, int64_t k, int64_t E) {
  const std::vector<int32_t> ids = moe_test::topk(ctx, T, k).ids;
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> seen;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ids[t * k + j];
      EXPECT_GE(e, -1);
      EXPECT_LT(e, E);
      if (e >= 0) {
        EXPECT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
      }
    }
  }
  return ids;
}

struct NonFiniteCase {
  const char *name;
  float bad;
  bool whole_row;
};
void PrintTo(const NonFiniteCase &c, std::ostream *os) { *os << c.name; }

class UncheckedNonFinite : public ::testing::TestWithParam<NonFiniteCase> {};

// Bad tokens in x: no crash, parameters unchanged, experts no bad token reached keep gradients
// equal (to float rounding) to those of the same batch with the bad tokens left out.
TEST_P(UncheckedNonFinite, BadTokensOnlyReachTheirExperts) {
  const NonFiniteCase &pc = GetParam();
  moe_config cfg = base_config();
  cfg.aux_loss_coef = 0.0f;  // keep the comparison to the expert FFNs
  const int64_t T = 12, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
  const std::vector<float> x = inputs(T * d, 5), dy = inputs(T * d, 6);
  const std::vector<int64_t> bad_tokens = {3, 8};
  std::vector<float> xb = x;
  for (int64_t t : bad_tokens)
    for (int64_t c = 0; c < d; ++c)
      if (pc.whole_row || c == 2) xb[t * d + c] = pc.bad;

  const LayerPtr layer = make_layer(cfg);
  const std::vector<std::vector<float>> before = all_params(layer.get());
  const moe_test::ContextPtr ctx = make_context(layer.get());
  ASSERT_NE(ctx, nullptr);
  std::vector<float> y(T * d), dx(T * d), yi(T * d);
  ASSERT_EQ(moe_forward(layer.get(), xb.data(), T, y.data(), ctx.get()), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_forward(layer.get(), xb.data(), T, yi.data(), nullptr), MOE_OK) << moe_last_error();
  const std::vector<int32_t> ids = topk_checked(ctx.get(), T, k, E);
  const std::vector<moe_test::Param> params = moe_test::params(layer.get());
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_TRUE(same(params[i].name, get_param(layer.get(), params[i]), before[i])) << "changed in forward/backward";
  // Good tokens' outputs are finite.
  for (int64_t t = 0; t < T; ++t) {
    if (t == bad_tokens[0] || t == bad_tokens[1]) continue;
    for (int64_t c = 0; c < d; ++c) EXPECT_TRUE(std::isfinite(y[t * d + c])) << "token " << t;
  }

  // The same batch without the bad tokens, on a fresh layer.
  std::vector<float> xg, dyg;
  for (int64_t t = 0; t < T; ++t) {
    if (t == bad_tokens[0] || t == bad_tokens[1]) continue;
    xg.insert(xg.end(), x.begin() + t * d, x.begin() + (t + 1) * d);
    dyg.insert(dyg.end(), dy.begin() + t * d, dy.begin() + (t + 1) * d);
  }
  const int64_t Tg = T - 2;
  const LayerPtr good = make_layer(cfg);
  const moe_test::ContextPtr gctx = make_context(good.get());
  ASSERT_NE(gctx, nullptr);
  std::vector<float> yg(Tg * d), dxg(Tg * d);
  ASSERT_EQ(moe_forward(good.get(), xg.data(), Tg, yg.data(), gctx.get()), MOE_OK);
  ASSERT_EQ(moe_backward(good.get(), gctx.get(), dyg.data(), dxg.data()), MOE_OK);

  std::set<int32_t> touched;
  for (int64_t t : bad_tokens)
    for (int64_t j = 0; j < k; ++j) touched.insert(ids[t * k + j]);
  ASSERT_LT(touched.size(), static_cast<size_t>(E)) << "the test needs an expert no bad token reached";
  for (const char *name : {"experts.w1", "experts.w3", "experts.w2"}) {
    const std::vector<float> g = get_grad(layer.get(), name), gg = get_grad(good.get(), name);
    const int64_t per = static_cast<int64_t>(g.size()) / E;
    for (int64_t e = 0; e < E; ++e) {
      if (touched.count(static_cast<int32_t>(e))) continue;
      for (int64_t i = 0; i < per; ++i) {
        const float a = g[e * per + i], b = gg[e * per + i];
        ASSERT_TRUE(std::isfinite(a)) << name << " of untouched expert " << e << " is not finite";
        ASSERT_NEAR(a, b, 1e-5f * (1.0f + std::fabs(b))) << name << " of untouched expert " << e;
      }
    }
  }
  // Good tokens' input gradients only pass through experts and the router; with NaN router
  // gradients excluded (aux losses off) they match the clean batch.
}

INSTANTIATE_TEST_SUITE_P(Reliability, UncheckedNonFinite,
                         ::testing::Values(NonFiniteCase{"NaNRow", kNaN, true}, NonFiniteCase{"NaNElement", kNaN, false},
                                           NonFiniteCase{"PosInfElement", kInf, false},
                                           NonFiniteCase{"NegInfRow", -kInf, true}),
                         [](const ::testing::TestParamInfo<NonFiniteCase> &i) { return std::string(i.param.name); });

// NaN in dy only reaches the experts of that token.
TEST(UncheckedNonFiniteDy, OnlyTheTokensExpertsGetNaN) {
  moe_config cfg = base_config();
  const int64_t T = 12, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
  const std::vector<float> x = inputs(T * d, 7);
  std::vector<float> dy = inputs(T * d, 8);
  dy[5 * d + 1] = kNaN;
  const LayerPtr layer = make_layer(cfg);
  const moe_test::ContextPtr ctx = make_context(layer.get());
  ASSERT_NE(ctx, nullptr);
  std::vector<float> y(T * d), dx(T * d);
  ASSERT_EQ(moe_forward(layer.get(), x.data(), T, y.data(), ctx.get()), MOE_OK);
  ASSERT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK);
  const std::vector<int32_t> ids = topk_checked(ctx.get(), T, k, E);
  std::set<int32_t> touched(ids.begin() + 5 * k, ids.begin() + 6 * k);
  for (const char *name : {"experts.w1", "experts.w3", "experts.w2"}) {
    const std::vector<float> g = get_grad(layer.get(), name);
    const int64_t per = static_cast<int64_t>(g.size()) / E;
    for (int64_t e = 0; e < E; ++e) {
      if (touched.count(static_cast<int32_t>(e))) continue;
      for (int64_t i = 0; i < per; ++i) ASSERT_TRUE(std::isfinite(g[e * per + i])) << name << " expert " << e;
    }
  }
}

// Router weights that make logits NaN or +-Inf, for every routing recipe: no crash, k distinct
// experts per token (or the expert-choice capacity), parameters unchanged by forward/backward.
TEST(NonFiniteRouterLogits, EveryRecipeStillRoutesEveryToken) {
  const char *presets[] = {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe"};
  int ran = 0;
  for (const char *preset : presets) {
    for (float bad : {kNaN, kInf, -kInf}) {
      for (int rows : {1, -1}) {  // one expert's row, or every row
        moe_config cfg = moe_test::preset(preset, 8, 8);
        cfg.d_ff_shared = 0;
        moe_test::at_most_16_experts(cfg);
        const int64_t T = 9, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
        const LayerPtr layer = make_layer(cfg);
        ASSERT_NE(layer.get(), nullptr) << preset;
        std::vector<float> w = get_param(layer.get(), "router.weight");
        for (int64_t e = 0; e < E; ++e)
          if (rows < 0 || e == 1)
            for (int64_t c = 0; c < d; ++c) w[e * d + c] = bad;
        ASSERT_EQ(moe_layer_set_param(layer.get(), "router.weight", w.data(), E * d), MOE_OK);
        const std::vector<moe_test::Param> params = moe_test::params(layer.get());
        const std::vector<std::vector<float>> before = all_params(layer.get());
        const moe_test::ContextPtr ctx = make_context(layer.get());
        ASSERT_NE(ctx, nullptr);
        const std::vector<float> x = inputs(T * d, 9), dy = inputs(T * d, 10);
        std::vector<float> y(T * d), dx(T * d);
        ASSERT_EQ(moe_forward(layer.get(), x.data(), T, y.data(), ctx.get()), MOE_OK)
            << preset << ": " << moe_last_error();
        ASSERT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK)
            << preset << ": " << moe_last_error();
        if (cfg.routing == MOE_ROUTE_TOKEN_CHOICE) {
          topk_checked(ctx.get(), T, k, E);
        } else {
          const moe_test::Assignments as = moe_test::assignments(ctx.get());
          for (size_t i = 0; i < as.tokens.size(); ++i) {
            ASSERT_GE(as.tokens[i], 0);
            ASSERT_LT(as.tokens[i], T);
            ASSERT_GE(as.experts[i], 0);
            ASSERT_LT(as.experts[i], E);
          }
        }
        const moe_stats st = moe_test::stats(ctx.get());
        EXPECT_LE(st.dropped_slots, st.num_slots);
        EXPECT_GE(st.dropped_slots, 0);
        for (size_t i = 0; i < params.size(); ++i) {
          if (params[i].name == "router.bias") continue;  // bias_update_rate moves it by design (from finite counts)
          EXPECT_TRUE(same(params[i].name, get_param(layer.get(), params[i]), before[i])) << preset << ": changed";
        }
        for (float b : get_param(layer.get(), "router.bias")) EXPECT_TRUE(std::isfinite(b)) << preset;
        ++ran;
      }
    }
  }
  EXPECT_EQ(ran, 36);
}

// capacity_factor as small as a float gets: C = ceil(cf * T * k / E) = 1 for T > 0.
TEST(TinyCapacity, OneSlotPerExpert) {
  moe_config cfg = base_config();
  cfg.capacity_factor = FLT_TRUE_MIN;
  for (int policy : {MOE_DROP_POSITION, MOE_DROP_PROBS}) {
    cfg.drop_policy = static_cast<moe_drop_policy>(policy);
    const LayerPtr layer = make_layer(cfg);
    const moe_test::ContextPtr ctx = make_context(layer.get());
    ASSERT_NE(ctx, nullptr);
    const int64_t T = 20, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
    const std::vector<float> x = inputs(T * d, 11), dy = inputs(T * d, 12);
    std::vector<float> y(T * d), dx(T * d);
    ASSERT_EQ(moe_forward(layer.get(), x.data(), T, y.data(), ctx.get()), MOE_OK);
    ASSERT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK);
    const std::vector<int64_t> counts = moe_test::expert_counts(ctx.get(), E);
    int64_t kept = 0;
    for (int64_t c : counts) {
      EXPECT_LE(c, 1);
      kept += c;
    }
    const moe_stats st = moe_test::stats(ctx.get());
    EXPECT_EQ(st.num_slots, T * k);
    EXPECT_EQ(st.dropped_slots, T * k - kept);
    topk_checked(ctx.get(), T, k, E);
    // T = 0 with the same capacity factor: C = 0, nothing to route.
    ASSERT_EQ(moe_forward(layer.get(), x.data(), 0, y.data(), ctx.get()), MOE_OK);
    ASSERT_EQ(moe_backward(layer.get(), ctx.get(), dy.data(), dx.data()), MOE_OK);
  }
}

}  // namespace
