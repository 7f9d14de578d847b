// The backend stage table (core/backend.h) driven from host vectors, as the core drives it: the
// CPU backend as a fixture, and select / plan runs whose outputs start as NaN (floats) or -7
// (integers), so that an output a stage forgets to write shows. For tests linked with moe_internal.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "random.h"

namespace moe_test {

// A fixture with the CPU backend's table (ops) and one state of it. Base: ::testing::Test, or
// ::testing::TestWithParam<P> for a parameterized suite.
template <class Base = ::testing::Test>
class CpuBackendTest : public Base {
 protected:
  void SetUp() override {
    ops = moe_cpu_backend();
    ASSERT_NE(ops, nullptr);
    moe_config cfg;
    moe::config_defaults(&cfg);
    cfg.d_model = 4;
    cfg.d_ff = 4;
    ASSERT_EQ(ops->create(&cfg, &state), MOE_OK);
  }
  void TearDown() override {
    if (state) ops->destroy(state);
    state = nullptr;
  }
  std::string err() const { return ops->last_error(state); }

  const moe_backend_ops *ops = nullptr;
  void *state = nullptr;
};

struct SelectParams {
  int64_t k = 1;
  int score = MOE_SCORE_SOFTMAX;
  int normalize = 1;
  float routed_scale = 1.0f;
  int64_t groups = 1, topk_groups = 1;
  int expert_choice = 0;
};

struct SelectOut {
  std::vector<float> scores, lse, topk_w;
  std::vector<int32_t> ids;
  std::vector<int64_t> counts;
  std::vector<double> prob_sum, load_sum;  // load_sum: GAUSSIAN training only
  double lse_sq_sum = std::numeric_limits<double>::quiet_NaN();
};

// The scalar arguments of the stages (offsets: host memory, as the core passes them); the caller
// sets the tensors (host or device memory).
moe_select_args select_args(int64_t T, int64_t E, const SelectParams &p);
moe_plan_args plan_args(int64_t T, int64_t E, int64_t k, int64_t capacity, int policy = MOE_DROP_POSITION);
moe_ffn_args ffn_args(int64_t num_experts, int64_t d, int64_t ff, int activation, const std::vector<int64_t> &offsets,
                      int dtype = MOE_DTYPE_F32);
moe_shared_args shared_args(int64_t T, int64_t d, int64_t S, int dtype = MOE_DTYPE_F32);

// select over T tokens and E experts into o. clean_logits and noise_std (both or neither): GAUSSIAN
// training, which also asks for load_sum.
moe_status run_select(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, const SelectParams &p,
                      const std::vector<float> &logits, const std::vector<float> &bias, SelectOut &o,
                      const std::vector<float> *clean_logits = nullptr, const std::vector<float> *noise_std = nullptr);

// A plan and what it was made from.
struct Plan {
  int64_t T = 0, E = 0, k = 0, capacity = -1, R = 0;
  int64_t group_size = 0, last_capacity = -1;  // capacity groups (moe_plan_args)
  bool ec = false;
  std::vector<int32_t> ids;                               // token choice: the plan's input
  std::vector<float> topk_w;                              // token choice: the plan's input
  std::vector<float> scores;                              // expert choice: the plan's input
  std::vector<int32_t> row_of_slot, row_token, row_slot;  // [T*k] / [rows]
  std::vector<float> row_weight;
  std::vector<int64_t> offsets, kept, token_offsets;
  std::vector<int32_t> token_rows;
  std::vector<double> weight_sum;
  int64_t rows_cap() const;
};

// Token choice: the plan of ids and weights w ([T,k]) with capacity (< 0: dropless) and policy;
// group_size > 0: capacity per group of that many tokens, last_capacity for a shorter last group.
moe_status run_plan(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, int64_t k, int64_t capacity,
                    int policy, const std::vector<int32_t> &ids, const std::vector<float> &w, Plan &p,
                    int64_t group_size = 0, int64_t last_capacity = -1);
// Expert choice: each expert takes its capacity best tokens by scores [T,E] (of each group).
moe_status run_plan_ec(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, int64_t k, int64_t capacity,
                       const std::vector<float> &scores, Plan &p, int64_t group_size = 0,
                       int64_t last_capacity = -1);

// The routing arguments of dispatch / combine and their backward, on the plan's host vectors.
moe_rows_args rows_args(const Plan &p, int64_t d, int dtype = MOE_DTYPE_F32);

// k distinct experts per token, skewed towards some experts so that a capacity overflows.
std::vector<int32_t> skewed_ids(Rng &rng, int64_t T, int64_t E, int64_t k);

}  // namespace moe_test
