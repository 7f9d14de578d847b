// Call-order rules of the C API: a backward refuses parameters that moe_layer_set_param changed
// after its forward (its saved activations belong to the old values), while zero_grad and the
// selection bias stay free to change; the failed backward changes nothing.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

struct Layer {
  moe_layer *l = nullptr;
  moe_context *ctx = nullptr;
  int64_t d = 12, ff = 20, E = 4;
  explicit Layer(int64_t shared = 0) {
    moe_config c;
    moe_config_init(&c);
    c.d_model = d;
    c.d_ff = ff;
    c.num_experts = E;
    c.top_k = 2;
    c.num_shared_experts = shared;
    c.seed = 11;
    EXPECT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
    EXPECT_EQ(moe_context_create(l, &ctx), MOE_OK) << moe_last_error();
  }
  ~Layer() {
    moe_context_destroy(ctx);
    moe_layer_destroy(l);
  }
  std::vector<float> param(const char *name, bool grad = false) const {
    moe_param_info info{};
    for (int i = 0; i < moe_layer_num_params(l); ++i) {
      moe_layer_param_info(l, i, &info);
      if (std::string(info.name) == name) break;
    }
    int64_t n = 1;
    for (int i = 0; i < info.ndim; ++i) n *= info.shape[i];
    std::vector<float> v(static_cast<size_t>(n));
    EXPECT_EQ(grad ? moe_layer_get_grad(l, name, v.data(), n) : moe_layer_get_param(l, name, v.data(), n), MOE_OK)
        << moe_last_error();
    return v;
  }
};

std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float &x : v) x = dist(gen);
  return v;
}

TEST(StateRules, SetParamAfterForwardRefusesBackward) {
  Layer L;
  const int64_t T = 9;
  const auto x = randn(static_cast<size_t>(T * L.d), 1), dy = randn(static_cast<size_t>(T * L.d), 2);
  std::vector<float> y(x.size()), dx(x.size(), 7.0f);
  ASSERT_EQ(moe_forward(L.l, x.data(), T, y.data(), L.ctx), MOE_OK) << moe_last_error();
  const auto w2 = L.param("experts.w2");
  auto changed = w2;
  for (float &v : changed) v *= 0.5f;
  ASSERT_EQ(moe_layer_set_param(L.l, "experts.w2", changed.data(), static_cast<int64_t>(changed.size())), MOE_OK);
  const auto grad_before = L.param("experts.w1", true);

  EXPECT_EQ(moe_backward(L.l, L.ctx, dy.data(), dx.data()), MOE_ERR_STATE);
  const std::string msg = moe_last_error();
  EXPECT_NE(msg.find("moe_backward"), std::string::npos) << msg;
  EXPECT_NE(msg.find("moe_layer_set_param"), std::string::npos) << msg;
  EXPECT_NE(msg.find("experts.w2"), std::string::npos) << msg;
  // Nothing changed: dx untouched, gradients as before.
  for (float v : dx) ASSERT_EQ(v, 7.0f);
  EXPECT_EQ(L.param("experts.w1", true), grad_before);

  // A new forward on the new parameters makes the backward valid again.
  ASSERT_EQ(moe_forward(L.l, x.data(), T, y.data(), L.ctx), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_backward(L.l, L.ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
}

TEST(StateRules, EveryTrainableParameterIsTracked) {
  Layer L(/*shared=*/1);
  const int64_t T = 5;
  const auto x = randn(static_cast<size_t>(T * L.d), 3), dy = randn(static_cast<size_t>(T * L.d), 4);
  std::vector<float> y(x.size());
  for (const char *name : {"router.weight", "experts.w1", "experts.w3", "experts.w2", "shared.w1", "shared.w2"}) {
    ASSERT_EQ(moe_forward(L.l, x.data(), T, y.data(), L.ctx), MOE_OK) << moe_last_error();
    const auto v = L.param(name);
    // Writing the same values still counts: the library does not compare contents.
    ASSERT_EQ(moe_layer_set_param(L.l, name, v.data(), static_cast<int64_t>(v.size())), MOE_OK);
    EXPECT_EQ(moe_backward(L.l, L.ctx, dy.data(), nullptr), MOE_ERR_STATE) << name;
    EXPECT_NE(std::string(moe_last_error()).find(name), std::string::npos) << moe_last_error();
  }
}

TEST(StateRules, ZeroGradAndSelectionBiasMayChangeInBetween) {
  Layer L;
  const int64_t T = 7;
  const auto x = randn(static_cast<size_t>(T * L.d), 5), dy = randn(static_cast<size_t>(T * L.d), 6);
  std::vector<float> y(x.size()), dx1(x.size()), dx2(x.size());
  ASSERT_EQ(moe_forward(L.l, x.data(), T, y.data(), L.ctx), MOE_OK);
  ASSERT_EQ(moe_backward(L.l, L.ctx, dy.data(), dx1.data()), MOE_OK);
  const auto g1 = L.param("experts.w1", true);
  // PyTorch's zero_grad-after-forward pattern, and the selection bias (backward never reads it).
  ASSERT_EQ(moe_layer_zero_grad(L.l), MOE_OK);
  const auto bias = randn(static_cast<size_t>(L.E), 7);
  ASSERT_EQ(moe_layer_set_param(L.l, "router.bias", bias.data(), L.E), MOE_OK);
  ASSERT_EQ(moe_backward(L.l, L.ctx, dy.data(), dx2.data()), MOE_OK) << moe_last_error();
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(L.param("experts.w1", true), g1);
}

TEST(StateRules, SetParamAfterBackwardIsAnOptimiserStep) {
  Layer L;
  const int64_t T = 6;
  const auto x = randn(static_cast<size_t>(T * L.d), 8), dy = randn(static_cast<size_t>(T * L.d), 9);
  std::vector<float> y(x.size());
  for (int step = 0; step < 3; ++step) {
    ASSERT_EQ(moe_forward(L.l, x.data(), T, y.data(), L.ctx), MOE_OK);
    ASSERT_EQ(moe_backward(L.l, L.ctx, dy.data(), nullptr), MOE_OK) << "step " << step << ": " << moe_last_error();
    auto w = L.param("experts.w1");
    const auto g = L.param("experts.w1", true);
    for (size_t i = 0; i < w.size(); ++i) w[i] -= 0.1f * g[i];
    ASSERT_EQ(moe_layer_set_param(L.l, "experts.w1", w.data(), static_cast<int64_t>(w.size())), MOE_OK);
    ASSERT_EQ(moe_layer_zero_grad(L.l), MOE_OK);
  }
}

}  // namespace
