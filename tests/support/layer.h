// Layers through the public C API (moe.h): owners, configurations, parameters by name, and what a
// context holds after a forward. A call that fails is a test failure naming the call, its status
// and moe_last_error(); the helpers then give empty or NaN-filled results.
#pragma once

#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

// A libmoe call that must succeed: the failure names the call, the status and moe_last_error().
#define MOE_EXPECT_OK(call)                                                                             \
  do {                                                                                                  \
    const moe_status moe_test_s_ = (call);                                                              \
    EXPECT_EQ(moe_test_s_, MOE_OK) << #call << ": " << moe_status_name(moe_test_s_) << ": " << moe_last_error(); \
  } while (0)

namespace moe_test {

struct LayerDeleter {
  void operator()(moe_layer *l) const { moe_layer_destroy(l); }
};
struct ContextDeleter {
  void operator()(moe_context *c) const { moe_context_destroy(c); }
};
using LayerPtr = std::unique_ptr<moe_layer, LayerDeleter>;
using ContextPtr = std::unique_ptr<moe_context, ContextDeleter>;

// moe_layer_create; NULL when it fails, which is a test failure.
LayerPtr make_layer(const moe_config &cfg);
// The same where the test judges the outcome: *status is what moe_layer_create returned.
LayerPtr make_layer(const moe_config &cfg, moe_status *status);
ContextPtr make_context(moe_layer *layer);

// moe_config_init with the sizes most tests set.
moe_config config(int64_t d_model, int64_t d_ff, int64_t num_experts = 8, int64_t top_k = 2, uint64_t seed = 0);
// moe_config_preset, then the widths (a preset leaves them 0).
moe_config preset(const char *name, int64_t d_model, int64_t d_ff);
// A preset with more than 16 experts (deepseek-v3: 256 in 8 groups, top-8) cut down to test size:
// 16 experts, 4 groups keeping 2 where it groups them, top_k at most 4.
void at_most_16_experts(moe_config &cfg);

// moe_layer_param_info of one parameter.
struct Param {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool trainable = false;
};
std::vector<Param> params(const moe_layer *layer);

// Host copies (float32 whatever the dtype), by name or by the Param of params().
std::vector<float> get_param(const moe_layer *layer, const Param &p);
std::vector<float> get_param(const moe_layer *layer, const std::string &name);
std::vector<float> get_grad(const moe_layer *layer, const Param &p);
std::vector<float> get_grad(const moe_layer *layer, const std::string &name);
void set_param(moe_layer *layer, const std::string &name, const std::vector<float> &v);
// Every parameter's values, in index order.
std::vector<std::vector<float>> all_params(const moe_layer *layer);
// Every parameter's values by its libmoe name.
std::map<std::string, std::vector<float>> params_by_name(const moe_layer *layer);
// Whether two all_params() snapshots hold the same bits.
bool bitwise_equal(const std::vector<std::vector<float>> &a, const std::vector<std::vector<float>> &b);
// Rows [r0, r0 + n) of expert e of a [E, R, C] tensor (row-major values).
std::vector<float> expert_block(const std::vector<float> &v, int64_t e, int64_t R, int64_t C, int64_t r0, int64_t n);
// gpt-oss's expert tensors (transformers' GptOssMLP) from a layer's parameters by name (experts.w1,
// w3, w2, b1, b3): gate_up_proj [E, d, 2 d_ff] (gate and up columns interleaved, [in, out]), its
// bias [E, 2 d_ff], down_proj [E, d_ff, d].
struct GptOssExperts {
  std::vector<float> gate_up, gate_up_bias, down;
};
GptOssExperts gpt_oss_experts(const std::map<std::string, std::vector<float>> &w, int64_t E, int64_t d, int64_t ff);
// moe_layer_param_dtype: the dtype the layer stores the parameter in.
int param_dtype(const moe_layer *layer, const std::string &name);
// The dtype moe.h says a parameter of a layer of layer_dtype is stored in: experts.* and shared.w*
// in the layer's dtype, the router's and the shared gate's in float32.
int stored_dtype(const std::string &name, int layer_dtype);
bool is_expert_param(const std::string &name);  // experts.*: split over the ranks of a comm

moe_stats stats(moe_context *ctx);
// The fields of moe_stats as doubles, named by kStatNames.
std::vector<double> stats_fields(const moe_stats &s);
extern const char *const kStatNames[10];
std::vector<int64_t> expert_counts(moe_context *ctx, int64_t num_experts);

struct TopK {
  std::vector<int32_t> ids;  // [T,k], -1 where the slot was dropped
  std::vector<float> weights;
};
TopK topk(moe_context *ctx, int64_t T, int64_t k);

// moe_context_assignments: every (token, expert, weight) the routing kept.
struct Assignments {
  std::vector<int32_t> tokens, experts;
  std::vector<float> weights;
};
Assignments assignments(moe_context *ctx);

}  // namespace moe_test
