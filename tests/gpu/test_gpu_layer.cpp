// The CUDA layer against the CPU layer through the public C API only (moe.h): every routing method
// (each preset of moe_config_preset shrunk to small sizes, capacity with both drop policies, capacity
// per group of tokens (capacity_group_size) for both routings, Gaussian noise and jitter in
// training), each in float32, bfloat16 and float16. Both layers get the same
// parameters (random, never zero), the same x and dy; y, dx, every gradient, the statistics, the
// expert counts and the routing decisions are compared, against a CPU layer of the same dtype and,
// for bfloat16 and float16, loosely against a float32 CPU layer too. Then determinism, streams, bad
// input, device pointers.
//
// Without a CUDA device every case reports SKIPPED (gtest skip; ctest counts it as skipped).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gpu_test_util.h"
#include "moe/moe.h"
#include "support/layer.h"
#include "support/router.h"

namespace {

using moe_test::close;
using moe_test::close_scalar;
using moe_test::ContextPtr;
using moe_test::get_grad;
using moe_test::get_param;
using moe_test::LayerPtr;
using moe_test::make_layer;
using moe_test::Rng;
using moe_test::same;
using moe_test::set_param;
using moe_test::stats_fields;
using ParamDesc = moe_test::Param;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kT = 96;

// Against a CPU layer of the same dtype fed the same values (parameters, x and dy all exactly
// representable in the dtype), both following moe.h's precision rule (moe_test::stored_tol): a
// value stored in the dtype may land on the neighbouring value, one unit in its last place; three
// units at each tensor's scale, one for its own rounding and two for the stored values a layer
// passes through before it (h, a, ye; dye, dA, dh, dxe), whose rare neighbours move it far less.
double tol_of(int dtype) { return moe_test::stored_tol(dtype, 3); }
// A bf16 / f16 layer against the float32 CPU layer: the whole cost of 16-bit storage, up to half a
// unit for each value stored on the longest path (dye, dA, dh, dxe, dx in backward) and what their
// rounding does to the sums that read them.
double loose_tol_of(int dtype) { return moe_test::stored_tol(dtype, 6); }
const char *dtype_name(int dtype) { return dtype == MOE_DTYPE_F32 ? "f32" : dtype == MOE_DTYPE_BF16 ? "bf16" : "f16"; }

// ---- configurations ---------------------------------------------------------------------------------

struct Case {
  const char *name;
  void (*apply)(moe_config &);
};

const Case kCases[] = {
    {"mixtral",
     [](moe_config &c) {
       c = moe_test::preset("mixtral", 64, 128);  // E 8, k 2, SwiGLU, softmax, normalized, dropless
       c.z_loss_coef = 1e-3f;
     }},
    {"switch",
     [](moe_config &c) {
       c = moe_test::preset("switch", 96, 192);  // top-1, ReLU, capacity 1.25 (position), jitter, z-loss
     }},
    {"shazeer",
     [](moe_config &c) {
       c = moe_test::preset("shazeer", 64, 96);  // top-2, ReLU, Gaussian noise, importance and load losses
     }},
    {"expert_choice",
     [](moe_config &c) {
       c = moe_test::preset("expert-choice", 64, 128);  // capacity factor 1, each expert picks its tokens
       c.z_loss_coef = 1e-3f;
       c.importance_loss_coef = 1e-2f;
     }},
    {"deepseek_v3",
     [](moe_config &c) {
       // sigmoid, groups, routed_scale 2.5, shared expert, bias balancing
       c = moe_test::preset("deepseek-v3", 128, 96);
       c.num_experts = 16;
       c.top_k = 4;
       c.num_groups = 4;
       c.topk_groups = 2;
       c.d_ff_shared = 64;
     }},
    {"qwen2_moe",
     [](moe_config &c) {
       c = moe_test::preset("qwen2-moe", 64, 96);  // softmax not normalized, 4 shared experts behind a sigmoid gate
       c.num_experts = 12;
       c.top_k = 4;
       c.d_ff_shared = 32;
     }},
    {"capacity_position",
     [](moe_config &c) {
       moe_config_init(&c);
       c.d_model = 64;
       c.d_ff = 128;
       c.num_experts = 8;
       c.top_k = 2;
       c.capacity_factor = 0.75f;
       c.drop_policy = MOE_DROP_POSITION;
       c.activation = MOE_ACT_GEGLU;
       c.z_loss_coef = 1e-3f;
     }},
    {"capacity_probs",
     [](moe_config &c) {
       moe_config_init(&c);
       c.d_model = 64;
       c.d_ff = 128;
       c.num_experts = 8;
       c.top_k = 2;
       c.capacity_factor = 0.75f;
       c.drop_policy = MOE_DROP_PROBS;
       c.activation = MOE_ACT_GELU;
       c.importance_loss_coef = 1e-2f;
     }},
    {"switch_per_sequence",
     [](moe_config &c) {
       // Switch's capacity per sequence of 24 tokens (4 sequences), at least 2 slots per expert
       c = moe_test::preset("switch", 96, 192);
       c.capacity_group_size = 24;
       c.min_capacity = 2;
       c.capacity_factor = 0.5f;
     }},
    {"capacity_groups_probs",
     [](moe_config &c) {
       // groups of 20 tokens and a last group of 16 with its own capacity
       moe_config_init(&c);
       c.d_model = 64;
       c.d_ff = 96;
       c.num_experts = 8;
       c.top_k = 2;
       c.capacity_factor = 0.75f;
       c.capacity_group_size = 20;
       c.drop_policy = MOE_DROP_PROBS;
       c.importance_loss_coef = 1e-2f;
     }},
    {"expert_choice_groups",
     [](moe_config &c) {
       // each expert picks its best tokens of each group: 40, 40 and a last group of 16
       c = moe_test::preset("expert-choice", 64, 128);
       c.capacity_group_size = 40;
       c.z_loss_coef = 1e-3f;
     }},
    {"gaussian",
     [](moe_config &c) {
       moe_config_init(&c);
       c.d_model = 64;
       c.d_ff = 96;
       c.num_experts = 8;
       c.top_k = 2;
       c.noise = MOE_NOISE_GAUSSIAN;
       c.load_loss_coef = 1e-2f;
       c.importance_loss_coef = 1e-2f;
       c.activation = MOE_ACT_SILU;
       c.capacity_factor = 1.0f;
       c.drop_policy = MOE_DROP_PROBS;
     }},
    {"jitter",
     [](moe_config &c) {
       moe_config_init(&c);
       c.d_model = 80;
       c.d_ff = 128;
       c.num_experts = 16;
       c.top_k = 2;
       c.noise = MOE_NOISE_JITTER;
       c.noise_eps = 0.05f;
       c.score = MOE_SCORE_SIGMOID;
       c.z_loss_coef = 1e-3f;
     }},
    {"gpt_oss",
     [](moe_config &c) {
       // router logit bias, softmax over the top-k logits, expert biases, clamped SwiGLU
       c = moe_test::preset("gpt-oss", 64, 96);
       c.num_experts = 8;
       c.top_k = 2;
     }},
    {"dense",
     [](moe_config &c) {
       moe_config_init(&c);
       c.d_model = 64;
       c.d_ff = 96;
       c.num_experts = 8;
       c.top_k = 8;
       c.activation = MOE_ACT_GEGLU;
     }},
};
constexpr int kNumCases = static_cast<int>(sizeof kCases / sizeof kCases[0]);

moe_config config_of(int case_index) {
  moe_config c;
  moe_config_init(&c);
  kCases[case_index].apply(c);
  c.seed = 11;
  return c;
}
moe_config cuda_config(moe_config c, int dtype) {
  c.device = MOE_DEVICE_CUDA;
  c.device_index = 0;
  c.dtype = static_cast<moe_dtype>(dtype);
  return c;
}

// ---- layers, parameters ----------------------------------------------------------------------------

bool relu(const moe_config &c) { return c.activation == MOE_ACT_RELU; }

// Random values (never zero) in nn.Linear's range, rounded to dtype. ReLU layers get w1 (and x, below)
// on an exact grid: x W1^T is then exact on every backend and dtype, so no pre-activation can fall on
// different sides of the kink by rounding (the gradients would differ by a whole term).
std::vector<float> random_param(const ParamDesc &p, const moe_config &cfg, Rng &rng, int dtype) {
  const size_t n = static_cast<size_t>(p.numel);
  std::vector<float> v;
  if (p.name == "router.bias") {
    v = rng.nonzeros(n, 0.02f);
  } else {
    const float bound = 1.0f / std::sqrt(static_cast<float>(p.shape.back()));
    if (p.name == "router.noise_weight") {
      v = rng.nonzeros(n, 0.5f * bound);
    } else if (relu(cfg) && (p.name == "experts.w1" || p.name == "shared.w1")) {
      float step = 1.0f;
      while (7.0f * step > bound) step *= 0.5f;
      v = rng.odd_grids(n, 4, step);
    } else {
      v = rng.nonzeros(n, bound);
    }
  }
  return moe_test::rounded(dtype, std::move(v));
}

std::vector<float> random_x(const moe_config &cfg, Rng &rng, int64_t T, int dtype) {
  const size_t n = static_cast<size_t>(T * cfg.d_model);
  return moe_test::rounded(dtype, relu(cfg) ? rng.odd_grids(n, 4, 0.125f) : rng.nonzeros(n, 1.0f));
}

// The tokens whose routing is at a near-tie (support/router.h), in inference and in the training
// forward (step 0), for x and the router's parameters as `layer` holds them.
struct Ties {
  std::vector<char> inference, training;
  bool drawn = false;  // x was drawn without any
};

// x for the comparisons of a CUDA layer with a CPU one: random (random_x), with the rows of tokens
// at a near-tie drawn again until there are none, since cuBLAS's float32 logits and the CPU
// GEMM's differ in their last bits.
std::vector<float> x_without_near_ties(const moe_config &cfg, moe_layer *layer, Rng &rng, int64_t T, int dtype,
                                       Ties *ties) {
  moe_test::RouterInputs in;
  in.cfg = cfg;
  in.T = T;
  in.x = random_x(cfg, rng, T, dtype);
  in.weight = get_param(layer, "router.weight");
  in.bias = get_param(layer, "router.bias");
  if (cfg.noise == MOE_NOISE_GAUSSIAN) in.noise_weight = get_param(layer, "router.noise_weight");
  if (cfg.router_logit_bias) in.logit_bias = get_param(layer, "router.logit_bias");
  ties->drawn = moe_test::draw_without_near_ties(in, 0, rng, [&](Rng &g) { return random_x(cfg, g, 1, dtype); });
  ties->inference = moe_test::near_ties(in, false);
  ties->training = cfg.noise == MOE_NOISE_NONE ? ties->inference : moe_test::near_ties(in, true, 0);
  return in.x;
}

// ---- activations in the layer's dtype: host memory for a CPU layer, device memory for a CUDA one ------

class Io {
 public:
  enum Slot { X, Y, DY, DX, Y2, kSlots };
  Io(bool gpu, int dtype, int64_t n) : gpu_(gpu), dtype_(dtype), n_(static_cast<size_t>(n)) {
    const size_t bytes = std::max<size_t>(1, n_ * moe_test::dtype_size(dtype_));
    for (int i = 0; i < kSlots; ++i) {
      if (gpu_) {
        void *p = nullptr;
        const cudaError_t e = cudaMalloc(&p, bytes);
        if (e != cudaSuccess) {
          ADD_FAILURE() << "cudaMalloc(" << bytes << "): " << cudaGetErrorString(e);
          continue;
        }
        dev_[i] = p;
        (void)cudaMemset(p, 0xff, bytes);  // NaN in every dtype: an output never written shows
      } else {
        host_[i].assign(bytes, 0xff);
      }
    }
  }
  ~Io() {
    for (void *p : dev_)
      if (p) cudaFree(p);
  }
  Io(const Io &) = delete;
  Io &operator=(const Io &) = delete;

  void *ptr(Slot s) { return gpu_ ? dev_[s] : static_cast<void *>(host_[s].data()); }
  // Waits for the device before (earlier calls may still read the buffer: CUDA layers return with
  // their work queued) and after (a pageable cudaMemcpy may return before the data lands, and a
  // layer on a non-blocking stream is not ordered after it).
  void put(Slot s, const std::vector<float> &v) {
    std::vector<unsigned char> bytes = moe_test::encode(dtype_, v);
    if (!gpu_) {
      bytes.resize(host_[s].size());
      host_[s] = std::move(bytes);
      return;
    }
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(dev_[s], bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) ADD_FAILURE() << "copying to the device: " << cudaGetErrorString(e);
  }
  std::vector<float> take(Slot s) {
    std::vector<unsigned char> bytes(n_ * moe_test::dtype_size(dtype_));
    if (!gpu_) {
      std::copy(host_[s].begin(), host_[s].begin() + bytes.size(), bytes.begin());
      return moe_test::decode(dtype_, bytes);
    }
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) ADD_FAILURE() << "cudaDeviceSynchronize: " << cudaGetErrorString(e);
    e = cudaMemcpy(bytes.data(), dev_[s], bytes.size(), cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) ADD_FAILURE() << "cudaMemcpy from the device: " << cudaGetErrorString(e);
    return moe_test::decode(dtype_, bytes);
  }

 private:
  bool gpu_;
  int dtype_;
  size_t n_;
  void *dev_[kSlots] = {};
  std::vector<unsigned char> host_[kSlots];
};

// ---- one inference forward, one training forward and its backward ------------------------------------

struct Outcome {
  std::vector<float> y_inf, y, dx;
  std::vector<int32_t> inf_ids, inf_token, inf_expert;  // the inference routing (moe_route)
  moe_stats stats{};
  std::vector<int64_t> counts;
  std::vector<int32_t> ids;  // token choice: [T,k], -1 dropped
  std::vector<float> weights;
  std::vector<int32_t> a_token, a_expert;  // expert choice: the assignments
  std::vector<float> a_weight;
  std::vector<std::vector<float>> grads;  // by parameter index; empty when not trainable
  std::vector<float> bias_after;
};

Outcome run_layer(moe_layer *l, bool gpu, int dtype, const moe_config &cfg, int64_t T, const std::vector<float> &x,
              const std::vector<float> &dy) {
  Outcome r;
  Io io(gpu, dtype, T * cfg.d_model);
  io.put(Io::X, x);
  io.put(Io::DY, dy);
  {
    // Routing without noise, as the inference forward routes; changes neither the step nor the bias.
    const ContextPtr routed = moe_test::make_context(l);
    MOE_EXPECT_OK(moe_route(l, io.ptr(Io::X), T, routed.get()));
    if (cfg.routing == MOE_ROUTE_EXPERT_CHOICE) {
      const moe_test::Assignments a = moe_test::assignments(routed.get());
      r.inf_token = a.tokens;
      r.inf_expert = a.experts;
    } else {
      r.inf_ids = moe_test::topk(routed.get(), T, cfg.top_k).ids;
    }
  }
  MOE_EXPECT_OK(moe_forward(l, io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr));
  r.y_inf = io.take(Io::Y2);
  const ContextPtr ctx = moe_test::make_context(l);
  MOE_EXPECT_OK(moe_forward(l, io.ptr(Io::X), T, io.ptr(Io::Y), ctx.get()));
  MOE_EXPECT_OK(moe_backward(l, ctx.get(), io.ptr(Io::DY), io.ptr(Io::DX)));
  r.y = io.take(Io::Y);
  r.dx = io.take(Io::DX);
  r.stats.struct_size = sizeof(moe_stats);
  MOE_EXPECT_OK(moe_context_stats(ctx.get(), &r.stats));
  r.counts.assign(static_cast<size_t>(cfg.num_experts), -7);
  MOE_EXPECT_OK(moe_context_expert_counts(ctx.get(), r.counts.data()));
  if (cfg.routing == MOE_ROUTE_EXPERT_CHOICE) {
    int64_t count = -1;
    MOE_EXPECT_OK(moe_context_assignments(ctx.get(), 0, nullptr, nullptr, nullptr, &count));
    if (count >= 0) {
      r.a_token.assign(static_cast<size_t>(count), -7);
      r.a_expert.assign(static_cast<size_t>(count), -7);
      r.a_weight.assign(static_cast<size_t>(count), kNaN);
      MOE_EXPECT_OK(moe_context_assignments(ctx.get(), count, r.a_token.data(), r.a_expert.data(), r.a_weight.data(),
                                            &count));
    }
  } else {
    r.ids.assign(static_cast<size_t>(T * cfg.top_k), -7);
    r.weights.assign(static_cast<size_t>(T * cfg.top_k), kNaN);
    MOE_EXPECT_OK(moe_context_topk(ctx.get(), r.ids.data(), r.weights.data()));
  }
  for (const ParamDesc &p : moe_test::params(l)) {
    r.grads.push_back(p.trainable ? get_grad(l, p) : std::vector<float>());
    if (p.name == "router.bias") r.bias_after = get_param(l, p);
  }
  return r;
}

// The experts each token went to: its top-k ids in choice order (-1 dropped), or for expert choice
// the experts that took it (assignments are ordered by expert). inference: the routing moe_route
// gave, else the training forward's.
std::vector<std::vector<int32_t>> routes(const Outcome &r, const moe_config &cfg, int64_t T, bool inference = false) {
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(T));
  const std::vector<int32_t> &ids = inference ? r.inf_ids : r.ids;
  const std::vector<int32_t> &tok = inference ? r.inf_token : r.a_token, &exp = inference ? r.inf_expert : r.a_expert;
  if (cfg.routing == MOE_ROUTE_EXPERT_CHOICE) {
    for (size_t i = 0; i < tok.size() && i < exp.size(); ++i)
      if (tok[i] >= 0 && tok[i] < T) out[tok[i]].push_back(exp[i]);
  } else if (ids.size() == static_cast<size_t>(T * cfg.top_k)) {
    for (int64_t t = 0; t < T; ++t) out[t].assign(ids.begin() + t * cfg.top_k, ids.begin() + (t + 1) * cfg.top_k);
  }
  return out;
}

// The entries of a tensor [n, width] (parameters: [E, ...] with width its size per expert) whose
// row is kept.
template <class T>
std::vector<T> rows_kept(const std::vector<T> &v, const std::vector<char> &keep) {
  std::vector<T> out;
  if (keep.empty() || v.size() % keep.size() != 0) return out;
  const size_t width = v.size() / keep.size();
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i]) out.insert(out.end(), v.begin() + i * width, v.begin() + (i + 1) * width);
  return out;
}

// Parameters copied to every layer: random values set on the CPU layer and the CUDA one, then what the
// CUDA layer holds read back and set on the CPU layers (float32 copies whatever the dtype; cpu32, if
// given, is a float32 CPU layer that gets the same rounded values).
std::vector<ParamDesc> share_params(moe_layer *cpu, moe_layer *gpu, const moe_config &cfg, int dtype, uint64_t seed,
                                    moe_layer *cpu32 = nullptr) {
  const std::vector<ParamDesc> pc = moe_test::params(cpu), pg = moe_test::params(gpu);
  EXPECT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < std::min(pc.size(), pg.size()); ++i) {
    EXPECT_EQ(pg[i].name, pc[i].name) << "parameter " << i;
    EXPECT_EQ(pg[i].shape, pc[i].shape) << pc[i].name;
    EXPECT_EQ(pg[i].trainable, pc[i].trainable) << pc[i].name;
  }
  Rng rng(seed);
  for (const ParamDesc &p : pc) {
    const std::vector<float> v = random_param(p, cfg, rng, dtype);
    set_param(cpu, p.name, v);
    std::vector<float> held = v;
    if (gpu) {
      set_param(gpu, p.name, v);
      held = get_param(gpu, p);
      // The values are representable in the dtype: stored exactly, whichever tensor holds them.
      EXPECT_TRUE(same("get_param after set_param: " + p.name, held, v));
      set_param(cpu, p.name, held);
    }
    if (cpu32) set_param(cpu32, p.name, held);
  }
  return pc;
}

// ---- the CUDA layer against the CPU layer ------------------------------------------------------------

class GpuLayer : public ::testing::TestWithParam<std::tuple<int, int>> {
 protected:
  void SetUp() override { MOE_GPU_REQUIRE_DEVICE(); }
};

// The CUDA layer's outcome against a CPU layer's (ref names it), to tol of each tensor's scale.
// strict: the CPU layer has the CUDA layer's dtype. Every token must be routed alike but those at
// a near-tie (ties: none when x was drawn without them); where one is routed differently, all
// that such tokens cannot touch is still compared: the other tokens' routing and outputs, the
// gradients of the experts none of them reached and of the shared experts, the z-loss.
void expect_match(const Outcome &rg, const Outcome &rc, const moe_config &gc, const std::vector<ParamDesc> &params,
                  int64_t T, double tol, bool strict, const std::string &ref, const Ties &ties) {
  SCOPED_TRACE("against the " + ref + " CPU layer");
  const int64_t E = gc.num_experts;
  const bool ec = gc.routing == MOE_ROUTE_EXPERT_CHOICE;
  EXPECT_TRUE(ties.drawn) << "x could not be drawn without near-ties; the tokens at one are compared less";

  // Routing, training forward and inference: exact for every token not at a near-tie.
  struct Agreement {
    std::vector<char> token;         // routed alike
    std::vector<char> expert_clean;  // no token routed differently reached it, on either side
    bool all = true;
  };
  auto agreement = [&](bool inference) {
    const auto c = routes(rc, gc, T, inference), g = routes(rg, gc, T, inference);
    const std::vector<char> &near = inference ? ties.inference : ties.training;
    Agreement a;
    a.token.assign(static_cast<size_t>(T), 1);
    a.expert_clean.assign(static_cast<size_t>(E), 1);
    std::string unexplained;
    for (int64_t t = 0; t < T; ++t) {
      if (c[t] == g[t]) continue;
      a.token[t] = 0;
      a.all = false;
      for (const auto *side : {&c[t], &g[t]})
        for (int32_t e : *side)
          if (e >= 0 && e < E) a.expert_clean[e] = 0;
      if (!(static_cast<size_t>(t) < near.size() && near[t]) && unexplained.size() < 200) {
        unexplained += ' ';
        unexplained += std::to_string(t);
      }
    }
    EXPECT_TRUE(unexplained.empty()) << (inference ? "inference" : "training")
                                     << " routing differs for tokens not at a near-tie:" << unexplained;
    return a;
  };
  const Agreement train = agreement(false), inf = agreement(true);
  const std::vector<char> &agree = train.token;

  if (ec) {
    if (train.all) {
      EXPECT_TRUE(same("assignments: token", rg.a_token, rc.a_token));
      EXPECT_TRUE(same("assignments: expert", rg.a_expert, rc.a_expert));
      EXPECT_TRUE(close("assignments: weight", rg.a_weight, rc.a_weight, tol));
    }
  } else {
    EXPECT_TRUE(same("moe_context_topk ids (tokens routed alike)", rows_kept(rg.ids, agree), rows_kept(rc.ids, agree)));
    EXPECT_TRUE(close("moe_context_topk weights (tokens routed alike)", rows_kept(rg.weights, agree),
                      rows_kept(rc.weights, agree), tol));
  }

  // Outputs of the tokens routed alike (every token, normally).
  EXPECT_TRUE(close("y", rows_kept(rg.y, agree), rows_kept(rc.y, agree), tol));
  EXPECT_TRUE(close("inference y", rows_kept(rg.y_inf, inf.token), rows_kept(rc.y_inf, inf.token), tol));
  // A token's dx also holds the router's gradient, which the aux losses tie to every token's routing.
  const bool global_aux = gc.aux_loss_coef != 0.0f || gc.importance_loss_coef != 0.0f || gc.load_loss_coef != 0.0f;
  if (train.all || !global_aux) {
    EXPECT_TRUE(close("dx", rows_kept(rg.dx, agree), rows_kept(rc.dx, agree), tol));
  }
  // Without noise, the training forward's y is the inference forward's.
  if (strict && gc.noise == MOE_NOISE_NONE) {
    EXPECT_TRUE(close("inference y vs training y (CUDA)", rg.y_inf, rg.y, tol));
  }

  // Statistics. The z-loss does not depend on the routing; the rest does.
  const std::vector<double> sg = stats_fields(rg.stats), sc = stats_fields(rc.stats);
  EXPECT_EQ(rg.stats.num_tokens, T);
  EXPECT_TRUE(close_scalar("z_loss", rg.stats.z_loss, rc.stats.z_loss, tol, 1e-6));
  if (train.all) {
    for (size_t i = 0; i < sg.size(); ++i)
      EXPECT_TRUE(close_scalar(std::string("stats.") + moe_test::kStatNames[i], sg[i], sc[i], i < 3 ? 0.0 : tol, 1e-6));
  }
  EXPECT_TRUE(same("moe_context_expert_counts (experts no differently routed token reached)",
                   rows_kept(rg.counts, train.expert_clean), rows_kept(rc.counts, train.expert_clean)));
  // Gradients: the shared experts' never depend on the routing; each routed expert's on the tokens
  // it took; the router's on every token (softmax, aux losses).
  for (size_t i = 0; i < params.size() && i < rc.grads.size() && i < rg.grads.size(); ++i) {
    if (!params[i].trainable) continue;
    const std::string &n = params[i].name;
    if (moe_test::is_expert_param(n)) {
      EXPECT_TRUE(close("grad " + n + " (experts no differently routed token reached)",
                        rows_kept(rg.grads[i], train.expert_clean), rows_kept(rc.grads[i], train.expert_clean), tol));
    } else if (train.all || n.rfind("shared.", 0) == 0) {
      EXPECT_TRUE(close("grad " + n, rg.grads[i], rc.grads[i], tol));
    }
  }
  // The aux-loss-free bias update (deepseek-v3) moved router.bias the same way.
  if (train.all) {
    if (gc.dtype == MOE_DTYPE_F32) {
      EXPECT_TRUE(same("router.bias after the training forward", rg.bias_after, rc.bias_after));
    } else {
      EXPECT_TRUE(close("router.bias after the training forward", rg.bias_after, rc.bias_after, tol));
    }
  }
}

TEST_P(GpuLayer, MatchesCpu) {
  const int ci = std::get<0>(GetParam()), dtype = std::get<1>(GetParam());
  const moe_config c32 = config_of(ci), gc = cuda_config(c32, dtype);
  moe_config cc = c32;
  cc.dtype = static_cast<moe_dtype>(dtype);
  const int64_t T = kT, d = cc.d_model;
  moe_status st;
  LayerPtr cpu = make_layer(cc, &st);
  ASSERT_EQ(st, MOE_OK) << "creating the CPU layer (" << dtype_name(dtype) << "): " << moe_last_error();
  LayerPtr gpu = make_layer(gc, &st);
  ASSERT_EQ(st, MOE_OK) << "creating the CUDA layer (" << dtype_name(dtype) << "): " << moe_last_error();
  LayerPtr cpu32;
  if (dtype != MOE_DTYPE_F32) {
    cpu32 = make_layer(c32);
    ASSERT_TRUE(cpu32);
  }
  ASSERT_TRUE(cpu && gpu);
  const std::vector<ParamDesc> params = share_params(cpu.get(), gpu.get(), cc, dtype, 1000 + ci, cpu32.get());
  Rng rng(2000 + ci);
  Ties ties;
  const std::vector<float> x = x_without_near_ties(cc, cpu.get(), rng, T, dtype, &ties);
  const std::vector<float> dy = moe_test::rounded(dtype, rng.nonzeros(static_cast<size_t>(T * d), 1.0f));

  const Outcome rc = run_layer(cpu.get(), false, dtype, cc, T, x, dy);
  const Outcome rg = run_layer(gpu.get(), true, dtype, gc, T, x, dy);
  ASSERT_FALSE(HasFailure());
  expect_match(rg, rc, gc, params, T, tol_of(dtype), true, dtype_name(dtype), ties);
  if (cpu32) {
    const Outcome r32 = run_layer(cpu32.get(), false, MOE_DTYPE_F32, c32, T, x, dy);
    expect_match(rg, r32, gc, params, T, loose_tol_of(dtype), false, "f32", ties);
  }
}

// Two CUDA layers with the same parameters and inputs give the same bits; a layer gives the same
// bits run after run (configurations without noise and bias updates, whose next step differs).
TEST_P(GpuLayer, Deterministic) {
  const int ci = std::get<0>(GetParam()), dtype = std::get<1>(GetParam());
  const moe_config gc = cuda_config(config_of(ci), dtype);
  const int64_t T = kT;
  moe_status st;
  LayerPtr a = make_layer(gc, &st);
  ASSERT_EQ(st, MOE_OK) << moe_last_error();
  LayerPtr b = make_layer(gc, &st);
  ASSERT_EQ(st, MOE_OK) << moe_last_error();
  const std::vector<ParamDesc> params = moe_test::params(a.get());
  Rng rng(3000 + ci);
  for (const ParamDesc &p : params) {
    const std::vector<float> v = random_param(p, gc, rng, dtype);
    set_param(a.get(), p.name, v);
    set_param(b.get(), p.name, v);
  }
  const std::vector<float> x = random_x(gc, rng, T, dtype);
  const std::vector<float> dy = moe_test::rounded(dtype, rng.nonzeros(static_cast<size_t>(T * gc.d_model), 1.0f));
  const Outcome ra = run_layer(a.get(), true, dtype, gc, T, x, dy);
  const Outcome rb = run_layer(b.get(), true, dtype, gc, T, x, dy);
  auto expect_same = [&](const Outcome &p, const Outcome &q, const std::string &what) {
    EXPECT_TRUE(same(what + ": inference y", p.y_inf, q.y_inf));
    EXPECT_TRUE(same(what + ": y", p.y, q.y));
    EXPECT_TRUE(same(what + ": dx", p.dx, q.dx));
    EXPECT_TRUE(same(what + ": stats", stats_fields(p.stats), stats_fields(q.stats)));
    EXPECT_TRUE(same(what + ": counts", p.counts, q.counts));
    EXPECT_TRUE(same(what + ": topk ids", p.ids, q.ids));
    EXPECT_TRUE(same(what + ": topk weights", p.weights, q.weights));
    EXPECT_TRUE(same(what + ": assignments", p.a_token, q.a_token));
    for (size_t i = 0; i < params.size() && i < p.grads.size() && i < q.grads.size(); ++i)
      EXPECT_TRUE(same(what + ": grad " + params[i].name, p.grads[i], q.grads[i]));
  };
  expect_same(rb, ra, "two layers");
  if (gc.noise == MOE_NOISE_NONE && gc.bias_update_rate == 0.0f) {
    MOE_EXPECT_OK(moe_layer_zero_grad(a.get()));
    const Outcome again = run_layer(a.get(), true, dtype, gc, T, x, dy);
    expect_same(again, ra, "the same layer again");
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, GpuLayer,
                         ::testing::Combine(::testing::Range(0, kNumCases),
                                            ::testing::Values(static_cast<int>(MOE_DTYPE_F32),
                                                              static_cast<int>(MOE_DTYPE_BF16),
                                                              static_cast<int>(MOE_DTYPE_F16))),
                         [](const ::testing::TestParamInfo<std::tuple<int, int>> &info) {
                           return std::string(kCases[std::get<0>(info.param)].name) + "_" +
                                  dtype_name(std::get<1>(info.param));
                         });

// ---- the API around a CUDA layer -------------------------------------------------------------------

class GpuLayerApi : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_GPU_REQUIRE_DEVICE();
    cfg_ = cuda_config(config_of(0), MOE_DTYPE_F32);  // mixtral, shrunk
  }
  // A CUDA layer with the parameters of seed.
  LayerPtr layer(uint64_t seed, int dtype = MOE_DTYPE_F32) {
    moe_config c = cfg_;
    c.dtype = static_cast<moe_dtype>(dtype);
    LayerPtr l = make_layer(c);
    if (!l) return l;
    Rng rng(seed);
    for (const ParamDesc &p : moe_test::params(l.get())) set_param(l.get(), p.name, random_param(p, c, rng, dtype));
    return l;
  }
  moe_config cfg_{};
};

TEST_F(GpuLayerApi, HostPointersAreRefused) {
  const int64_t T = kT, d = cfg_.d_model;
  LayerPtr l = layer(1), ref = layer(1);
  ASSERT_TRUE(l && ref);
  Rng rng(2);
  const std::vector<float> x = rng.nonzeros(static_cast<size_t>(T * d), 1.0f),
                           dy = rng.nonzeros(static_cast<size_t>(T * d), 1.0f);
  Io io(true, MOE_DTYPE_F32, T * d);
  io.put(Io::X, x);
  io.put(Io::DY, dy);
  ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_OK) << moe_last_error();
  const std::vector<float> y_before = io.take(Io::Y2);

  std::vector<float> host(static_cast<size_t>(T * d), 1.0f), host_out(static_cast<size_t>(T * d), kNaN);
  EXPECT_EQ(moe_forward(l.get(), host.data(), T, io.ptr(Io::Y), nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_GT(std::strlen(moe_last_error()), 0u) << "no message for a host x";
  EXPECT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, host_out.data(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_GT(std::strlen(moe_last_error()), 0u) << "no message for a host y";
  for (float v : host_out) ASSERT_TRUE(std::isnan(v)) << "a refused forward wrote the host y";

  const ContextPtr ctx = moe_test::make_context(l.get());
  ASSERT_NE(ctx, nullptr);
  EXPECT_EQ(moe_forward(l.get(), host.data(), T, io.ptr(Io::Y), ctx.get()), MOE_ERR_INVALID_ARGUMENT);
  ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y), ctx.get()), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_backward(l.get(), ctx.get(), host.data(), io.ptr(Io::DX)), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_GT(std::strlen(moe_last_error()), 0u) << "no message for a host dy";
  EXPECT_EQ(moe_backward(l.get(), ctx.get(), io.ptr(Io::DY), host_out.data()), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_GT(std::strlen(moe_last_error()), 0u) << "no message for a host dx";
  // The layer still works, and the refused calls changed nothing (no gradient accumulated).
  ASSERT_EQ(moe_backward(l.get(), ctx.get(), io.ptr(Io::DY), io.ptr(Io::DX)), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_OK) << moe_last_error();
  EXPECT_TRUE(same("inference y after the refused calls", io.take(Io::Y2), y_before));
  const Outcome rr = run_layer(ref.get(), true, MOE_DTYPE_F32, cfg_, T, x, dy);
  EXPECT_TRUE(same("dx after the refused calls", io.take(Io::DX), rr.dx));
  const std::vector<ParamDesc> params = moe_test::params(l.get());
  for (size_t i = 0; i < params.size() && i < rr.grads.size(); ++i) {
    if (params[i].trainable) {
      EXPECT_TRUE(same("grad " + params[i].name + " after the refused calls", get_grad(l.get(), params[i]),
                       rr.grads[i]));
    }
  }
}

TEST_F(GpuLayerApi, SetStream) {
  const int64_t T = kT, d = cfg_.d_model;
  LayerPtr a = layer(3), b = layer(3);
  ASSERT_TRUE(a && b);
  Rng rng(4);
  const std::vector<float> x = rng.nonzeros(static_cast<size_t>(T * d), 1.0f),
                           dy = rng.nonzeros(static_cast<size_t>(T * d), 1.0f);
  const Outcome ra = run_layer(a.get(), true, MOE_DTYPE_F32, cfg_, T, x, dy);
  cudaStream_t stream = nullptr;
  CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::unique_ptr<CUstream_st, decltype(&cudaStreamDestroy)> owner(stream, &cudaStreamDestroy);
  ASSERT_EQ(moe_layer_set_stream(b.get(), stream), MOE_OK) << moe_last_error();
  // Forward, backward, statistics and gradients read back on the caller's (non-blocking) stream.
  const Outcome rb = run_layer(b.get(), true, MOE_DTYPE_F32, cfg_, T, x, dy);
  CUDA_EXPECT(cudaStreamSynchronize(stream));
  EXPECT_TRUE(close("inference y", rb.y_inf, ra.y_inf, 1e-5));
  EXPECT_TRUE(close("y", rb.y, ra.y, 1e-5));
  EXPECT_TRUE(close("dx", rb.dx, ra.dx, 1e-5));
  EXPECT_TRUE(same("counts", rb.counts, ra.counts));
  EXPECT_TRUE(same("topk ids", rb.ids, ra.ids));
  const std::vector<ParamDesc> params = moe_test::params(a.get());
  for (size_t i = 0; i < params.size() && i < ra.grads.size() && i < rb.grads.size(); ++i)
    if (params[i].trainable) { EXPECT_TRUE(close("grad " + params[i].name, rb.grads[i], ra.grads[i], 1e-5)); }
  EXPECT_EQ(moe_layer_set_stream(b.get(), nullptr), MOE_OK) << moe_last_error();
  // A CPU layer takes no stream.
  moe_config cc = cfg_;
  cc.device = MOE_DEVICE_CPU;
  LayerPtr cpu = make_layer(cc);
  ASSERT_TRUE(cpu);
  EXPECT_EQ(moe_layer_set_stream(cpu.get(), stream), MOE_ERR_INVALID_ARGUMENT);
}

// A CUDA layer's memory pool holds its buffers and those of its contexts (device_pool), keeps what
// is freed for reuse, and gives a context's memory back to the device when the context is destroyed.
TEST_F(GpuLayerApi, DevicePoolGivesBackAContextsMemory) {
  const int64_t T = 8192, d = cfg_.d_model;
  LayerPtr l = layer(9);
  ASSERT_TRUE(l);
  auto memory = [&] {
    moe_memory m{};
    m.struct_size = sizeof m;
    EXPECT_EQ(moe_layer_memory(l.get(), &m), MOE_OK) << moe_last_error();
    return m;
  };
  const moe_memory m0 = memory();
  EXPECT_GE(m0.device_pool, m0.parameters + m0.gradients);
  Rng rng(10);
  Io io(true, MOE_DTYPE_F32, T * d);
  io.put(Io::X, rng.nonzeros(static_cast<size_t>(T * d), 1.0f));
  io.put(Io::DY, rng.nonzeros(static_cast<size_t>(T * d), 1.0f));
  ContextPtr ctx = moe_test::make_context(l.get());
  ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y), ctx.get()), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_backward(l.get(), ctx.get(), io.ptr(Io::DY), io.ptr(Io::DX)), MOE_OK) << moe_last_error();
  size_t ctx_bytes = 0;
  ASSERT_EQ(moe_context_memory(ctx.get(), &ctx_bytes), MOE_OK);
  ASSERT_GT(ctx_bytes, size_t{16} << 20) << "the test wants a context far larger than the pool's granularity";
  const moe_memory m1 = memory();
  EXPECT_GE(m1.device_pool, m1.parameters + m1.gradients + m1.workspace + ctx_bytes);
  ctx.reset();
  const moe_memory m2 = memory();
  EXPECT_LE(m2.device_pool + ctx_bytes / 2, m1.device_pool) << "the destroyed context's memory stayed in the pool";
  EXPECT_GE(m2.device_pool, m2.parameters + m2.gradients + m2.workspace);
  // The layer still works, and its next context is allocated anew.
  EXPECT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_OK) << moe_last_error();
}

TEST_F(GpuLayerApi, MissingDeviceIsRefused) {
  for (int index : {gpu_test::device_count(), gpu_test::device_count() + 7}) {
    moe_config c = cfg_;
    c.device_index = index;
    moe_layer *sentinel = reinterpret_cast<moe_layer *>(uintptr_t{0x1234});
    moe_layer *out = sentinel;
    const moe_status s = moe_layer_create(&c, &out);
    EXPECT_TRUE(s == MOE_ERR_DEVICE || s == MOE_ERR_INVALID_ARGUMENT)
        << "device_index " << index << " gave " << moe_status_name(s);
    EXPECT_GT(std::strlen(moe_last_error()), 0u) << "no message for device_index " << index;
    EXPECT_EQ(out, sentinel) << "a failed create wrote *out";
    if (s == MOE_OK && out != sentinel) moe_layer_destroy(out);
  }
}

TEST_F(GpuLayerApi, ParamBuffersAreDevicePointers) {
  for (int dtype : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
    SCOPED_TRACE(dtype_name(dtype));
    cfg_.num_shared_experts = 1;  // shared.w1 / w2 / w3 and shared.gate too
    cfg_.d_ff_shared = 32;
    cfg_.shared_gate = 1;
    LayerPtr l = layer(5, dtype);
    ASSERT_TRUE(l);
    int device = -1;
    CUDA_ASSERT(cudaGetDevice(&device));
    Rng rng(6);
    for (const ParamDesc &p : moe_test::params(l.get())) {
      SCOPED_TRACE(p.name);
      const int sd = moe_test::stored_dtype(p.name, dtype);
      void *data = nullptr, *grad = reinterpret_cast<void *>(uintptr_t{1});
      ASSERT_EQ(moe_layer_param_buffers(l.get(), p.name.c_str(), &data, &grad), MOE_OK) << moe_last_error();
      ASSERT_NE(data, nullptr);
      cudaPointerAttributes attr{};
      CUDA_ASSERT(cudaPointerGetAttributes(&attr, data));
      EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
      EXPECT_EQ(attr.device, device);
      if (p.trainable) {
        ASSERT_NE(grad, nullptr);
        CUDA_ASSERT(cudaPointerGetAttributes(&attr, grad));
        EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
        // The gradient is stored like the parameter: after zero_grad it reads as zeros of that size.
        MOE_EXPECT_OK(moe_layer_zero_grad(l.get()));
        CUDA_ASSERT(cudaDeviceSynchronize());
        std::vector<unsigned char> gbytes(static_cast<size_t>(p.numel) * moe_test::dtype_size(sd), 0xa5);
        CUDA_ASSERT(cudaMemcpy(gbytes.data(), grad, gbytes.size(), cudaMemcpyDeviceToHost));
        EXPECT_TRUE(same("gradient buffer after zero_grad", moe_test::decode(sd, gbytes),
                         std::vector<float>(static_cast<size_t>(p.numel), 0.0f)));
      } else {
        EXPECT_EQ(grad, nullptr) << "a parameter that is not trainable has no gradient buffer";
      }
      // Contiguous, in the documented shape, in the dtype it is stored in: the same values as
      // moe_layer_get_param ...
      std::vector<unsigned char> bytes(static_cast<size_t>(p.numel) * moe_test::dtype_size(sd));
      CUDA_ASSERT(cudaDeviceSynchronize());
      CUDA_ASSERT(cudaMemcpy(bytes.data(), data, bytes.size(), cudaMemcpyDeviceToHost));
      EXPECT_TRUE(same("buffer contents", moe_test::decode(sd, bytes), get_param(l.get(), p)));
      // ... and writing through it is what moe_layer_get_param then reads.
      const std::vector<float> fresh = moe_test::rounded(sd, rng.nonzeros(static_cast<size_t>(p.numel), 0.1f));
      const std::vector<unsigned char> fresh_bytes = moe_test::encode(sd, fresh);
      CUDA_ASSERT(cudaMemcpy(data, fresh_bytes.data(), fresh_bytes.size(), cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaDeviceSynchronize());
      EXPECT_TRUE(same("get_param after writing the buffer", get_param(l.get(), p), fresh));
    }
    void *data = nullptr;
    EXPECT_EQ(moe_layer_param_buffers(l.get(), "no.such", &data, nullptr), MOE_ERR_INVALID_ARGUMENT);
  }
}

TEST_F(GpuLayerApi, CheckFinite) {
  const int64_t T = kT, d = cfg_.d_model;
  cfg_.check_finite = 1;
  for (int dtype : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
    SCOPED_TRACE(dtype_name(dtype));
    LayerPtr l = layer(7, dtype);
    ASSERT_TRUE(l);
    Rng rng(8);
    const std::vector<float> x = moe_test::rounded(dtype, rng.nonzeros(static_cast<size_t>(T * d), 1.0f));
    Io io(true, dtype, T * d);
    io.put(Io::X, x);
    ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y), nullptr), MOE_OK) << moe_last_error();
    const std::vector<float> y = io.take(Io::Y);
    std::vector<float> bad = x;
    bad[static_cast<size_t>(41 * d + 5)] = std::numeric_limits<float>::infinity();
    bad[static_cast<size_t>(60 * d + 1)] = kNaN;
    io.put(Io::X, bad);
    EXPECT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_ERR_NONFINITE);
    EXPECT_NE(std::strstr(moe_last_error(), "[41][5]"), nullptr) << moe_last_error();
    if (dtype == MOE_DTYPE_F16) {
      // Finite in float32 but not in float16: x is already stored in the dtype, so it arrives as Inf.
      bad = x;
      bad[static_cast<size_t>(7 * d + 3)] = 1.0e5f;
      io.put(Io::X, bad);
      EXPECT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_ERR_NONFINITE);
      EXPECT_NE(std::strstr(moe_last_error(), "[7][3]"), nullptr) << moe_last_error();
    }
    io.put(Io::X, x);
    ASSERT_EQ(moe_forward(l.get(), io.ptr(Io::X), T, io.ptr(Io::Y2), nullptr), MOE_OK) << moe_last_error();
    EXPECT_TRUE(same("y after a refused forward", io.take(Io::Y2), y));
  }
}

}  // namespace
