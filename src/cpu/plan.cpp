// The capacity plan: which slots are kept, and the rows of each expert in slot order; or, for
// expert choice, each expert's best tokens. Capacity is per group of tokens (core/capacity_groups.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/capacity_groups.h"
#include "core/weight_sum.h"
#include "cpu/cpu.h"

namespace moe::cpu {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}  // namespace

// Expert choice (Zhou et al. 2022): in each capacity group, expert e takes the C tokens with the
// highest S[t,e] (ties to the lower token); its rows are the tokens it took, in token order.
static void plan_expert_choice(const moe_plan_args *a, const CapacityGroups &groups) {
  const int64_t T = a->T, E = a->E, C = groups.taken();
  std::vector<int64_t> count(checked_count(T + 1, 1, "token offsets"), 0);
  // Each thread's index buffer is allocated here: a bad_alloc thrown inside the parallel region
  // would escape it and terminate the process.
  const int nthreads = omp_get_max_threads();
  std::vector<int32_t> idx_buf(checked_count(nthreads, T, "expert-choice scratch"));
#pragma omp parallel if (worth_threads(a->T * a->E))
  {
    const auto idx = idx_buf.begin() + static_cast<ptrdiff_t>(omp_get_thread_num()) * T;
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e) {
      auto key = [&](int32_t t) {
        float v = a->scores[t * E + e];
        return std::isnan(v) ? kNegInf : v;
      };
      int64_t r = e * C;
      for (int64_t g = 0; g < groups.count; ++g) {
        const auto first = idx + groups.begin(g), last = first + groups.length(g);
        const int64_t take = groups.taken_from(g);
        std::iota(first, last, static_cast<int32_t>(groups.begin(g)));
        std::partial_sort(first, first + take, last, [&](int32_t x, int32_t y) {
          float kx = key(x), ky = key(y);
          return kx > ky || (kx == ky && x < y);
        });
        std::sort(first, first + take);
        for (int64_t i = 0; i < take; ++i, ++r) {
          const int64_t t = first[i];
          a->row_token[r] = static_cast<int32_t>(t);
          a->row_slot[r] = static_cast<int32_t>(t * E + e);
          a->row_weight[r] = a->scores[t * E + e];
        }
      }
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    a->kept[e] = C;
    a->offsets[e] = e * C;
  }
  a->offsets[E] = E * C;
  for (int64_t r = 0; r < E * C; ++r) ++count[a->row_token[r] + 1];
  for (int64_t t = 0; t < T; ++t) count[t + 1] += count[t];
  std::copy(count.begin(), count.end(), a->token_offsets);
  for (int64_t r = 0; r < E * C; ++r) a->token_rows[count[a->row_token[r]]++] = static_cast<int32_t>(r);
}

// Token choice: which slots each group keeps, in keep[] (1 kept, 0 dropped).
static void drop_over_capacity(const moe_plan_args *a, const CapacityGroups &groups, std::vector<unsigned char> &keep) {
  const int64_t E = a->E, k = a->k;
  std::vector<int64_t> used(E);
  std::vector<std::vector<int64_t>> slots(a->drop_policy == MOE_DROP_POSITION ? 0 : E);
  auto key = [&](int64_t s) {
    float w = a->topk_w[s];
    return std::isnan(w) ? -std::numeric_limits<float>::infinity() : w;
  };
  for (int64_t g = 0; g < groups.count; ++g) {
    const int64_t t0 = groups.begin(g), t1 = t0 + groups.length(g), cap = groups.capacity_of(g);
    if (a->drop_policy == MOE_DROP_POSITION) {
      // All first choices of the group before any second choice; within a choice, token order.
      std::fill(used.begin(), used.end(), 0);
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = t0; t < t1; ++t) {
          int64_t s = t * k + j, e = a->topk_ids[s];
          if (used[e] < cap) ++used[e];
          else keep[s] = 0;
        }
    } else {
      // Largest weights first; equal weights keep position order (stable sort over that order).
      for (auto &v : slots) v.clear();
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = t0; t < t1; ++t) slots[a->topk_ids[t * k + j]].push_back(t * k + j);
      for (int64_t e = 0; e < E; ++e) {
        auto &v = slots[e];
        if (static_cast<int64_t>(v.size()) <= cap) continue;
        std::stable_sort(v.begin(), v.end(), [&](int64_t x, int64_t y) { return key(x) > key(y); });
        for (size_t i = static_cast<size_t>(cap); i < v.size(); ++i) keep[v[i]] = 0;
      }
    }
  }
}

moe_status plan(void *st, const moe_plan_args *a) {
  return guarded(st, [&] {
    const CapacityGroups groups = capacity_groups(a->T, a->group_size, a->capacity, a->last_capacity);
    if (a->expert_choice) {
      plan_expert_choice(a, groups);
      for (int64_t e = 0; e < a->E; ++e)
        a->weight_sum[e] = ordered_weight_sum(a->row_weight, a->offsets[e], a->offsets[e + 1]);
      return;
    }
    const int64_t T = a->T, E = a->E, k = a->k, n = checked_mul(T, k, "num_tokens * top_k");
    std::vector<unsigned char> keep(static_cast<size_t>(n), 1);
    if (a->capacity >= 0) drop_over_capacity(a, groups, keep);
    std::fill(a->kept, a->kept + E, 0);
    for (int64_t s = 0; s < n; ++s)
      if (keep[s]) ++a->kept[a->topk_ids[s]];
    a->offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) a->offsets[e + 1] = a->offsets[e] + a->kept[e];
    std::vector<int64_t> fill(a->offsets, a->offsets + E);
    for (int64_t s = 0; s < n; ++s) {
      if (!keep[s]) {
        a->row_of_slot[s] = -1;
        continue;
      }
      int64_t r = fill[a->topk_ids[s]]++;
      a->row_of_slot[s] = static_cast<int32_t>(r);
      a->row_token[r] = static_cast<int32_t>(s / k);
      a->row_slot[r] = static_cast<int32_t>(s);
      a->row_weight[r] = a->topk_w[s];
    }
    for (int64_t e = 0; e < E; ++e)
      a->weight_sum[e] = ordered_weight_sum(a->row_weight, a->offsets[e], a->offsets[e + 1]);
  });
}

}  // namespace moe::cpu
