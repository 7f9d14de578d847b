// The capacity groups of one call (moe_config.capacity_group_size, moe_plan_args.group_size):
// consecutive runs of tokens, each with its own capacity. Header-only: the core and both backends
// read moe_plan_args through it, so that they agree on where a group starts and what it holds.
#pragma once

#include <algorithm>
#include <cstdint>

namespace moe {

struct CapacityGroups {
  int64_t T = 0;
  int64_t size = 0;            // tokens per group; the last group may be shorter
  int64_t count = 0;           // number of groups (0 when T is 0)
  int64_t capacity = -1;       // slots per expert in a full group, < 0: dropless
  int64_t last_capacity = -1;  // in the last group

  int64_t begin(int64_t g) const { return g * size; }
  int64_t length(int64_t g) const { return std::min(size, T - g * size); }
  int64_t capacity_of(int64_t g) const { return g + 1 == count ? last_capacity : capacity; }
  // Expert choice: the tokens an expert takes from group g (its capacity, at most the group).
  int64_t taken_from(int64_t g) const { return std::max<int64_t>(0, std::min(capacity_of(g), length(g))); }
  // Expert choice: the tokens an expert takes over the whole call.
  int64_t taken() const {
    if (count == 0) return 0;
    return (count - 1) * taken_from(0) + taken_from(count - 1);
  }
};

// group_size <= 0 or >= T: one group of all T tokens with `capacity`.
inline CapacityGroups capacity_groups(int64_t T, int64_t group_size, int64_t capacity, int64_t last_capacity) {
  CapacityGroups g;
  g.T = T;
  if (group_size <= 0 || group_size >= T) {
    g.size = T;
    g.count = T > 0 ? 1 : 0;
    g.capacity = g.last_capacity = capacity;
  } else {
    g.size = group_size;
    g.count = (T + group_size - 1) / group_size;
    g.capacity = capacity;
    g.last_capacity = T % group_size == 0 ? capacity : last_capacity;
  }
  return g;
}

}  // namespace moe
