// moe_layer_save_as: a layer saved in a model family's key names and layout loads back with that
// family bit for bit, and the file holds exactly the tensors, shapes, dtypes and values the
// family's layout prescribes, assembled here independently from the layer's parameters. A
// parameter the family cannot hold is refused while nonzero, and nothing is written.
#include <gtest/gtest.h>
#include <moe/moe.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/half.h"
#include "support/layer.h"
#include "support/random.h"
#include "support/safetensors.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using moe_test::bitwise_equal;
using moe_test::LayerPtr;
using moe_test::TempDir;

namespace {

// One tensor of a safetensors file as the test reads it (its own reader, not the library's).
struct FileTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
};

std::map<std::string, FileTensor> read_safetensors(const std::string &path) {
  const std::vector<unsigned char> b = moe_test::read_bytes(path);
  if (b.size() < 8) throw std::runtime_error("short file " + path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | b[i];
  const nlohmann::json h = nlohmann::json::parse(b.begin() + 8, b.begin() + 8 + static_cast<long>(n));
  std::map<std::string, FileTensor> out;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    FileTensor t;
    t.dtype = it.value()["dtype"].get<std::string>();
    t.shape = it.value()["shape"].get<std::vector<int64_t>>();
    const auto off = it.value()["data_offsets"].get<std::vector<uint64_t>>();
    t.bytes.assign(b.begin() + 8 + static_cast<long>(n + off[0]), b.begin() + 8 + static_cast<long>(n + off[1]));
    out[it.key()] = std::move(t);
  }
  return out;
}

const char *st_dtype(int dt) { return dt == MOE_DTYPE_F32 ? "F32" : dt == MOE_DTYPE_BF16 ? "BF16" : "F16"; }

// What the family's file must hold: shape, the dtype of the parameter it comes from, its values.
struct Want {
  std::vector<int64_t> shape;
  std::string param;  // the libmoe parameter whose storage dtype the tensor has
  std::vector<float> values;
};

struct Case {
  const char *family;
  moe_config cfg;
  std::vector<const char *> absent;  // parameters the family has no tensor for: zero in the layer
};

constexpr int64_t D = 8, FF = 6, E = 4, S = 2, FFS = 5;

Case make_case(const char *family, int dtype) {
  moe_config c = moe_test::config(D, FF, E, 2, 1);
  std::vector<const char *> absent = {"router.bias"};
  const std::string f = family;
  if (f == "gpt-oss") {
    EXPECT_EQ(moe_config_preset(&c, "gpt-oss"), MOE_OK);
    c.d_model = D;
    c.d_ff = FF;
    c.num_experts = E;
    c.top_k = 2;
  } else if (f == "switch") {
    c.activation = MOE_ACT_RELU;
    c.top_k = 1;
    c.router_logit_bias = 1;  // Switch's router_bias=True
  } else if (f == "qwen2-moe" || f == "deepseek-v3") {
    c.num_shared_experts = S;
    c.d_ff_shared = FFS;
    c.shared_gate = f == "qwen2-moe";
    if (f == "deepseek-v3") absent.clear();  // gate.e_score_correction_bias holds router.bias
  }
  c.dtype = static_cast<moe_dtype>(dtype);
  return Case{family, c, absent};
}

void append(std::vector<float> &to, const std::vector<float> &v) { to.insert(to.end(), v.begin(), v.end()); }

// The family's tensors (without prefix) from the layer's parameters, written from the families'
// modelling code as tests/python's loader tests write them.
std::map<std::string, Want> family_file(const std::string &f, std::map<std::string, std::vector<float>> w) {
  std::map<std::string, Want> out;
  if (f == "gpt-oss") {
    const moe_test::GptOssExperts g = moe_test::gpt_oss_experts(w, E, D, FF);
    out["router.weight"] = {{E, D}, "router.weight", w["router.weight"]};
    out["router.bias"] = {{E}, "router.logit_bias", w["router.logit_bias"]};
    out["experts.gate_up_proj"] = {{E, D, 2 * FF}, "experts.w1", g.gate_up};
    out["experts.gate_up_proj_bias"] = {{E, 2 * FF}, "experts.b1", g.gate_up_bias};
    out["experts.down_proj"] = {{E, FF, D}, "experts.w2", g.down};
    out["experts.down_proj_bias"] = {{E, D}, "experts.b2", w["experts.b2"]};
    return out;
  }
  if (f == "switch") {
    out["router.classifier.weight"] = {{E, D}, "router.weight", w["router.weight"]};
    out["router.classifier.bias"] = {{E}, "router.logit_bias", w["router.logit_bias"]};
    for (int64_t e = 0; e < E; ++e) {
      const std::string p = "experts.expert_" + std::to_string(e) + ".";
      out[p + "wi.weight"] = {{FF, D}, "experts.w1", moe_test::expert_block(w["experts.w1"], e, FF, D, 0, FF)};
      out[p + "wo.weight"] = {{D, FF}, "experts.w2", moe_test::expert_block(w["experts.w2"], e, D, FF, 0, D)};
    }
    return out;
  }
  // transformers 5's fused experts: gate rows, then up rows, of each expert.
  std::vector<float> gu;
  for (int64_t e = 0; e < E; ++e) {
    append(gu, moe_test::expert_block(w["experts.w1"], e, FF, D, 0, FF));
    append(gu, moe_test::expert_block(w["experts.w3"], e, FF, D, 0, FF));
  }
  out["gate.weight"] = {{E, D}, "router.weight", w["router.weight"]};
  out["experts.gate_up_proj"] = {{E, 2 * FF, D}, "experts.w1", gu};
  out["experts.down_proj"] = {{E, D, FF}, "experts.w2", w["experts.w2"]};
  if (f == "deepseek-v3") out["gate.e_score_correction_bias"] = {{E}, "router.bias", w["router.bias"]};
  if (f == "qwen2-moe" || f == "deepseek-v3") {
    // One shared module S*FFS wide: the S experts' rows stacked; down_proj's columns side by side.
    const std::string m = f == "qwen2-moe" ? "shared_expert." : "shared_experts.";
    std::vector<float> down(D * S * FFS);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < FFS; ++j) down[i * S * FFS + s * FFS + j] = w["shared.w2"][(s * D + i) * FFS + j];
    out[m + "gate_proj.weight"] = {{S * FFS, D}, "shared.w1", w["shared.w1"]};
    out[m + "up_proj.weight"] = {{S * FFS, D}, "shared.w3", w["shared.w3"]};
    out[m + "down_proj.weight"] = {{D, S * FFS}, "shared.w2", down};
    if (f == "qwen2-moe") out["shared_expert_gate.weight"] = {{1, D}, "shared.gate", w["shared.gate"]};
  }
  return out;
}

// Random values everywhere but in the parameters the family cannot hold.
LayerPtr random_layer(const Case &k, uint64_t seed) {
  moe_config c = k.cfg;
  c.seed = seed;
  LayerPtr l = moe_test::make_layer(c);
  if (!l) return l;
  moe_test::Rng rng(seed * 31 + 7);
  for (const auto &p : moe_test::params(l.get())) {
    bool zero = false;
    for (const char *a : k.absent) zero |= p.name == a;
    moe_test::set_param(l.get(), p.name, zero ? std::vector<float>(p.numel, 0.0f) : rng.uniforms(p.numel, -0.5f, 0.5f));
  }
  return l;
}

using Param = std::tuple<const char *, int>;
class SaveAs : public ::testing::TestWithParam<Param> {};

TEST_P(SaveAs, FamilyNamesRoundTripBitForBit) {
  const auto [family, dt] = GetParam();
  const Case k = make_case(family, dt);
  TempDir dir;
  LayerPtr a = random_layer(k, 3);
  ASSERT_TRUE(a) << moe_last_error();
  const std::string path = dir.file("model.safetensors"), prefix = "model.layers.5.mlp";
  MOE_EXPECT_OK(moe_layer_save_as(a.get(), path.c_str(), prefix.c_str(), family));

  LayerPtr b = random_layer(k, 4);  // another seed: every value differs first
  ASSERT_TRUE(b);
  ASSERT_FALSE(bitwise_equal(moe_test::all_params(a.get()), moe_test::all_params(b.get())));
  MOE_EXPECT_OK(moe_layer_load(b.get(), path.c_str(), prefix.c_str(), family));
  EXPECT_TRUE(bitwise_equal(moe_test::all_params(a.get()), moe_test::all_params(b.get())));

  // The file holds exactly the family's tensors, in the storage dtype of their parameters.
  const auto file = read_safetensors(path);
  const auto want = family_file(family, moe_test::params_by_name(a.get()));
  std::vector<std::string> got_keys, want_keys;
  for (const auto &kv : file) got_keys.push_back(kv.first);
  for (const auto &kv : want) want_keys.push_back(prefix + "." + kv.first);
  EXPECT_EQ(got_keys, want_keys);
  for (const auto &[key, wt] : want) {
    auto it = file.find(prefix + "." + key);
    if (it == file.end()) continue;
    const int sdt = moe_test::stored_dtype(wt.param, dt);
    EXPECT_EQ(it->second.shape, wt.shape) << key;
    EXPECT_EQ(it->second.dtype, st_dtype(sdt)) << key;
    EXPECT_TRUE(it->second.bytes == moe_test::encode(sdt, wt.values)) << key;
  }
}

const char *const kFamilies[] = {"mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v3", "switch", "gpt-oss"};

INSTANTIATE_TEST_SUITE_P(Families, SaveAs,
                         ::testing::Combine(::testing::ValuesIn(kFamilies),
                                            ::testing::Values(MOE_DTYPE_F32, MOE_DTYPE_BF16)),
                         [](const auto &info) {
                           std::string n = std::get<0>(info.param);
                           for (char &ch : n)
                             if (ch == '-') ch = '_';
                           return n + (std::get<1>(info.param) == MOE_DTYPE_F32 ? "_f32" : "_bf16");
                         });

TEST(SaveAsRefused, WhatTheFamilyCannotHoldWritesNothing) {
  TempDir dir;
  const Case k = make_case("mixtral", MOE_DTYPE_F32);
  LayerPtr a = random_layer(k, 5);
  ASSERT_TRUE(a);
  const std::string path = dir.file("model.safetensors");
  MOE_EXPECT_OK(moe_layer_save_as(a.get(), path.c_str(), nullptr, "mixtral"));
  const std::vector<unsigned char> before = moe_test::read_bytes(path);

  // A selection bias mixtral has no tensor for: refused, naming the family and the parameter.
  std::vector<float> bias(E, 0.0f);
  bias[2] = 0.25f;
  moe_test::set_param(a.get(), "router.bias", bias);
  EXPECT_EQ(moe_layer_save_as(a.get(), path.c_str(), nullptr, "mixtral"), MOE_ERR_INVALID_ARGUMENT);
  const std::string msg = moe_last_error();
  EXPECT_NE(msg.find("mixtral"), std::string::npos) << msg;
  EXPECT_NE(msg.find("router.bias[2]"), std::string::npos) << msg;
  EXPECT_EQ(moe_test::read_bytes(path), before);
  int files = 0;
  for (const auto &e : fs::directory_iterator(dir.file(""))) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  // deepseek-v3 holds it (gate.e_score_correction_bias); libmoe's own names hold everything.
  LayerPtr ds = random_layer(make_case("deepseek-v3", MOE_DTYPE_F32), 6);
  moe_test::set_param(ds.get(), "router.bias", bias);
  MOE_EXPECT_OK(moe_layer_save_as(ds.get(), dir.file("ds.safetensors").c_str(), nullptr, "deepseek-v3"));
  MOE_EXPECT_OK(moe_layer_save_as(a.get(), dir.file("own.safetensors").c_str(), nullptr, nullptr));
  MOE_EXPECT_OK(moe_layer_save_as(a.get(), dir.file("own2.safetensors").c_str(), nullptr, "libmoe"));
  EXPECT_EQ(moe_test::read_bytes(dir.file("own.safetensors")), moe_test::read_bytes(dir.file("own2.safetensors")));

  // Expert biases in a family without them; a logit bias in a family whose router has none.
  moe_config cb = k.cfg;
  cb.expert_bias = 1;
  cb.router_logit_bias = 1;
  LayerPtr eb = moe_test::make_layer(cb);
  ASSERT_TRUE(eb) << moe_last_error();
  moe_test::set_param(eb.get(), "experts.b2", moe_test::inputs(E * D, 8));
  EXPECT_EQ(moe_layer_save_as(eb.get(), path.c_str(), nullptr, "qwen3-moe"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "experts.b2"), nullptr) << moe_last_error();
  EXPECT_NE(std::strstr(moe_last_error(), "qwen3-moe"), nullptr) << moe_last_error();
  moe_test::set_param(eb.get(), "experts.b2", std::vector<float>(E * D, 0.0f));
  moe_test::set_param(eb.get(), "router.logit_bias", moe_test::inputs(E, 9));
  EXPECT_EQ(moe_layer_save_as(eb.get(), path.c_str(), nullptr, "olmoe"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "router.logit_bias"), nullptr) << moe_last_error();
  EXPECT_EQ(moe_test::read_bytes(path), before);

  // What the load refuses, the save refuses: a gated layer as Switch, an unknown family, and the
  // NULL arguments.
  EXPECT_EQ(moe_layer_save_as(a.get(), path.c_str(), nullptr, "switch"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "switch"), nullptr) << moe_last_error();
  EXPECT_EQ(moe_layer_save_as(a.get(), path.c_str(), nullptr, "llama"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "llama"), nullptr) << moe_last_error();
  EXPECT_EQ(moe_layer_save_as(nullptr, path.c_str(), nullptr, "mixtral"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_layer_save_as(a.get(), nullptr, nullptr, "mixtral"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_test::read_bytes(path), before);
  // The layer is still usable.
  const auto x = moe_test::inputs(3 * D, 10);
  std::vector<float> y(x.size());
  MOE_EXPECT_OK(moe_forward(a.get(), x.data(), 3, y.data(), nullptr));
}

}  // namespace
