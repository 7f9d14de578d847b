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

namespace {

std::vector<float> inputs(size_t n, unsigned seed) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (float &x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>((s >> 8) & 0xffff) / 16384.0f - 2.0f;
  }
  return v;
}

// Everything one run produces, as raw bytes per named item.
struct Run {
  std::vector<std::pair<std::string, std::vector<unsigned char>>> items;
  template <class T>
  void add(const std::string &name, const std::vector<T> &v) {
    const unsigned char *p = reinterpret_cast<const unsigned char *>(v.data());
    items.emplace_back(name, std::vector<unsigned char>(p, p + v.size() * sizeof(T)));
  }
};

std::vector<std::pair<std::string, int64_t>> param_list(const moe_layer *l) {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < moe_layer_num_params(l); ++i) {
    moe_param_info info{};
    EXPECT_EQ(moe_layer_param_info(l, i, &info), MOE_OK);
    int64_t n = 1;
    for (int j = 0; j < info.ndim; ++j) n *= info.shape[j];
    out.emplace_back(info.name, info.trainable ? n : -n);
  }
  return out;
}

// Creates a layer from cfg and runs `steps` training steps (forward + backward) on fixed inputs,
// then an inference forward and a route. Returns false (skipping) if the config is unsupported.
bool run_layer(const moe_config &cfg, int64_t T, int steps, Run &out) {
  moe_layer *layer = nullptr;
  const moe_status s = moe_layer_create(&cfg, &layer);
  if (s == MOE_ERR_UNSUPPORTED) return false;
  EXPECT_EQ(s, MOE_OK) << moe_last_error();
  if (s != MOE_OK) return false;
  const int64_t d = cfg.d_model, k = cfg.top_k, E = cfg.num_experts;
  const auto params = param_list(layer);
  for (const auto &p : params) {
    std::vector<float> v(std::llabs(p.second));
    EXPECT_EQ(moe_layer_get_param(layer, p.first.c_str(), v.data(), v.size()), MOE_OK);
    out.add("initial " + p.first, v);
  }
  moe_context *ctx = nullptr;
  EXPECT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  for (int step = 0; step < steps; ++step) {
    const std::string tag = "step " + std::to_string(step) + " ";
    std::vector<float> x = inputs(T * d, 100 + step), dy = inputs(T * d, 200 + step);
    std::vector<float> y(T * d, NAN), dx(T * d, NAN);
    EXPECT_EQ(moe_forward(layer, x.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
    EXPECT_EQ(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
    for (float v : y) EXPECT_TRUE(std::isfinite(v));
    for (float v : dx) EXPECT_TRUE(std::isfinite(v));
    out.add(tag + "y", y);
    out.add(tag + "dx", dx);
    moe_stats st;
    std::memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    EXPECT_EQ(moe_context_stats(ctx, &st), MOE_OK);
    // Field by field (the struct has padding bytes).
    std::vector<int64_t> sizes = {st.num_tokens, st.num_slots, st.dropped_slots};
    std::vector<float> losses = {st.load_balance_loss, st.z_loss,  st.importance_loss, st.load_loss,
                                 st.aux_loss_total,    st.load_cv, st.max_load_ratio};
    out.add(tag + "stats sizes", sizes);
    out.add(tag + "stats losses", losses);
    std::vector<int64_t> counts(E);
    EXPECT_EQ(moe_context_expert_counts(ctx, counts.data()), MOE_OK);
    out.add(tag + "expert counts", counts);
    if (cfg.routing == MOE_ROUTE_TOKEN_CHOICE) {
      std::vector<int32_t> ids(T * k);
      std::vector<float> w(T * k);
      EXPECT_EQ(moe_context_topk(ctx, ids.data(), w.data()), MOE_OK);
      out.add(tag + "topk ids", ids);
      out.add(tag + "topk weights", w);
    }
    // Gradients accumulate over the steps; every parameter (including router.bias, which the
    // aux-loss-free balancing updates) is recorded after each step.
    for (const auto &p : params) {
      std::vector<float> v(std::llabs(p.second));
      EXPECT_EQ(moe_layer_get_param(layer, p.first.c_str(), v.data(), v.size()), MOE_OK);
      out.add(tag + "param " + p.first, v);
      if (p.second > 0) {
        EXPECT_EQ(moe_layer_get_grad(layer, p.first.c_str(), v.data(), v.size()), MOE_OK);
        out.add(tag + "grad " + p.first, v);
      }
    }
  }
  // Inference forward and route, after the training steps.
  std::vector<float> x = inputs(T * d, 300), y(T * d, NAN);
  EXPECT_EQ(moe_forward(layer, x.data(), T, y.data(), nullptr), MOE_OK);
  out.add("inference y", y);
  EXPECT_EQ(moe_route(layer, x.data(), T, ctx), MOE_OK);
  int64_t count = 0;
  EXPECT_EQ(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count), MOE_OK);
  std::vector<int32_t> tok(count), ex(count);
  std::vector<float> w(count);
  EXPECT_EQ(moe_context_assignments(ctx, count, tok.data(), ex.data(), w.data(), &count), MOE_OK);
  out.add("route tokens", tok);
  out.add("route experts", ex);
  out.add("route weights", w);
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
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

moe_config base(int64_t d, int64_t ff) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = d;
  c.d_ff = ff;
  c.seed = 1234;
  return c;
}

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
