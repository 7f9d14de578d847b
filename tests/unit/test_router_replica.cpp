// The host replica of the router (tests/support/router.h), with which the GPU tests draw inputs
// without near-ties and tell which tokens may be routed differently: against the CPU layer, every
// token that is not at a near-tie gets the same experts (top-k ids after capacity, or expert-choice
// assignments), in inference and in training with noise; near-ties it must see are seen; and after
// draw_without_near_ties none is left and every token agrees.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <vector>

#include "support/layer.h"
#include "support/random.h"
#include "support/router.h"

namespace {

using moe_test::Rng;

struct Case {
  const char *name;
  void (*apply)(moe_config &);
};

const Case kCases[] = {
    {"softmax_top2", [](moe_config &) {}},
    {"sigmoid_top4_groups_bias",
     [](moe_config &c) {
       c.num_experts = 16;
       c.top_k = 4;
       c.score = MOE_SCORE_SIGMOID;
       c.num_groups = 4;
       c.topk_groups = 2;
       c.routed_scale = 2.5f;
       c.bias_update_rate = 1e-3f;  // a bias is there (set below); the update comes after routing
     }},
    {"jitter", [](moe_config &c) {
       c.noise = MOE_NOISE_JITTER;
       c.noise_eps = 0.05f;
     }},
    {"gaussian_load_loss",
     [](moe_config &c) {
       c.noise = MOE_NOISE_GAUSSIAN;
       c.load_loss_coef = 1e-2f;
     }},
    {"capacity_position", [](moe_config &c) { c.capacity_factor = 0.75f; }},
    {"capacity_probs",
     [](moe_config &c) {
       c.capacity_factor = 0.75f;
       c.drop_policy = MOE_DROP_PROBS;
     }},
    {"expert_choice",
     [](moe_config &c) {
       c.routing = MOE_ROUTE_EXPERT_CHOICE;
       c.capacity_factor = 1.0f;
     }},
    {"dense", [](moe_config &c) { c.top_k = c.num_experts; }},
};

constexpr int64_t kT = 64;

class RouterReplica : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    cfg_ = moe_test::config(24, 16, 8, 2, 3);
    kCases[GetParam()].apply(cfg_);
    layer_ = moe_test::make_layer(cfg_);
    ASSERT_TRUE(layer_);
    Rng rng(30 + GetParam());
    for (const moe_test::Param &p : moe_test::params(layer_.get()))
      moe_test::set_param(layer_.get(), p.name,
                          rng.nonzeros(static_cast<size_t>(p.numel), p.name == "router.bias" ? 0.05f : 0.5f));
    in_.cfg = cfg_;
    in_.T = kT;
    in_.x = rng.nonzeros(static_cast<size_t>(kT * cfg_.d_model), 1.0f);
    in_.weight = moe_test::get_param(layer_.get(), "router.weight");
    in_.bias = moe_test::get_param(layer_.get(), "router.bias");
    if (cfg_.noise == MOE_NOISE_GAUSSIAN) in_.noise_weight = moe_test::get_param(layer_.get(), "router.noise_weight");
  }

  // The CPU layer's routing of in_.x: route-only (inference) or a training forward, as the replica
  // represents it.
  moe_test::Routing layer_routing(bool training) {
    moe_test::Routing r;
    const moe_test::ContextPtr ctx = moe_test::make_context(layer_.get());
    std::vector<float> y(in_.x.size());
    if (training) {
      MOE_EXPECT_OK(moe_forward(layer_.get(), in_.x.data(), kT, y.data(), ctx.get()));
    } else {
      MOE_EXPECT_OK(moe_route(layer_.get(), in_.x.data(), kT, ctx.get()));
    }
    if (cfg_.routing == MOE_ROUTE_EXPERT_CHOICE) {
      const moe_test::Assignments a = moe_test::assignments(ctx.get());
      r.assignment_token = a.tokens;
      r.assignment_expert = a.experts;
    } else {
      r.ids = moe_test::topk(ctx.get(), kT, cfg_.top_k).ids;
    }
    return r;
  }

  // The experts of each token, for both representations.
  std::vector<std::vector<int32_t>> per_token(const moe_test::Routing &r) const {
    std::vector<std::vector<int32_t>> out(kT);
    if (cfg_.routing == MOE_ROUTE_EXPERT_CHOICE) {
      for (size_t i = 0; i < r.assignment_token.size(); ++i) out[r.assignment_token[i]].push_back(r.assignment_expert[i]);
    } else {
      for (int64_t t = 0; t < kT; ++t) out[t].assign(r.ids.begin() + t * cfg_.top_k, r.ids.begin() + (t + 1) * cfg_.top_k);
    }
    return out;
  }

  // Every token not at a near-tie routed alike; returns how many were at one.
  int64_t expect_agreement(bool training) {
    SCOPED_TRACE(training ? "training forward" : "inference");
    const moe_test::Routing replica = moe_test::route(in_, training, 0);
    const moe_test::Routing layer = layer_routing(training);
    const auto a = per_token(replica), b = per_token(layer);
    int64_t near = 0;
    for (int64_t t = 0; t < kT; ++t) {
      near += replica.near[t];
      if (!replica.near[t]) {
        EXPECT_EQ(a[t], b[t]) << "token " << t;
      }
    }
    return near;
  }

  moe_config cfg_{};
  moe_test::LayerPtr layer_;
  moe_test::RouterInputs in_;
};

TEST_P(RouterReplica, AgreesWithTheCpuLayerAwayFromNearTies) {
  const int64_t near = expect_agreement(false) + (cfg_.noise != MOE_NOISE_NONE ? expect_agreement(true) : 0);
  EXPECT_LT(near, kT / 4) << "near-ties should be rare in random inputs: the comparison would test little";
}

TEST_P(RouterReplica, DrawsInputsWithoutNearTies) {
  Rng rng(50 + GetParam());
  const int64_t d = cfg_.d_model;
  ASSERT_TRUE(moe_test::draw_without_near_ties(in_, 0, rng, [&](Rng &g) { return g.nonzeros(d, 1.0f); }));
  for (bool training : {false, true}) {
    if (training && cfg_.noise == MOE_NOISE_NONE) continue;
    const std::vector<char> near = moe_test::near_ties(in_, training, 0);
    EXPECT_EQ(std::count(near.begin(), near.end(), 1), 0);
    EXPECT_EQ(expect_agreement(training), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, RouterReplica, ::testing::Range(0, static_cast<int>(std::size(kCases))),
                         [](const ::testing::TestParamInfo<int> &info) { return std::string(kCases[info.param].name); });

// Two experts with the same router row and a large selection bias are tied for every token's
// first choice: every token is at a near-tie (token choice); with the tie broken by 1e-6 of the
// row, still; with it broken by 10%, no token is.
TEST(RouterReplicaTies, SeesATieItWasGiven) {
  moe_test::RouterInputs in;
  in.cfg = moe_test::config(16, 8, 8, 2, 1);
  in.cfg.score = MOE_SCORE_SIGMOID;
  in.T = 32;
  Rng rng(9);
  in.x = rng.nonzeros(static_cast<size_t>(in.T * 16), 1.0f);
  in.weight = rng.nonzeros(8 * 16, 0.3f);
  in.bias.assign(8, 0.0f);
  in.bias[2] = in.bias[5] = 2.0f;  // experts 2 and 5 always first and second
  for (float scale : {1.0f, 1.0f + 1e-6f, 1.1f}) {
    for (int i = 0; i < 16; ++i) in.weight[5 * 16 + i] = in.weight[2 * 16 + i] * scale;
    const std::vector<char> near = moe_test::near_ties(in, false);
    const int64_t n = std::count(near.begin(), near.end(), 1);
    if (scale < 1.01f) {
      EXPECT_EQ(n, in.T) << "scale " << scale;
    } else {
      // sigmoid(1.1 l) and sigmoid(l) are well apart unless l is near 0.
      EXPECT_LT(n, in.T / 4) << "scale " << scale;
    }
  }
}

}  // namespace
