#include "stages.h"

#include <algorithm>
#include <utility>

#include "core/capacity_groups.h"

namespace moe_test {

namespace {
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kDNaN = std::numeric_limits<double>::quiet_NaN();
}  // namespace

moe_select_args select_args(int64_t T, int64_t E, const SelectParams &p) {
  moe_select_args a{};
  a.T = T;
  a.E = E;
  a.k = p.k;
  a.score = p.score;
  a.normalize = p.normalize;
  a.routed_scale = p.routed_scale;
  a.num_groups = p.groups;
  a.topk_groups = p.topk_groups;
  a.expert_choice = p.expert_choice;
  return a;
}

moe_plan_args plan_args(int64_t T, int64_t E, int64_t k, int64_t capacity, int policy) {
  moe_plan_args a{};
  a.T = T;
  a.E = E;
  a.k = k;
  a.capacity = capacity;
  a.drop_policy = policy;
  return a;
}

moe_ffn_args ffn_args(int64_t num_experts, int64_t d, int64_t ff, int activation, const std::vector<int64_t> &offsets,
                      int dtype) {
  moe_ffn_args a{};
  a.num_experts = num_experts;
  a.d = d;
  a.ff = ff;
  a.activation = activation;
  a.dtype = dtype;
  a.offsets = offsets.data();
  return a;
}

moe_shared_args shared_args(int64_t T, int64_t d, int64_t S, int dtype) {
  moe_shared_args a{};
  a.T = T;
  a.d = d;
  a.S = S;
  a.dtype = dtype;
  return a;
}

moe_status run_select(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, const SelectParams &p,
                      const std::vector<float> &logits, const std::vector<float> &bias, SelectOut &o,
                      const std::vector<float> *clean_logits, const std::vector<float> *noise_std) {
  const bool load = clean_logits && noise_std;
  o.scores.assign(T * E, kNaN);
  o.lse.assign(T, kNaN);
  o.topk_w.assign(T * p.k, kNaN);
  o.ids.assign(T * p.k, -7);
  o.counts.assign(E, -7);
  o.prob_sum.assign(E, kDNaN);
  o.load_sum.assign(load ? E : 0, kDNaN);
  o.lse_sq_sum = kDNaN;
  moe_select_args a = select_args(T, E, p);
  a.logits = logits.data();
  a.bias = bias.data();
  a.scores = o.scores.data();
  a.lse = o.lse.data();
  a.topk_ids = o.ids.data();
  a.topk_w = o.topk_w.data();
  if (load) {
    a.clean_logits = clean_logits->data();
    a.noise_std = noise_std->data();
    a.load_sum = o.load_sum.data();
  }
  a.counts = o.counts.data();
  a.prob_sum = o.prob_sum.data();
  a.lse_sq_sum = &o.lse_sq_sum;
  return ops->select(state, &a);
}

int64_t Plan::rows_cap() const {
  return ec ? E * moe::capacity_groups(T, group_size, capacity, last_capacity).taken() : T * k;
}

namespace {

// A plan of T tokens (ec: expert choice) with its outputs sized and set to -7 / NaN, and the
// arguments of the stage that write them.
moe_plan_args new_plan(Plan &p, int64_t T, int64_t E, int64_t k, int64_t capacity, bool ec, int policy,
                       int64_t group_size, int64_t last_capacity) {
  p.T = T;
  p.E = E;
  p.k = k;
  p.capacity = capacity;
  p.group_size = group_size;
  p.last_capacity = last_capacity;
  p.ec = ec;
  const size_t rows = static_cast<size_t>(p.rows_cap());
  p.row_of_slot.assign(T * k, -7);
  p.row_token.assign(rows, -7);
  p.row_slot.assign(rows, -7);
  p.row_weight.assign(rows, kNaN);
  p.offsets.assign(E + 1, -7);
  p.kept.assign(E, -7);
  p.weight_sum.assign(E, kDNaN);
  moe_plan_args a = plan_args(T, E, k, capacity, policy);
  a.group_size = group_size;
  a.last_capacity = last_capacity;
  a.row_of_slot = p.row_of_slot.data();
  a.row_token = p.row_token.data();
  a.row_slot = p.row_slot.data();
  a.row_weight = p.row_weight.data();
  a.offsets = p.offsets.data();
  a.kept = p.kept.data();
  a.weight_sum = p.weight_sum.data();
  return a;
}

}  // namespace

moe_status run_plan(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, int64_t k, int64_t capacity,
                    int policy, const std::vector<int32_t> &ids, const std::vector<float> &w, Plan &p,
                    int64_t group_size, int64_t last_capacity) {
  Plan q;  // ids and w may be p's own
  q.ids = ids;
  q.topk_w = w;
  moe_plan_args a = new_plan(q, T, E, k, capacity, false, policy, group_size, last_capacity);
  a.topk_ids = q.ids.data();
  a.topk_w = q.topk_w.data();
  const moe_status s = ops->plan(state, &a);
  q.R = q.offsets[E];
  p = std::move(q);
  return s;
}

moe_status run_plan_ec(const moe_backend_ops *ops, void *state, int64_t T, int64_t E, int64_t k, int64_t capacity,
                       const std::vector<float> &scores, Plan &p, int64_t group_size, int64_t last_capacity) {
  Plan q;  // scores may be p's own
  q.scores = scores;
  moe_plan_args a = new_plan(q, T, E, k, capacity, true, MOE_DROP_POSITION, group_size, last_capacity);
  q.token_offsets.assign(T + 1, -7);
  q.token_rows.assign(q.row_token.size(), -7);
  // Not read by expert choice; the core passes them.
  const std::vector<int32_t> ids(T * k, 0);
  const std::vector<float> w(T * k, 0.0f);
  a.topk_ids = ids.data();
  a.topk_w = w.data();
  a.expert_choice = 1;
  a.scores = q.scores.data();
  a.token_offsets = q.token_offsets.data();
  a.token_rows = q.token_rows.data();
  const moe_status s = ops->plan(state, &a);
  q.R = q.offsets[E];
  p = std::move(q);
  return s;
}

moe_rows_args rows_args(const Plan &p, int64_t d, int dtype) {
  moe_rows_args a{};
  a.T = p.T;
  a.d = d;
  a.dtype = dtype;
  a.R = p.R;
  a.k = p.k;
  if (p.ec) {
    a.token_offsets = p.token_offsets.data();
    a.token_rows = p.token_rows.data();
  } else {
    a.token_rows = p.row_of_slot.data();
  }
  a.row_token = p.row_token.data();
  a.row_weight = p.row_weight.data();
  return a;
}

std::vector<int32_t> skewed_ids(Rng &rng, int64_t T, int64_t E, int64_t k) {
  std::vector<double> weight(E);
  double total = 0.0;
  for (int64_t e = 0; e < E; ++e) total += weight[e] = 1.0 + 0.75 * static_cast<double>(e % 5);
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      for (;;) {
        double u = rng.unit() * total;
        int32_t e = 0;
        while (e + 1 < E && u >= weight[e]) u -= weight[e++];
        bool dup = false;
        for (int64_t i = 0; i < j; ++i) dup |= ids[t * k + i] == e;
        if (!dup) {
          ids[t * k + j] = e;
          break;
        }
      }
    }
  return ids;
}

}  // namespace moe_test
