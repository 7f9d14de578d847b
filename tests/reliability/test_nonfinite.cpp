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

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> inputs(size_t n, unsigned seed) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (float &x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>((s >> 8) & 0xffff) / 16384.0f - 2.0f;
  }
  return v;
}

moe_config base_config() {
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.d_model = 8;
  cfg.d_ff = 16;
  cfg.num_experts = 6;
  cfg.top_k = 2;
  cfg.seed = 3;
  return cfg;
}

struct Layer {
  moe_layer *l = nullptr;
  explicit Layer(const moe_config &cfg) { EXPECT_EQ(moe_layer_create(&cfg, &l), MOE_OK) << moe_last_error(); }
  ~Layer() { moe_layer_destroy(l); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (int i = 0; i < moe_layer_num_params(l); ++i) {
      moe_param_info info{};
      EXPECT_EQ(moe_layer_param_info(l, i, &info), MOE_OK);
      out.emplace_back(info.name);
    }
    return out;
  }
  int64_t numel(const std::string &name) const {
    for (int i = 0; i < moe_layer_num_params(l); ++i) {
      moe_param_info info{};
      EXPECT_EQ(moe_layer_param_info(l, i, &info), MOE_OK);
      if (name != info.name) continue;
      int64_t n = 1;
      for (int j = 0; j < info.ndim; ++j) n *= info.shape[j];
      return n;
    }
    return 0;
  }
  std::vector<float> param(const std::string &name) const {
    std::vector<float> v(numel(name));
    EXPECT_EQ(moe_layer_get_param(l, name.c_str(), v.data(), v.size()), MOE_OK);
    return v;
  }
  std::vector<float> grad(const std::string &name) const {
    std::vector<float> v(numel(name));
    EXPECT_EQ(moe_layer_get_grad(l, name.c_str(), v.data(), v.size()), MOE_OK);
    return v;
  }
};

bool bits_equal(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

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
      Layer layer(cfg), fresh(cfg);
      moe_context *ctx = nullptr;
      ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
      std::vector<float> xb = x;
      xb[first] = bad;
      if (first + 5 < T * d) xb[first + 5] = kNaN;  // a later bad element is not the one named
      const std::string want = "x[" + std::to_string(first / d) + "][" + std::to_string(first % d) + "]";
      std::vector<float> y(T * d, 1.0f);
      const std::vector<float> y0 = y;
      for (int mode = 0; mode < 3; ++mode) {
        moe_status s = mode == 0   ? moe_forward(layer.l, xb.data(), T, y.data(), nullptr)
                       : mode == 1 ? moe_forward(layer.l, xb.data(), T, y.data(), ctx)
                                   : moe_route(layer.l, xb.data(), T, ctx);
        ++tried;
        EXPECT_EQ(s, MOE_ERR_NONFINITE) << "mode " << mode;
        EXPECT_NE(std::string(moe_last_error()).find(want), std::string::npos)
            << "expected " << want << " in: " << moe_last_error();
        EXPECT_TRUE(bits_equal(y, y0)) << "y was written by a refused call";
      }
      // The refused calls changed nothing: one training step gives the bits of a fresh layer.
      moe_context *ctx2 = nullptr;
      ASSERT_EQ(moe_context_create(fresh.l, &ctx2), MOE_OK);
      std::vector<float> ya(T * d), yb(T * d);
      ASSERT_EQ(moe_forward(layer.l, x.data(), T, ya.data(), ctx), MOE_OK) << moe_last_error();
      ASSERT_EQ(moe_forward(fresh.l, x.data(), T, yb.data(), ctx2), MOE_OK) << moe_last_error();
      EXPECT_TRUE(bits_equal(ya, yb));
      EXPECT_TRUE(bits_equal(layer.param("router.bias"), fresh.param("router.bias")));
      moe_context_destroy(ctx);
      moe_context_destroy(ctx2);
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
      Layer layer(cfg);
      moe_context *ctx = nullptr;
      ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
      std::vector<float> y(T * d), dx(T * d, 5.0f);
      ASSERT_EQ(moe_forward(layer.l, x.data(), T, y.data(), ctx), MOE_OK);
      std::vector<float> dyb = dy;
      dyb[first] = bad;
      if (first > 0) dyb[first - 1] = 0.0f;
      const std::string want = "dy[" + std::to_string(first / d) + "][" + std::to_string(first % d) + "]";
      EXPECT_EQ(moe_backward(layer.l, ctx, dyb.data(), dx.data()), MOE_ERR_NONFINITE);
      EXPECT_NE(std::string(moe_last_error()).find(want), std::string::npos) << moe_last_error();
      for (float v : dx) ASSERT_EQ(v, 5.0f) << "dx was written by a refused backward";
      for (const std::string &n : layer.names()) {
        if (n == "router.bias") continue;
        for (float g : layer.grad(n)) ASSERT_EQ(g, 0.0f) << n << " changed";
      }
      // The context survives: the good dy now goes through.
      EXPECT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
      for (float v : dx) ASSERT_TRUE(std::isfinite(v));
      moe_context_destroy(ctx);
    }
  }
}

// ---- check_finite off --------------------------------------------------------------------------

// Per-token experts from moe_context_topk, checked to be k distinct ids in [0, E) (or -1 if dropped).
std::vector<int32_t> topk_checked(moe_context *ctx, int64_t T, int64_t k, int64_t E) {
  std::vector<int32_t> ids(T * k, -7);
  std::vector<float> w(T * k);
  EXPECT_EQ(moe_context_topk(ctx, ids.data(), w.data()), MOE_OK) << moe_last_error();
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

  Layer layer(cfg);
  std::vector<std::vector<float>> before;
  for (const std::string &n : layer.names()) before.push_back(layer.param(n));
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
  std::vector<float> y(T * d), dx(T * d), yi(T * d);
  ASSERT_EQ(moe_forward(layer.l, xb.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_forward(layer.l, xb.data(), T, yi.data(), nullptr), MOE_OK) << moe_last_error();
  const std::vector<int32_t> ids = topk_checked(ctx, T, k, E);
  const std::vector<std::string> names = layer.names();
  for (size_t i = 0; i < names.size(); ++i)
    EXPECT_TRUE(bits_equal(layer.param(names[i]), before[i])) << names[i] << " changed in forward/backward";
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
  Layer good(cfg);
  moe_context *gctx = nullptr;
  ASSERT_EQ(moe_context_create(good.l, &gctx), MOE_OK);
  std::vector<float> yg(Tg * d), dxg(Tg * d);
  ASSERT_EQ(moe_forward(good.l, xg.data(), Tg, yg.data(), gctx), MOE_OK);
  ASSERT_EQ(moe_backward(good.l, gctx, dyg.data(), dxg.data()), MOE_OK);

  std::set<int32_t> touched;
  for (int64_t t : bad_tokens)
    for (int64_t j = 0; j < k; ++j) touched.insert(ids[t * k + j]);
  ASSERT_LT(touched.size(), static_cast<size_t>(E)) << "the test needs an expert no bad token reached";
  for (const char *name : {"experts.w1", "experts.w3", "experts.w2"}) {
    const std::vector<float> g = layer.grad(name), gg = good.grad(name);
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
  moe_context_destroy(ctx);
  moe_context_destroy(gctx);
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
  Layer layer(cfg);
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
  std::vector<float> y(T * d), dx(T * d);
  ASSERT_EQ(moe_forward(layer.l, x.data(), T, y.data(), ctx), MOE_OK);
  ASSERT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK);
  const std::vector<int32_t> ids = topk_checked(ctx, T, k, E);
  std::set<int32_t> touched(ids.begin() + 5 * k, ids.begin() + 6 * k);
  for (const char *name : {"experts.w1", "experts.w3", "experts.w2"}) {
    const std::vector<float> g = layer.grad(name);
    const int64_t per = static_cast<int64_t>(g.size()) / E;
    for (int64_t e = 0; e < E; ++e) {
      if (touched.count(static_cast<int32_t>(e))) continue;
      for (int64_t i = 0; i < per; ++i) ASSERT_TRUE(std::isfinite(g[e * per + i])) << name << " expert " << e;
    }
  }
  moe_context_destroy(ctx);
}

// Router weights that make logits NaN or +-Inf, for every routing recipe: no crash, k distinct
// experts per token (or the expert-choice capacity), parameters unchanged by forward/backward.
TEST(NonFiniteRouterLogits, EveryRecipeStillRoutesEveryToken) {
  const char *presets[] = {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe"};
  int ran = 0;
  for (const char *preset : presets) {
    for (float bad : {kNaN, kInf, -kInf}) {
      for (int rows : {1, -1}) {  // one expert's row, or every row
        moe_config cfg;
        moe_config_init(&cfg);
        ASSERT_EQ(moe_config_preset(&cfg, preset), MOE_OK);
        cfg.d_model = 8;
        cfg.d_ff = 8;
        cfg.d_ff_shared = 0;
        if (cfg.num_experts > 16) {
          cfg.num_experts = 16;
          if (cfg.num_groups > 1) cfg.num_groups = 4, cfg.topk_groups = 2;
          if (cfg.top_k > 4) cfg.top_k = 4;
        }
        const int64_t T = 9, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
        Layer layer(cfg);
        ASSERT_NE(layer.l, nullptr) << preset;
        std::vector<float> w = layer.param("router.weight");
        for (int64_t e = 0; e < E; ++e)
          if (rows < 0 || e == 1)
            for (int64_t c = 0; c < d; ++c) w[e * d + c] = bad;
        ASSERT_EQ(moe_layer_set_param(layer.l, "router.weight", w.data(), E * d), MOE_OK);
        std::vector<std::vector<float>> before;
        const std::vector<std::string> names = layer.names();
        for (const std::string &n : names) before.push_back(layer.param(n));
        moe_context *ctx = nullptr;
        ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
        const std::vector<float> x = inputs(T * d, 9), dy = inputs(T * d, 10);
        std::vector<float> y(T * d), dx(T * d);
        ASSERT_EQ(moe_forward(layer.l, x.data(), T, y.data(), ctx), MOE_OK) << preset << ": " << moe_last_error();
        ASSERT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK) << preset << ": " << moe_last_error();
        if (cfg.routing == MOE_ROUTE_TOKEN_CHOICE) {
          topk_checked(ctx, T, k, E);
        } else {
          int64_t count = -1;
          ASSERT_EQ(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count), MOE_OK);
          std::vector<int32_t> tok(count), ex(count);
          std::vector<float> wt(count);
          ASSERT_EQ(moe_context_assignments(ctx, count, tok.data(), ex.data(), wt.data(), &count), MOE_OK);
          for (int64_t i = 0; i < count; ++i) {
            ASSERT_GE(tok[i], 0);
            ASSERT_LT(tok[i], T);
            ASSERT_GE(ex[i], 0);
            ASSERT_LT(ex[i], E);
          }
        }
        moe_stats st;
        std::memset(&st, 0, sizeof st);
        st.struct_size = sizeof st;
        ASSERT_EQ(moe_context_stats(ctx, &st), MOE_OK);
        EXPECT_LE(st.dropped_slots, st.num_slots);
        EXPECT_GE(st.dropped_slots, 0);
        for (size_t i = 0; i < names.size(); ++i) {
          if (names[i] == "router.bias") continue;  // bias_update_rate moves it by design (from finite counts)
          EXPECT_TRUE(bits_equal(layer.param(names[i]), before[i])) << preset << ": " << names[i] << " changed";
        }
        for (float b : layer.param("router.bias")) EXPECT_TRUE(std::isfinite(b)) << preset;
        moe_context_destroy(ctx);
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
    Layer layer(cfg);
    moe_context *ctx = nullptr;
    ASSERT_EQ(moe_context_create(layer.l, &ctx), MOE_OK);
    const int64_t T = 20, d = cfg.d_model, E = cfg.num_experts, k = cfg.top_k;
    const std::vector<float> x = inputs(T * d, 11), dy = inputs(T * d, 12);
    std::vector<float> y(T * d), dx(T * d);
    ASSERT_EQ(moe_forward(layer.l, x.data(), T, y.data(), ctx), MOE_OK);
    ASSERT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK);
    std::vector<int64_t> counts(E);
    ASSERT_EQ(moe_context_expert_counts(ctx, counts.data()), MOE_OK);
    int64_t kept = 0;
    for (int64_t c : counts) {
      EXPECT_LE(c, 1);
      kept += c;
    }
    moe_stats st;
    std::memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    ASSERT_EQ(moe_context_stats(ctx, &st), MOE_OK);
    EXPECT_EQ(st.num_slots, T * k);
    EXPECT_EQ(st.dropped_slots, T * k - kept);
    topk_checked(ctx, T, k, E);
    // T = 0 with the same capacity factor: C = 0, nothing to route.
    ASSERT_EQ(moe_forward(layer.l, x.data(), 0, y.data(), ctx), MOE_OK);
    ASSERT_EQ(moe_backward(layer.l, ctx, dy.data(), dx.data()), MOE_OK);
    moe_context_destroy(ctx);
  }
}

}  // namespace
