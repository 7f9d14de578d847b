// Determinism (shared/DESIGN.md section 2, moe.h moe_forward): the same inputs, parameters, seed,
// step and thread count give the same bits. Two independent layers built from the same config run
// the same steps; y, dx, every gradient, the statistics and the routing must match bit for bit.
// ctest runs this with OMP_NUM_THREADS=4 so that the parallel reductions are exercised.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "support/compare.h"
#include "support/layer.h"
#include "support/random.h"

namespace {

using moe_test::inputs;

// Everything one run produces, as raw bytes per named item.
struct Run {
  std::vector<std::pair<std::string, std::vector<unsigned char>>> items;
  template <class T>
  void add(const std::string &name, const std::vector<T> &v) {
    const unsigned char *p = reinterpret_cast<const unsigned char *>(v.data());
    items.emplace_back(name, std::vector<unsigned char>(p, p + v.size() * sizeof(T)));
  }
};

// Creates a layer from cfg and runs `steps` training steps (forward + backward) on fixed inputs,
// then an inference forward and a route. Returns false (skipping) if the config is unsupported.
bool run_layer(const moe_config &cfg, int64_t T, int steps, Run &out) {
  moe_status s;
  const moe_test::LayerPtr owner = moe_test::make_layer(cfg, &s);
  if (s == MOE_ERR_UNSUPPORTED) return false;
  EXPECT_EQ(s, MOE_OK) << moe_last_error();
  if (s != MOE_OK) return false;
  moe_layer *layer = owner.get();
  const int64_t d = cfg.d_model, k = cfg.top_k, E = cfg.num_experts;
  const std::vector<moe_test::Param> params = moe_test::params(layer);
  for (const moe_test::Param &p : params) out.add("initial " + p.name, moe_test::get_param(layer, p));
  const moe_test::ContextPtr owned_ctx = moe_test::make_context(layer);
  moe_context *ctx = owned_ctx.get();
  for (int step = 0; step < steps; ++step) {
    const std::string tag = "step " + std::to_string(step) + " ";
    std::vector<float> x = inputs(T * d, 100 + step), dy = inputs(T * d, 200 + step);
    std::vector<float> y(T * d, NAN), dx(T * d, NAN);
    EXPECT_EQ(moe_forward(layer, x.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
    EXPECT_EQ(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
    EXPECT_TRUE(moe_test::all_finite(tag + "y", y));
    EXPECT_TRUE(moe_test::all_finite(tag + "dx", dx));
    out.add(tag + "y", y);
    out.add(tag + "dx", dx);
    out.add(tag + "stats", moe_test::stats_fields(moe_test::stats(ctx)));
    out.add(tag + "expert counts", moe_test::expert_counts(ctx, E));
    if (cfg.routing == MOE_ROUTE_TOKEN_CHOICE) {
      const moe_test::TopK topk = moe_test::topk(ctx, T, k);
      out.add(tag + "topk ids", topk.ids);
      out.add(tag + "topk weights", topk.weights);
    }
    // Gradients accumulate over the steps; every parameter (including router.bias, which the
    // aux-loss-free balancing updates) is recorded after each step.
    for (const moe_test::Param &p : params) {
      out.add(tag + "param " + p.name, moe_test::get_param(layer, p));
      if (p.trainable) out.add(tag + "grad " + p.name, moe_test::get_grad(layer, p));
    }
  }
  // Inference forward and route, after the training steps.
  std::vector<float> x = inputs(T * d, 300), y(T * d, NAN);
  EXPECT_EQ(moe_forward(layer, x.data(), T, y.data(), nullptr), MOE_OK);
  out.add("inference y", y);
  EXPECT_EQ(moe_route(layer, x.data(), T, ctx), MOE_OK);
  const moe_test::Assignments route = moe_test::assignments(ctx);
  out.add("route tokens", route.tokens);
  out.add("route experts", route.experts);
  out.add("route weights", route.weights);
  return true;
}

void expect_identical_runs(const moe_config &cfg, int64_t T, int steps) {
  Run a, b;
  if (!run_layer(cfg, T, steps, a)) GTEST_SKIP() << "configuration not supported by this build: " << moe_last_error();
  ASSERT_TRUE(run_layer(cfg, T, steps, b));
  ASSERT_EQ(a.items.size(), b.items.size());
  int differing = 0;
  for (size_t i = 0; i < a.items.size(); ++i) {
    ASSERT_EQ(a.items[i].first, b.items[i].first);
    if (a.items[i].second != b.items[i].second) {
      ++differing;
      ADD_FAILURE() << a.items[i].first << " differs between two identical runs";
    }
  }
  EXPECT_EQ(differing, 0);
  // Sanity: the runs did produce something, and different seeds give different results.
  EXPECT_GT(a.items.size(), 10u);
  moe_config other = cfg;
  other.seed = cfg.seed + 1;
  Run c;
  ASSERT_TRUE(run_layer(other, T, 1, c));
  EXPECT_NE(a.items[0].second, c.items[0].second) << "the seed does not change the initial parameters";
}

moe_config base(int64_t d, int64_t ff) { return moe_test::config(d, ff, 8, 2, 1234); }

TEST(Determinism, DefaultSwiGLU) {
  moe_config c = base(32, 48);
  expect_identical_runs(c, 600, 2);  // > 256 tokens: several reduction blocks
}

TEST(Determinism, ReluTop1WithCapacityAndZLoss) {
  moe_config c = base(24, 40);
  c.num_experts = 6;
  c.top_k = 1;
  c.activation = MOE_ACT_RELU;
  c.capacity_factor = 1.0f;
  c.z_loss_coef = 0.001f;
  c.normalize_topk = 0;
  expect_identical_runs(c, 513, 3);
}

TEST(Determinism, SigmoidGroupsSharedGateBiasUpdate) {
  moe_config c = base(16, 32);
  c.num_experts = 16;
  c.top_k = 4;
  c.activation = MOE_ACT_GEGLU;
  c.score = MOE_SCORE_SIGMOID;
  c.num_groups = 4;
  c.topk_groups = 2;
  c.routed_scale = 2.5f;
  c.num_shared_experts = 2;
  c.d_ff_shared = 24;
  c.shared_gate = 1;
  c.bias_update_rate = 0.01f;
  c.capacity_factor = 1.25f;
  c.drop_policy = MOE_DROP_PROBS;
  c.importance_loss_coef = 0.01f;
  c.z_loss_coef = 0.001f;
  expect_identical_runs(c, 700, 3);
}

TEST(Determinism, DenseSiluAndGelu) {
  for (moe_activation act : {MOE_ACT_SILU, MOE_ACT_GELU}) {
    moe_config c = base(16, 16);
    c.num_experts = 4;
    c.top_k = 4;
    c.activation = act;
    expect_identical_runs(c, 300, 2);
  }
}

// Router noise is keyed by (seed, step, token, expert): two layers at the same step draw the same.
TEST(Determinism, GaussianNoise) {
  moe_config c = base(16, 32);
  c.noise = MOE_NOISE_GAUSSIAN;
  c.importance_loss_coef = 0.01f;
  c.load_loss_coef = 0.01f;
  expect_identical_runs(c, 400, 3);
}

TEST(Determinism, JitterNoise) {
  moe_config c = base(16, 32);
  c.noise = MOE_NOISE_JITTER;
  c.noise_eps = 0.05f;
  expect_identical_runs(c, 400, 3);
}

TEST(Determinism, ExpertChoice) {
  moe_config c = base(16, 32);
  c.routing = MOE_ROUTE_EXPERT_CHOICE;
  c.capacity_factor = 1.0f;
  expect_identical_runs(c, 400, 2);
}

}  // namespace
