// Checkpoints through the C API: moe_layer_save -> moe_layer_load round trips bit for bit in every
// dtype, sharded indexes, family layouts that must agree with libmoe's own names, atomic saves, and
// a table of malformed files, each refused with MOE_ERR_INVALID_ARGUMENT, a message naming the file,
// the tensor and the fault, and the layer unchanged and usable.
#include <gtest/gtest.h>
#include <moe/moe.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

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

moe_config small_config(int dtype, uint64_t seed) {
  moe_config c = moe_test::config(8, 12, 4, 2, seed);
  c.dtype = static_cast<moe_dtype>(dtype);
  c.num_shared_experts = 2;
  c.d_ff_shared = 6;
  c.shared_gate = 1;
  c.noise = MOE_NOISE_GAUSSIAN;
  return c;
}

// Every parameter set to random values (not the seed's initialisation), router.bias included.
void randomize(moe_layer *l, uint64_t seed) {
  moe_test::Rng rng(seed);
  for (const auto &p : moe_test::params(l)) moe_test::set_param(l, p.name, rng.uniforms(p.numel, -0.5f, 0.5f));
}

std::vector<std::vector<float>> snapshot(const moe_layer *l) { return moe_test::all_params(l); }

std::vector<unsigned char> forward_bytes(moe_layer *l, int dtype, int64_t T, int64_t d) {
  const std::vector<unsigned char> x = moe_test::encode(dtype, moe_test::inputs(T * d, 99, 1.0f));
  std::vector<unsigned char> y(x.size());
  MOE_EXPECT_OK(moe_forward(l, x.data(), T, y.data(), nullptr));
  return y;
}

void write_file(const std::string &p, const std::vector<unsigned char> &b) { moe_test::write_bytes(p, b); }

std::vector<unsigned char> st_bytes(const std::string &header, const std::vector<unsigned char> &data,
                                    uint64_t header_len = UINT64_MAX) {
  return moe_test::safetensors_bytes(header, data, header_len);
}

using Tensors = moe_test::SafetensorsWriter;

std::string replace(std::string s, const std::string &from, const std::string &to) {
  const size_t at = s.find(from);
  if (at == std::string::npos) throw std::runtime_error("test bug: no " + from);
  return s.replace(at, from.size(), to);
}

class Checkpoint : public ::testing::TestWithParam<int> {};

TEST_P(Checkpoint, SaveLoadRoundTripsBitForBit) {
  const int dt = GetParam();
  TempDir dir;
  LayerPtr a = moe_test::make_layer(small_config(dt, 1));
  ASSERT_TRUE(a);
  randomize(a.get(), 7);
  const std::string path = dir.file("layer.safetensors");
  MOE_EXPECT_OK(moe_layer_save(a.get(), path.c_str(), "model.layers.0.mlp"));

  LayerPtr b = moe_test::make_layer(small_config(dt, 2));  // another seed: every value differs first
  ASSERT_TRUE(b);
  ASSERT_FALSE(bitwise_equal(snapshot(a.get()), snapshot(b.get())));
  MOE_EXPECT_OK(moe_layer_load(b.get(), path.c_str(), "model.layers.0.mlp", "libmoe"));
  EXPECT_TRUE(bitwise_equal(snapshot(a.get()), snapshot(b.get())));
  EXPECT_EQ(forward_bytes(a.get(), dt, 9, 8), forward_bytes(b.get(), dt, 9, 8));

  // Saved in the storage dtype: the file is as small as the parameters and loads into a directory path.
  moe_memory m{};
  m.struct_size = sizeof m;
  MOE_EXPECT_OK(moe_layer_memory(a.get(), &m));
  EXPECT_GT(fs::file_size(path), m.parameters);
  EXPECT_LT(fs::file_size(path), m.parameters + 4096);
  MOE_EXPECT_OK(moe_layer_save(a.get(), dir.path().c_str(), nullptr));
  LayerPtr c = moe_test::make_layer(small_config(dt, 3));
  MOE_EXPECT_OK(moe_layer_load(c.get(), dir.path().c_str(), nullptr, nullptr));
  EXPECT_TRUE(bitwise_equal(snapshot(a.get()), snapshot(c.get())));
}

TEST_P(Checkpoint, ConvertsEveryFileDtypeToTheLayersStorage) {
  const int dt = GetParam();
  TempDir dir;
  // A float32 layer's values saved as they are, then loaded into a layer of dtype dt: each value
  // is rounded once to nearest even, the router's stay exact.
  LayerPtr a = moe_test::make_layer(small_config(MOE_DTYPE_F32, 1));
  randomize(a.get(), 8);
  const std::string path = dir.file("f32.safetensors");
  MOE_EXPECT_OK(moe_layer_save(a.get(), path.c_str(), nullptr));
  LayerPtr b = moe_test::make_layer(small_config(dt, 2));
  MOE_EXPECT_OK(moe_layer_load(b.get(), path.c_str(), nullptr, nullptr));
  for (const auto &p : moe_test::params(a.get())) {
    const int sdt = moe_test::stored_dtype(p.name, dt);
    EXPECT_EQ(moe_test::get_param(b.get(), p.name), moe_test::rounded(sdt, moe_test::get_param(a.get(), p.name)))
        << p.name;
  }
  // And a file in dt loaded into a float32 layer is exact.
  const std::string p2 = dir.file("lowp.safetensors");
  MOE_EXPECT_OK(moe_layer_save(b.get(), p2.c_str(), nullptr));
  LayerPtr c = moe_test::make_layer(small_config(MOE_DTYPE_F32, 3));
  MOE_EXPECT_OK(moe_layer_load(c.get(), p2.c_str(), nullptr, nullptr));
  EXPECT_TRUE(bitwise_equal(snapshot(b.get()), snapshot(c.get())));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Checkpoint, ::testing::Values(MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16),
                         [](const auto &info) {
                           return std::string(info.param == MOE_DTYPE_F32    ? "f32"
                                              : info.param == MOE_DTYPE_BF16 ? "bf16"
                                                                             : "f16");
                         });

TEST(CheckpointFamilies, PerExpertAndFusedLayoutsAgreeWithLibmoeNames) {
  TempDir dir;
  const int64_t d = 8, ff = 12, E = 4;
  moe_config cfg = moe_test::config(d, ff, E, 2, 1);
  LayerPtr a = moe_test::make_layer(cfg);
  randomize(a.get(), 11);
  auto w = moe_test::params_by_name(a.get());

  // Mixtral, transformers 4: one Linear per expert (w1 gate, w3 up, w2 down), bf16 as published.
  Tensors mix;
  mix.add("model.layers.1.block_sparse_moe.gate.weight", {E, d}, w["router.weight"], MOE_DTYPE_BF16);
  for (int64_t e = 0; e < E; ++e) {
    const std::string p = "model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".";
    mix.add(p + "w1.weight", {ff, d}, moe_test::expert_block(w["experts.w1"], e, ff, d, 0, ff), MOE_DTYPE_BF16);
    mix.add(p + "w3.weight", {ff, d}, moe_test::expert_block(w["experts.w3"], e, ff, d, 0, ff), MOE_DTYPE_BF16);
    mix.add(p + "w2.weight", {d, ff}, moe_test::expert_block(w["experts.w2"], e, d, ff, 0, d), MOE_DTYPE_BF16);
  }
  mix.add("model.layers.1.self_attn.q_proj.weight", {d, d}, moe_test::inputs(d * d, 3));  // not the block's
  write_file(dir.file("mixtral.safetensors"), mix.bytes());

  // Qwen3-MoE, transformers 5: experts fused, gate_up_proj [E, 2ff, d] with the gate rows first.
  Tensors q3;
  std::vector<float> gate_up, down = w["experts.w2"];
  for (int64_t e = 0; e < E; ++e) {
    auto g = moe_test::expert_block(w["experts.w1"], e, ff, d, 0, ff), u = moe_test::expert_block(w["experts.w3"], e, ff, d, 0, ff);
    gate_up.insert(gate_up.end(), g.begin(), g.end());
    gate_up.insert(gate_up.end(), u.begin(), u.end());
  }
  q3.add("model.layers.0.mlp.gate.weight", {E, d}, w["router.weight"]);
  q3.add("model.layers.0.mlp.experts.gate_up_proj", {E, 2 * ff, d}, gate_up);
  q3.add("model.layers.0.mlp.experts.down_proj", {E, d, ff}, down);
  write_file(dir.file("qwen3.safetensors"), q3.bytes());

  LayerPtr m = moe_test::make_layer(moe_test::config(d, ff, E, 2, 5));
  MOE_EXPECT_OK(moe_layer_load(m.get(), dir.file("mixtral.safetensors").c_str(), "model.layers.1.block_sparse_moe",
                               "mixtral"));
  LayerPtr q = moe_test::make_layer(moe_test::config(d, ff, E, 2, 6));
  MOE_EXPECT_OK(moe_layer_load(q.get(), dir.file("qwen3.safetensors").c_str(), "model.layers.0.mlp", "qwen3-moe"));
  auto wm = moe_test::params_by_name(m.get()), wq = moe_test::params_by_name(q.get());
  for (const auto &[name, v] : w) {
    const bool router = name.rfind("router.", 0) == 0;
    // router.bias is absent in both families: zero.
    const std::vector<float> want =
        name == "router.bias" ? std::vector<float>(v.size(), 0.0f) : v;
    EXPECT_EQ(wq[name], want) << "qwen3-moe " << name;
    EXPECT_EQ(wm[name], moe_test::rounded(MOE_DTYPE_BF16, want)) << "mixtral " << name << (router ? " (router)" : "");
  }

  // The wrong prefix finds nothing; the wrong family looks for other names (transformers 5's fused
  // names are the same in every family, so only the per-expert layout tells families apart).
  LayerPtr r = moe_test::make_layer(moe_test::config(d, ff, E, 2, 5));
  const auto before = snapshot(r.get());
  EXPECT_EQ(moe_layer_load(r.get(), dir.file("qwen3.safetensors").c_str(), "model.layers.1.mlp", "qwen3-moe"),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "model.layers.1.mlp.gate.weight"), nullptr) << moe_last_error();
  EXPECT_EQ(moe_layer_load(r.get(), dir.file("mixtral.safetensors").c_str(), "model.layers.1.block_sparse_moe",
                           "qwen3-moe"),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "model.layers.1.block_sparse_moe.experts.0.gate_proj.weight\" is missing"),
            nullptr)
      << moe_last_error();
  EXPECT_TRUE(bitwise_equal(before, snapshot(r.get())));

  // A plain-FFN family into a gated layer, unknown and unbuilt families.
  EXPECT_EQ(moe_layer_load(r.get(), dir.file("qwen3.safetensors").c_str(), "model.layers.0.mlp", "switch"),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "switch"), nullptr) << moe_last_error();
  EXPECT_EQ(moe_layer_load(r.get(), dir.file("qwen3.safetensors").c_str(), "model.layers.0.mlp", "llama"),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "llama"), nullptr) << moe_last_error();
  // gpt-oss into a plain SwiGLU layer: its experts compute the clamped SwiGLU.
  EXPECT_EQ(moe_layer_load(r.get(), dir.file("qwen3.safetensors").c_str(), "model.layers.0.mlp", "gpt-oss"),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "MOE_ACT_SWIGLU_CLAMPED"), nullptr) << moe_last_error();
  EXPECT_TRUE(bitwise_equal(before, snapshot(r.get())));
}

// gpt-oss (transformers 5's GptOssMLP): router.weight and router.bias (the logit bias),
// experts.gate_up_proj [E, d, 2ff] with gate and up interleaved along the last axis, its bias
// [E, 2ff] likewise, experts.down_proj [E, ff, d] and its bias [E, d]; in f32 and bf16.
TEST(CheckpointFamilies, GptOssInterleavedTransposedLayout) {
  TempDir dir;
  const int64_t d = 6, ff = 5, E = 4;
  moe_config cfg = moe_test::config(d, ff, E, 2, 1);
  MOE_EXPECT_OK(moe_config_preset(&cfg, "gpt-oss"));
  cfg.d_model = d;
  cfg.d_ff = ff;
  cfg.num_experts = E;
  cfg.top_k = 2;
  LayerPtr a = moe_test::make_layer(cfg);
  randomize(a.get(), 21);
  auto w = moe_test::params_by_name(a.get());
  ASSERT_EQ(w.count("router.logit_bias") + w.count("experts.b1") + w.count("experts.b3") + w.count("experts.b2"), 4u);
  const moe_test::GptOssExperts gx = moe_test::gpt_oss_experts(w, E, d, ff);
  for (int dt : {MOE_DTYPE_F32, MOE_DTYPE_BF16}) {
    Tensors g;
    const std::string p = "model.layers.2.mlp.";
    g.add(p + "router.weight", {E, d}, w["router.weight"], dt);
    g.add(p + "router.bias", {E}, w["router.logit_bias"], dt);
    g.add(p + "experts.gate_up_proj", {E, d, 2 * ff}, gx.gate_up, dt);
    g.add(p + "experts.gate_up_proj_bias", {E, 2 * ff}, gx.gate_up_bias, dt);
    g.add(p + "experts.down_proj", {E, ff, d}, gx.down, dt);
    g.add(p + "experts.down_proj_bias", {E, d}, w["experts.b2"], dt);
    const std::string file = dir.file("gpt-oss-" + std::to_string(dt) + ".safetensors");
    write_file(file, g.bytes());
    cfg.seed = 7;
    LayerPtr b = moe_test::make_layer(cfg);
    MOE_EXPECT_OK(moe_layer_load(b.get(), file.c_str(), "model.layers.2.mlp", "gpt-oss"));
    auto wb = moe_test::params_by_name(b.get());
    for (const auto &[name, v] : w) {
      const std::vector<float> want = name == "router.bias" ? std::vector<float>(v.size(), 0.0f) : v;
      EXPECT_EQ(wb[name], dt == MOE_DTYPE_F32 ? want : moe_test::rounded(MOE_DTYPE_BF16, want)) << name << " " << dt;
    }
    // Without expert biases the checkpoint's biases have no place: refused, the layer unchanged.
    moe_config nb = cfg;
    nb.expert_bias = 0;
    LayerPtr c = moe_test::make_layer(nb);
    const auto before = snapshot(c.get());
    EXPECT_EQ(moe_layer_load(c.get(), file.c_str(), "model.layers.2.mlp", "gpt-oss"), MOE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::strstr(moe_last_error(), "_bias"), nullptr) << moe_last_error();
    EXPECT_TRUE(bitwise_equal(before, snapshot(c.get())));
  }
}

TEST(CheckpointSharded, IndexSpreadsTensorsOverShards) {
  TempDir dir;
  moe_config cfg = small_config(MOE_DTYPE_BF16, 1);
  LayerPtr a = moe_test::make_layer(cfg);
  randomize(a.get(), 12);
  // Save one file, then split its tensors over two shards by hand.
  const std::string whole = dir.file("whole.safetensors");
  MOE_EXPECT_OK(moe_layer_save(a.get(), whole.c_str(), "blk"));
  Tensors s1, s2;
  std::string wm;
  int i = 0;
  for (const auto &p : moe_test::params(a.get())) {
    const int sdt = moe_test::stored_dtype(p.name, cfg.dtype);
    Tensors &s = (i++ % 2) ? s2 : s1;
    s.add("blk." + p.name, p.shape, moe_test::get_param(a.get(), p.name), sdt);
    wm += std::string(wm.empty() ? "" : ",") + "\"blk." + p.name + "\":\"model-0000" + (&s == &s1 ? "1" : "2") +
          "-of-00002.safetensors\"";
  }
  write_file(dir.file("model-00001-of-00002.safetensors"), s1.bytes());
  write_file(dir.file("model-00002-of-00002.safetensors"), s2.bytes());
  const std::string index = "{\"metadata\":{\"total_size\":1},\"weight_map\":{" + wm + "}}";
  write_file(dir.file("model.safetensors.index.json"), std::vector<unsigned char>(index.begin(), index.end()));

  LayerPtr b = moe_test::make_layer(small_config(MOE_DTYPE_BF16, 2));
  MOE_EXPECT_OK(moe_layer_load(b.get(), dir.path().c_str(), "blk", nullptr));  // the directory finds the index
  EXPECT_TRUE(bitwise_equal(snapshot(a.get()), snapshot(b.get())));
  LayerPtr c = moe_test::make_layer(small_config(MOE_DTYPE_BF16, 3));
  MOE_EXPECT_OK(moe_layer_load(c.get(), dir.file("model.safetensors.index.json").c_str(), "blk", "libmoe"));
  EXPECT_TRUE(bitwise_equal(snapshot(a.get()), snapshot(c.get())));

  // A shard that is gone, a shard name that leaves the directory, a tensor the shard lacks.
  const auto before = snapshot(c.get());
  fs::rename(dir.file("model-00002-of-00002.safetensors"), dir.file("moved.safetensors"));
  EXPECT_EQ(moe_layer_load(c.get(), dir.path().c_str(), "blk", nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "model-00002-of-00002.safetensors"), nullptr) << moe_last_error();
  const std::string escape = "{\"weight_map\":{\"blk.router.weight\":\"../x.safetensors\"}}";
  write_file(dir.file("model.safetensors.index.json"), std::vector<unsigned char>(escape.begin(), escape.end()));
  EXPECT_EQ(moe_layer_load(c.get(), dir.path().c_str(), "blk", nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "../x.safetensors"), nullptr) << moe_last_error();
  // blk.router.weight is in the first shard; this index says the second.
  const std::string lacks =
      "{\"weight_map\":{" +
      replace(wm, "\"blk.router.weight\":\"model-00001", "\"blk.router.weight\":\"model-00002") + "}}";
  fs::rename(dir.file("moved.safetensors"), dir.file("model-00002-of-00002.safetensors"));
  write_file(dir.file("model.safetensors.index.json"), std::vector<unsigned char>(lacks.begin(), lacks.end()));
  EXPECT_EQ(moe_layer_load(c.get(), dir.path().c_str(), "blk", nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "\"blk.router.weight\" is missing"), nullptr) << moe_last_error();
  EXPECT_TRUE(bitwise_equal(before, snapshot(c.get())));
}

TEST(CheckpointSave, FailedWriteLeavesThePreviousFile) {
  TempDir dir;
  LayerPtr a = moe_test::make_layer(small_config(MOE_DTYPE_F32, 1));
  randomize(a.get(), 13);
  const std::string path = dir.file("model.safetensors");
  MOE_EXPECT_OK(moe_layer_save(a.get(), path.c_str(), nullptr));
  const std::vector<unsigned char> good = moe_test::read_bytes(path);

  LayerPtr b = moe_test::make_layer(small_config(MOE_DTYPE_F32, 2));
  randomize(b.get(), 14);
  // A write that fails partway: the file-size limit (SIGXFSZ ignored, so write returns EFBIG).
  struct sigaction ign {}, old {};
  ign.sa_handler = SIG_IGN;
  sigaction(SIGXFSZ, &ign, &old);
  struct rlimit lim {}, saved {};
  getrlimit(RLIMIT_FSIZE, &saved);
  lim = saved;
  lim.rlim_cur = 1000;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  const moe_status s = moe_layer_save(b.get(), path.c_str(), nullptr);
  const std::string msg = moe_last_error();
  setrlimit(RLIMIT_FSIZE, &saved);
  sigaction(SIGXFSZ, &old, nullptr);
  ASSERT_GT(good.size(), 1000u);  // so the limit did cut the save short
  EXPECT_EQ(s, MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_EQ(moe_test::read_bytes(path), good);
  int files = 0;
  for (const auto &e : fs::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1) << "the temporary file was left behind";
  LayerPtr c = moe_test::make_layer(small_config(MOE_DTYPE_F32, 3));
  MOE_EXPECT_OK(moe_layer_load(c.get(), path.c_str(), nullptr, nullptr));
  EXPECT_TRUE(bitwise_equal(snapshot(a.get()), snapshot(c.get())));

  // A directory that does not exist.
  EXPECT_EQ(moe_layer_save(a.get(), dir.file("no/such/dir/x.safetensors").c_str(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "no/such/dir"), nullptr) << moe_last_error();
}

TEST(CheckpointArgs, NullsAndStateRules) {
  TempDir dir;
  LayerPtr a = moe_test::make_layer(small_config(MOE_DTYPE_F32, 1));
  const std::string path = dir.file("m.safetensors");
  EXPECT_EQ(moe_layer_save(nullptr, path.c_str(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "layer"), nullptr);
  EXPECT_EQ(moe_layer_save(a.get(), nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "path"), nullptr);
  EXPECT_EQ(moe_layer_load(nullptr, path.c_str(), nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_layer_load(a.get(), nullptr, nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "path"), nullptr);
  EXPECT_EQ(moe_layer_load(a.get(), dir.file("absent.safetensors").c_str(), nullptr, nullptr),
            MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "absent.safetensors"), nullptr);
  EXPECT_EQ(moe_layer_load(a.get(), dir.path().c_str(), nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "model.safetensors"), nullptr);
  // A FIFO is refused without blocking on its open.
  const std::string fifo = dir.file("fifo.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(moe_layer_load(a.get(), fifo.c_str(), nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(moe_last_error(), "not a regular file"), nullptr) << moe_last_error();
  fs::remove(fifo);

  // A load between a training forward and its backward: that backward is refused.
  MOE_EXPECT_OK(moe_layer_save(a.get(), path.c_str(), nullptr));
  moe_test::ContextPtr ctx = moe_test::make_context(a.get());
  const auto x = moe_test::inputs(5 * 8, 1), dy = moe_test::inputs(5 * 8, 2);
  std::vector<float> y(x.size());
  MOE_EXPECT_OK(moe_forward(a.get(), x.data(), 5, y.data(), ctx.get()));
  MOE_EXPECT_OK(moe_layer_load(a.get(), path.c_str(), nullptr, nullptr));
  EXPECT_EQ(moe_backward(a.get(), ctx.get(), dy.data(), nullptr), MOE_ERR_STATE);
  EXPECT_NE(std::strstr(moe_last_error(), "moe_layer_load"), nullptr) << moe_last_error();

  // check_finite: a value that is not finite is refused as moe_layer_set_param refuses it.
  moe_config cf = small_config(MOE_DTYPE_F32, 1);
  cf.check_finite = 1;
  LayerPtr f = moe_test::make_layer(cf);
  auto w = moe_test::get_param(a.get(), "experts.w2");
  w[3] = INFINITY;
  moe_test::set_param(a.get(), "experts.w2", w);
  MOE_EXPECT_OK(moe_layer_save(a.get(), path.c_str(), nullptr));
  const auto before = snapshot(f.get());
  EXPECT_EQ(moe_layer_load(f.get(), path.c_str(), nullptr, nullptr), MOE_ERR_NONFINITE);
  EXPECT_NE(std::strstr(moe_last_error(), "experts.w2[3]"), nullptr) << moe_last_error();
  EXPECT_TRUE(bitwise_equal(before, snapshot(f.get())));
}

// ---- malformed files ---------------------------------------------------------------------------

struct Bad {
  const char *name;
  std::function<std::vector<unsigned char>(const std::vector<unsigned char> &good, const std::string &header,
                                           const std::vector<unsigned char> &data)>
      make;
  std::vector<const char *> words;  // each must appear in the message (beside the file's path)
};

TEST(CheckpointMalformed, EveryFaultIsRefusedAndNamed) {
  TempDir dir;
  const int64_t d = 4, ff = 6, E = 2;
  // A hand-made libmoe file whose header text the cases edit.
  moe_config cfg = moe_test::config(d, ff, E, 1, 1);
  Tensors t;
  t.add("router.weight", {E, d}, moe_test::inputs(E * d, 1));
  t.add("router.bias", {E}, moe_test::inputs(E, 2));
  t.add("experts.w1", {E, ff, d}, moe_test::inputs(E * ff * d, 3));
  t.add("experts.w3", {E, ff, d}, moe_test::inputs(E * ff * d, 4));
  t.add("experts.w2", {E, d, ff}, moe_test::inputs(E * ff * d, 5));
  const std::vector<unsigned char> good = t.bytes();
  uint64_t hl = 0;
  for (int i = 7; i >= 0; --i) hl = (hl << 8) | good[i];
  const std::string header(good.begin() + 8, good.begin() + 8 + hl);
  const std::vector<unsigned char> data(good.begin() + 8 + hl, good.end());
  const std::string bias = "\"router.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[32,40]}";
  ASSERT_NE(header.find(bias), std::string::npos) << header;

  const std::vector<Bad> cases = {
      {"empty", [](auto &, auto &, auto &) { return std::vector<unsigned char>{}; }, {"truncated", "8-byte"}},
      {"shorter_than_length", [](auto &g, auto &, auto &) { return std::vector<unsigned char>(g.begin(), g.begin() + 5); },
       {"truncated"}},
      {"truncated_header", [](auto &g, auto &, auto &) { return std::vector<unsigned char>(g.begin(), g.begin() + 40); },
       {"truncated", "header length"}},
      {"truncated_data", [](auto &g, auto &, auto &) { return std::vector<unsigned char>(g.begin(), g.end() - 3); },
       {"experts.w2", "past the end"}},
      {"header_too_large", [](auto &, auto &h, auto &dt) { return st_bytes(h, dt, 200'000'000ull); },
       {"header length", "limit"}},
      {"header_length_huge", [](auto &, auto &h, auto &dt) { return st_bytes(h, dt, ~0ull - 3); }, {"header length"}},
      {"not_json", [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "\"router.bias\"", "router.bias"), dt); },
       {"JSON"}},
      {"not_an_object", [](auto &, auto &, auto &dt) { return st_bytes("[1,2]", dt); }, {"not a JSON object"}},
      {"non_utf8", [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "router.bias", "router.bi\xff\xfe"), dt); },
       {"UTF-8"}},
      {"duplicate_key",
       [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, bias, bias + "," + bias), dt); },
       {"router.bias", "twice"}},
      {"overlap",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"data_offsets\":[32,40]", "\"data_offsets\":[28,36]"), dt);
       },
       {"router.bias", "overlap"}},
      {"offsets_reversed",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"data_offsets\":[32,40]", "\"data_offsets\":[40,32]"), dt);
       },
       {"router.bias", "end before"}},
      {"offsets_negative",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"data_offsets\":[32,40]", "\"data_offsets\":[-8,40]"), dt);
       },
       {"router.bias", "data_offsets"}},
      {"offsets_not_size",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"data_offsets\":[32,40]", "\"data_offsets\":[32,44]"), dt);
       },
       {"router.bias", "8 bytes", "hold 12"}},
      {"offsets_past_end",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"data_offsets\":[32,40]", "\"data_offsets\":[100000,100008]"), dt);
       },
       {"router.bias", "past the end"}},
      {"shape_float",
       [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "\"shape\":[2]", "\"shape\":[2.0]"), dt); },
       {"router.bias", "shape"}},
      {"shape_overflow",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"shape\":[2]", "\"shape\":[4294967296,4294967296]"), dt);
       },
       {"router.bias", "too large"}},
      {"wrong_dtype",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"dtype\":\"F32\",\"shape\":[2]", "\"dtype\":\"I32\",\"shape\":[2]"), dt);
       },
       {"router.bias", "I32"}},
      {"unknown_dtype",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"dtype\":\"F32\",\"shape\":[2]", "\"dtype\":\"Q4\",\"shape\":[2]"), dt);
       },
       {"router.bias", "Q4"}},
      {"wrong_shape",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "\"shape\":[2],", "\"shape\":[1,2],"), dt);
       },
       {"router.bias", "[1, 2]", "[2]"}},
      {"missing_key",
       [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "\"router.bias\"", "\"router.bias_\""), dt); },
       {"router.bias", "missing"}},
      {"missing_field",
       [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "\"dtype\":\"F32\",\"shape\":[2],", ""), dt); },
       {"router.bias", "dtype"}},
      {"metadata_not_strings",
       [&](auto &, auto &h, auto &dt) { return st_bytes(replace(h, "{", "{\"__metadata__\":{\"a\":1},"), dt); },
       {"__metadata__"}},
      {"deep_nesting",
       [&](auto &, auto &h, auto &dt) {
         return st_bytes(replace(h, "{", "{\"x\":" + std::string(5000, '[') + std::string(5000, ']') + ","), dt);
       },
       {"nested"}},
      {"extra_tensor",
       [&](auto &, auto &h, auto &dt) {
         std::vector<unsigned char> d2 = dt;
         d2.insert(d2.end(), 4, 0);
         return st_bytes(replace(h, "{", "{\"experts.w4\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
                                             std::to_string(dt.size()) + "," + std::to_string(dt.size() + 4) + "]},"),
                         d2);
       },
       {"experts.w4", "no place"}},
  };
  LayerPtr l = moe_test::make_layer(cfg);
  randomize(l.get(), 21);
  const auto before = snapshot(l.get());
  const std::vector<unsigned char> y0 = forward_bytes(l.get(), MOE_DTYPE_F32, 3, d);
  // The unedited file loads (so each case fails for its own fault), then the layer is restored.
  const std::string okp = dir.file("good.safetensors");
  write_file(okp, good);
  MOE_EXPECT_OK(moe_layer_load(l.get(), okp.c_str(), nullptr, nullptr));
  const std::string restore = dir.file("restore.safetensors");
  LayerPtr keep = moe_test::make_layer(cfg);
  randomize(keep.get(), 21);
  MOE_EXPECT_OK(moe_layer_save(keep.get(), restore.c_str(), nullptr));
  MOE_EXPECT_OK(moe_layer_load(l.get(), restore.c_str(), nullptr, nullptr));
  ASSERT_TRUE(bitwise_equal(before, snapshot(l.get())));

  for (const Bad &c : cases) {
    const std::string p = dir.file(std::string(c.name) + ".safetensors");
    write_file(p, c.make(good, header, data));
    EXPECT_EQ(moe_layer_load(l.get(), p.c_str(), nullptr, "libmoe"), MOE_ERR_INVALID_ARGUMENT) << c.name;
    const std::string msg = moe_last_error();
    EXPECT_NE(msg.find(p), std::string::npos) << c.name << ": the message does not name the file: " << msg;
    for (const char *w : c.words)
      EXPECT_NE(msg.find(w), std::string::npos) << c.name << ": no \"" << w << "\" in: " << msg;
    EXPECT_TRUE(bitwise_equal(before, snapshot(l.get()))) << c.name << " changed the layer";
  }
  EXPECT_EQ(forward_bytes(l.get(), MOE_DTYPE_F32, 3, d), y0);  // still usable, still the same
}

}  // namespace
