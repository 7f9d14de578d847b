// moe::make_config (validation: each bad field is refused with MOE_ERR_INVALID_ARGUMENT and a
// message naming the field), moe::config_defaults and moe::config_preset (include/moe/moe.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

moe_config valid_config() {
  moe_config c;
  moe::config_defaults(&c);
  c.d_model = 16;
  c.d_ff = 32;
  return c;
}

// make_config(c) must throw MOE_ERR_INVALID_ARGUMENT with `field` in the message.
void expect_rejected(const moe_config &c, const std::string &field, const std::string &label) {
  try {
    moe::make_config(&c);
    ADD_FAILURE() << label << ": accepted, expected MOE_ERR_INVALID_ARGUMENT naming " << field;
  } catch (const moe::Error &e) {
    EXPECT_EQ(e.status(), MOE_ERR_INVALID_ARGUMENT) << label << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos)
        << label << ": message does not name " << field << ": " << e.what();
  }
}

struct BadField {
  const char *label;
  const char *field;  // what the message must contain
  std::function<void(moe_config &)> apply;
};

TEST(Config, DefaultsMatchHeader) {
  moe_config c;
  std::memset(&c, 0xAB, sizeof c);
  moe::config_defaults(&c);
  EXPECT_EQ(c.struct_size, sizeof(moe_config));
  EXPECT_EQ(c.d_model, 0);
  EXPECT_EQ(c.d_ff, 0);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.activation, MOE_ACT_SWIGLU);
  EXPECT_EQ(c.routing, MOE_ROUTE_TOKEN_CHOICE);
  EXPECT_EQ(c.score, MOE_SCORE_SOFTMAX);
  EXPECT_NE(c.normalize_topk, 0);
  EXPECT_EQ(c.routed_scale, 1.0f);
  EXPECT_EQ(c.num_groups, 1);
  EXPECT_EQ(c.topk_groups, 1);
  EXPECT_LE(c.capacity_factor, 0.0f);
  EXPECT_EQ(c.drop_policy, MOE_DROP_POSITION);
  EXPECT_EQ(c.noise, MOE_NOISE_NONE);
  EXPECT_FLOAT_EQ(c.noise_eps, 0.01f);
  EXPECT_FLOAT_EQ(c.aux_loss_coef, 0.01f);
  EXPECT_EQ(c.z_loss_coef, 0.0f);
  EXPECT_EQ(c.importance_loss_coef, 0.0f);
  EXPECT_EQ(c.load_loss_coef, 0.0f);
  EXPECT_EQ(c.bias_update_rate, 0.0f);
  EXPECT_EQ(c.num_shared_experts, 0);
  EXPECT_EQ(c.d_ff_shared, 0);
  EXPECT_EQ(c.shared_gate, 0);
  EXPECT_EQ(c.device, MOE_DEVICE_CPU);
  EXPECT_EQ(c.device_index, 0);
  EXPECT_EQ(c.dtype, MOE_DTYPE_F32);
  EXPECT_EQ(c.allow_tf32, 0);
  EXPECT_EQ(c.seed, 0u);
  EXPECT_EQ(c.check_finite, 0);
  EXPECT_EQ(c.comm, nullptr);
}

TEST(Config, ValidConfigDerivesSizes) {
  moe_config u = valid_config();
  u.num_experts = 6;
  u.top_k = 3;
  u.num_shared_experts = 2;
  moe::Config c = moe::make_config(&u);
  EXPECT_EQ(c.d, 16);
  EXPECT_EQ(c.ff, 32);
  EXPECT_EQ(c.E, 6);
  EXPECT_EQ(c.k, 3);
  EXPECT_EQ(c.S, 2);
  EXPECT_EQ(c.ffs, 32);  // d_ff_shared 0 means d_ff
  EXPECT_EQ(c.c.d_ff_shared, 32);
  EXPECT_EQ(c.ranks, 1);
  EXPECT_EQ(c.rank, 0);
  EXPECT_EQ(c.E_local, 6);
  EXPECT_EQ(c.expert_begin, 0);
  EXPECT_TRUE(c.glu);
  EXPECT_EQ(c.c.struct_size, sizeof(moe_config));

  u.activation = MOE_ACT_RELU;
  u.d_ff_shared = 48;
  c = moe::make_config(&u);
  EXPECT_FALSE(c.glu);
  EXPECT_EQ(c.ffs, 48);
  EXPECT_TRUE(moe::is_glu(MOE_ACT_SWIGLU));
  EXPECT_TRUE(moe::is_glu(MOE_ACT_GEGLU));
  EXPECT_FALSE(moe::is_glu(MOE_ACT_RELU));
  EXPECT_FALSE(moe::is_glu(MOE_ACT_GELU));
  EXPECT_FALSE(moe::is_glu(MOE_ACT_SILU));
  EXPECT_TRUE(moe::is_glu(MOE_ACT_SWIGLU_CLAMPED));
}

TEST(Config, BoundaryValuesAreAccepted) {
  moe_config u = valid_config();
  u.num_experts = 1;
  u.top_k = 1;
  EXPECT_NO_THROW(moe::make_config(&u));
  u = valid_config();
  u.top_k = u.num_experts;  // dense mixture
  EXPECT_NO_THROW(moe::make_config(&u));
  u = valid_config();
  u.num_groups = 8;
  u.topk_groups = 8;
  u.top_k = 8;
  EXPECT_NO_THROW(moe::make_config(&u));
  u = valid_config();
  u.num_groups = 4;
  u.topk_groups = 2;
  u.top_k = 4;  // = topk_groups * E / G
  EXPECT_NO_THROW(moe::make_config(&u));
  u = valid_config();
  u.capacity_factor = -1.0f;  // <= 0: dropless
  EXPECT_NO_THROW(moe::make_config(&u));
}

TEST(Config, EachBadFieldIsNamed) {
  const std::vector<BadField> cases = {
      {"struct_size 0", "struct_size", [](moe_config &c) { c.struct_size = 0; }},
      {"struct_size 1", "struct_size", [](moe_config &c) { c.struct_size = 1; }},
      {"struct_size huge", "struct_size", [](moe_config &c) { c.struct_size = size_t{1} << 40; }},
      {"d_model 0", "d_model", [](moe_config &c) { c.d_model = 0; }},
      {"d_model -4", "d_model", [](moe_config &c) { c.d_model = -4; }},
      {"d_ff 0", "d_ff", [](moe_config &c) { c.d_ff = 0; }},
      {"d_ff -1", "d_ff", [](moe_config &c) { c.d_ff = -1; }},
      {"num_experts 0", "num_experts", [](moe_config &c) { c.num_experts = 0; }},
      {"num_experts -8", "num_experts", [](moe_config &c) { c.num_experts = -8; }},
      {"top_k 0", "top_k", [](moe_config &c) { c.top_k = 0; }},
      {"top_k -1", "top_k", [](moe_config &c) { c.top_k = -1; }},
      {"top_k > E", "top_k", [](moe_config &c) { c.top_k = 9; }},
      {"activation 6", "activation", [](moe_config &c) { c.activation = static_cast<moe_activation>(6); }},
      {"swiglu_limit 0", "swiglu_limit", [](moe_config &c) { c.swiglu_limit = 0.0f; }},
      {"swiglu_alpha -1", "swiglu_alpha", [](moe_config &c) { c.swiglu_alpha = -1.0f; }},
      {"activation -1", "activation", [](moe_config &c) { c.activation = static_cast<moe_activation>(-1); }},
      {"routing 2", "routing", [](moe_config &c) { c.routing = static_cast<moe_routing>(2); }},
      {"score 2", "score", [](moe_config &c) { c.score = static_cast<moe_score>(2); }},
      {"noise 3", "noise", [](moe_config &c) { c.noise = static_cast<moe_noise>(3); }},
      {"drop_policy 2", "drop_policy", [](moe_config &c) { c.drop_policy = static_cast<moe_drop_policy>(2); }},
      {"device 2", "device", [](moe_config &c) { c.device = static_cast<moe_device>(2); }},
      {"dtype 3", "dtype", [](moe_config &c) { c.dtype = static_cast<moe_dtype>(3); }},
      {"routed_scale NaN", "routed_scale", [](moe_config &c) { c.routed_scale = kNaN; }},
      {"routed_scale inf", "routed_scale", [](moe_config &c) { c.routed_scale = kInf; }},
      {"capacity_factor NaN", "capacity_factor", [](moe_config &c) { c.capacity_factor = kNaN; }},
      {"capacity_factor inf", "capacity_factor", [](moe_config &c) { c.capacity_factor = kInf; }},
      {"noise_eps NaN", "noise_eps", [](moe_config &c) { c.noise_eps = kNaN; }},
      {"aux_loss_coef NaN", "aux_loss_coef", [](moe_config &c) { c.aux_loss_coef = kNaN; }},
      {"aux_loss_coef -inf", "aux_loss_coef", [](moe_config &c) { c.aux_loss_coef = -kInf; }},
      {"z_loss_coef inf", "z_loss_coef", [](moe_config &c) { c.z_loss_coef = kInf; }},
      {"importance_loss_coef NaN", "importance_loss_coef", [](moe_config &c) { c.importance_loss_coef = kNaN; }},
      {"load_loss_coef NaN", "load_loss_coef", [](moe_config &c) { c.load_loss_coef = kNaN; }},
      {"bias_update_rate NaN", "bias_update_rate", [](moe_config &c) { c.bias_update_rate = kNaN; }},
      {"bias_update_rate < 0", "bias_update_rate", [](moe_config &c) { c.bias_update_rate = -0.5f; }},
      {"jitter noise_eps 1", "noise_eps",
       [](moe_config &c) {
         c.noise = MOE_NOISE_JITTER;
         c.noise_eps = 1.0f;
       }},
      {"jitter noise_eps < 0", "noise_eps",
       [](moe_config &c) {
         c.noise = MOE_NOISE_JITTER;
         c.noise_eps = -0.1f;
       }},
      {"num_groups 0", "num_groups", [](moe_config &c) { c.num_groups = 0; }},
      {"num_groups -2", "num_groups", [](moe_config &c) { c.num_groups = -2; }},
      {"num_groups 3 does not divide 8", "num_groups", [](moe_config &c) { c.num_groups = 3; }},
      {"num_groups 16 > E", "num_groups", [](moe_config &c) { c.num_groups = 16; }},
      {"topk_groups 0", "topk_groups",
       [](moe_config &c) {
         c.num_groups = 4;
         c.topk_groups = 0;
       }},
      {"topk_groups > num_groups", "topk_groups",
       [](moe_config &c) {
         c.num_groups = 4;
         c.topk_groups = 5;
       }},
      {"top_k > experts in kept groups", "top_k",
       [](moe_config &c) {
         c.num_groups = 4;
         c.topk_groups = 1;
         c.top_k = 3;  // one kept group holds 2 experts
       }},
      {"groups with expert choice", "num_groups",
       [](moe_config &c) {
         c.routing = MOE_ROUTE_EXPERT_CHOICE;
         c.capacity_factor = 1.0f;
         c.num_groups = 2;
       }},
      {"expert choice without capacity", "capacity_factor",
       [](moe_config &c) {
         c.routing = MOE_ROUTE_EXPERT_CHOICE;
         c.capacity_factor = 0.0f;
       }},
      {"num_shared_experts -1", "num_shared_experts", [](moe_config &c) { c.num_shared_experts = -1; }},
      {"d_ff_shared -1", "d_ff_shared",
       [](moe_config &c) {
         c.num_shared_experts = 1;
         c.d_ff_shared = -1;
       }},
      {"shared_gate without shared experts", "shared_gate", [](moe_config &c) { c.shared_gate = 1; }},
      {"E*d_ff*d overflows", "num_experts * d_ff * d_model",
       [](moe_config &c) {
         c.d_model = int64_t{1} << 31;
         c.d_ff = int64_t{1} << 31;
         c.num_experts = 8;
       }},
      {"E*d_ff*d overflows (large E)", "num_experts",
       [](moe_config &c) {
         c.d_model = int64_t{1} << 20;
         c.d_ff = int64_t{1} << 20;
         c.num_experts = int64_t{1} << 30;
       }},
      {"shared S*ffs*d overflows", "num_shared_experts",
       [](moe_config &c) {
         c.d_model = int64_t{1} << 20;
         c.d_ff = 4;
         c.num_shared_experts = int64_t{1} << 22;
         c.d_ff_shared = int64_t{1} << 30;
       }},
  };
  for (const BadField &b : cases) {
    moe_config c = valid_config();
    b.apply(c);
    expect_rejected(c, b.field, b.label);
  }
}

TEST(Config, LargerStructWithUnknownNonzeroFieldsIsRefused) {
  // A struct from a newer header: accepted when the fields this libmoe does not know are zero,
  // refused when one is set (it would be silently ignored otherwise).
  struct Bigger {
    moe_config c;
    unsigned char extra[32];
  } big;
  std::memset(&big, 0, sizeof big);
  big.c = valid_config();
  big.c.struct_size = sizeof big;
  EXPECT_NO_THROW(moe::make_config(&big.c));
  big.extra[5] = 1;
  expect_rejected(big.c, "struct_size", "newer struct with an unknown field set");
}

TEST(Config, BadCommIsNamed) {
  moe_comm comm{};
  comm.struct_size = sizeof(moe_comm);
  comm.size = 2;
  comm.rank = 0;
  comm.exchange_counts = [](void *, const int64_t *, int64_t *) { return MOE_OK; };
  comm.exchange_rows = [](void *, const void *, const int64_t *, void *, const int64_t *, size_t, void *) {
    return MOE_OK;
  };
  moe_config c = valid_config();
  c.comm = &comm;
  moe::Config ok = moe::make_config(&c);
  EXPECT_EQ(ok.ranks, 2);
  EXPECT_EQ(ok.E_local, 4);

  // Built against a moe.h without last_error: accepted.
  moe_comm older = comm;
  older.struct_size = offsetof(moe_comm, last_error);
  c.comm = &older;
  EXPECT_NO_THROW(moe::make_config(&c));

  moe_comm bad = comm;
  bad.struct_size = 8;
  c.comm = &bad;
  expect_rejected(c, "comm", "comm struct_size");
  bad = comm;
  bad.size = 0;
  expect_rejected(c, "comm", "comm size 0");
  bad = comm;
  bad.rank = 2;
  expect_rejected(c, "comm", "comm rank == size");
  bad = comm;
  bad.rank = -1;
  expect_rejected(c, "comm", "comm rank -1");
  bad = comm;
  bad.exchange_rows = nullptr;
  expect_rejected(c, "comm", "comm NULL hook");
  bad = comm;
  bad.size = 3;  // 8 experts do not divide over 3 ranks
  expect_rejected(c, "comm", "experts not divisible by ranks");
}

// ---- presets (include/moe/moe.h, moe_config_preset) ---------------------------------------------

moe_config preset(const char *name) {
  moe_config c;
  std::memset(&c, 0x5A, sizeof c);  // garbage: the preset must reset everything to the defaults first
  moe::config_preset(&c, sizeof c, name);
  return c;
}

void expect_widths_unset(const moe_config &c, const char *name) {
  EXPECT_EQ(c.struct_size, sizeof(moe_config)) << name;
  EXPECT_EQ(c.d_model, 0) << name;
  EXPECT_EQ(c.d_ff, 0) << name;
  EXPECT_EQ(c.d_ff_shared, 0) << name;
  EXPECT_EQ(c.device, MOE_DEVICE_CPU) << name;
  EXPECT_EQ(c.dtype, MOE_DTYPE_F32) << name;
  EXPECT_EQ(c.seed, 0u) << name;
  EXPECT_EQ(c.comm, nullptr) << name;
  EXPECT_EQ(c.check_finite, 0) << name;
}

TEST(Preset, Mixtral) {
  moe_config c = preset("mixtral");
  expect_widths_unset(c, "mixtral");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.activation, MOE_ACT_SWIGLU);
  EXPECT_EQ(c.score, MOE_SCORE_SOFTMAX);
  EXPECT_NE(c.normalize_topk, 0);
  EXPECT_LE(c.capacity_factor, 0.0f);  // dropless
  EXPECT_FLOAT_EQ(c.aux_loss_coef, 0.02f);
  EXPECT_EQ(c.routing, MOE_ROUTE_TOKEN_CHOICE);
  EXPECT_EQ(c.num_shared_experts, 0);
}

TEST(Preset, Switch) {
  moe_config c = preset("switch");
  expect_widths_unset(c, "switch");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 1);
  EXPECT_EQ(c.activation, MOE_ACT_RELU);
  EXPECT_EQ(c.score, MOE_SCORE_SOFTMAX);
  EXPECT_FLOAT_EQ(c.capacity_factor, 1.25f);
  EXPECT_EQ(c.drop_policy, MOE_DROP_POSITION);
  EXPECT_EQ(c.noise, MOE_NOISE_JITTER);
  EXPECT_FLOAT_EQ(c.noise_eps, 0.01f);
  EXPECT_FLOAT_EQ(c.aux_loss_coef, 0.01f);
  EXPECT_FLOAT_EQ(c.z_loss_coef, 0.001f);
}

TEST(Preset, Shazeer) {
  moe_config c = preset("shazeer");
  expect_widths_unset(c, "shazeer");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.activation, MOE_ACT_RELU);
  EXPECT_EQ(c.score, MOE_SCORE_SOFTMAX);
  EXPECT_EQ(c.noise, MOE_NOISE_GAUSSIAN);
  EXPECT_FLOAT_EQ(c.importance_loss_coef, 0.01f);
  EXPECT_FLOAT_EQ(c.load_loss_coef, 0.01f);
  EXPECT_EQ(c.aux_loss_coef, 0.0f);
}

TEST(Preset, ExpertChoice) {
  moe_config c = preset("expert-choice");
  expect_widths_unset(c, "expert-choice");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.routing, MOE_ROUTE_EXPERT_CHOICE);
  // "capacity factor 2" (Zhou et al. 2022: C = 2 T / E, each token gets 2 experts on average).
  // With moe_config's C = ceil(capacity_factor * T * k / E) that is capacity_factor * k == 2.
  EXPECT_FLOAT_EQ(c.capacity_factor * static_cast<float>(c.top_k), 2.0f)
      << "capacity_factor " << c.capacity_factor << ", top_k " << c.top_k;
  EXPECT_EQ(c.num_groups, 1);  // groups are refused with expert choice
}

TEST(Preset, DeepSeekV3) {
  moe_config c = preset("deepseek-v3");
  expect_widths_unset(c, "deepseek-v3");
  EXPECT_EQ(c.num_experts, 256);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_EQ(c.score, MOE_SCORE_SIGMOID);
  EXPECT_EQ(c.num_groups, 8);
  EXPECT_EQ(c.topk_groups, 4);
  EXPECT_FLOAT_EQ(c.routed_scale, 2.5f);
  EXPECT_EQ(c.num_shared_experts, 1);
  EXPECT_FLOAT_EQ(c.bias_update_rate, 0.001f);
  EXPECT_FLOAT_EQ(c.aux_loss_coef, 0.0001f);
}

TEST(Preset, Qwen2Moe) {
  moe_config c = preset("qwen2-moe");
  expect_widths_unset(c, "qwen2-moe");
  EXPECT_EQ(c.num_experts, 60);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.score, MOE_SCORE_SOFTMAX);
  EXPECT_EQ(c.normalize_topk, 0);
  EXPECT_EQ(c.num_shared_experts, 4);
  EXPECT_NE(c.shared_gate, 0);
}

TEST(Preset, EveryPresetValidatesOnceWidthsAreSet) {
  for (const char *name : {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3", "qwen2-moe"}) {
    moe_config c = preset(name);
    c.d_model = 8;
    c.d_ff = 16;
    EXPECT_NO_THROW(moe::make_config(&c)) << name;
  }
}

TEST(Preset, UnknownNameIsRefusedAndLeavesCfgUntouched) {
  moe_config c = valid_config();
  c.seed = 1234;
  moe_config before = c;
  for (const char *name : {"", "Mixtral", "gpt-4", "mixtral "}) {
    try {
      moe::config_preset(&c, sizeof c, name);
      ADD_FAILURE() << "preset \"" << name << "\" accepted";
    } catch (const moe::Error &e) {
      EXPECT_EQ(e.status(), MOE_ERR_INVALID_ARGUMENT);
      EXPECT_NE(std::string(e.what()).find("name"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(std::string("\"") + name + "\""), std::string::npos) << e.what();
    }
    EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0) << name;
  }
}

}  // namespace
