// The capacity plan on the device: which slots are kept, and the rows of each expert in slot
// order. Orders are made with CUB's stable radix sort, so the plan equals the CPU backend's
// bit for bit: position policy ranks all first choices before any second choice (token order
// within a choice); probs policy ranks by weight, ties in that position order; kept rows keep
// slot order. Expert choice: each expert takes its `capacity` best tokens (ties to the lower
// token), its rows in token order. With capacity groups (core/capacity_groups.h) the group is the
// most significant part of every sort key, so that each group is ranked and capped on its own.
#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "core/capacity_groups.h"
#include "core/weight_sum.h"
#include "cuda/cuda.h"
#include "cuda/scratch.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;

int bits_for(int64_t n) {
  int b = 1;
  while ((int64_t{1} << b) <= n) ++b;
  return b;
}

// A float as an unsigned key whose ascending order is the float's descending order; NaN as -inf.
__device__ inline uint32_t descending_key(float v) {
  if (isnan(v)) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;  // -0 and +0 tie, as in the CPU backend's comparisons
  uint32_t u = __float_as_uint(v);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending order of floats
  return ~u;
}

// Keys (group, expert) in priority order p = j * T + t (position policy), or (group, expert,
// weight) (probs policy). group * E + expert < T * E < 2^31.
__global__ void priority_keys_kernel(const int32_t *ids, const float *w, int64_t T, int64_t k, int64_t E,
                                     int64_t group_size, bool by_weight, uint64_t *keys, int32_t *slots) {
  const int64_t n = T * k;
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < n; p += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = p / T, t = p % T, s = t * k + j;
    uint64_t key = static_cast<uint64_t>(t / group_size * E + ids[s]) << 32;
    if (by_weight) key |= descending_key(w[s]);
    keys[p] = key;
    slots[p] = static_cast<int32_t>(s);
  }
}

// After the priority sort: a slot is kept when its rank within its (group, expert) segment is
// below that group's capacity. The segment starts at the first key with the same upper half.
__global__ void keep_kernel(const uint64_t *sorted_keys, const int32_t *sorted_slots, int64_t n, int64_t E,
                            int64_t groups, int64_t capacity, int64_t last_capacity, int32_t *bucket,
                            const int32_t *ids) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t segment = sorted_keys[i] >> 32;
    int64_t lo = 0, hi = i;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if ((sorted_keys[mid] >> 32) < segment) lo = mid + 1;
      else hi = mid;
    }
    const int64_t cap = static_cast<int64_t>(segment) / E == groups - 1 ? last_capacity : capacity;
    const int32_t s = sorted_slots[i];
    bucket[s] = i - lo < cap ? ids[s] : static_cast<int32_t>(E);
  }
}

__global__ void iota_kernel(int32_t *v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    v[i] = static_cast<int32_t>(i);
}

__global__ void fill_rows_kernel(const int32_t *order, int64_t n, const int64_t *offsets, int64_t E, int64_t k,
                                 const float *topk_w, int32_t *row_of_slot, int32_t *row_token, int32_t *row_slot,
                                 float *row_weight) {
  const int64_t R = offsets[E];
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t s = order[i];
    if (i < R) {
      row_of_slot[s] = static_cast<int32_t>(i);
      row_token[i] = static_cast<int32_t>(s / k);
      row_slot[i] = s;
      row_weight[i] = topk_w[s];
    } else {
      row_of_slot[s] = -1;
    }
  }
}

// Per expert, the sum of its rows' weights in double, in the order of core/weight_sum.h (the CPU
// backend's): one block of kWeightSumLanes threads per expert, thread i the lane i, then the
// pairwise steps in shared memory.
__global__ void __launch_bounds__(kWeightSumLanes)
    weight_sum_kernel(const float *row_weight, const int64_t *offsets, int64_t E, double *out) {
  __shared__ double lane[kWeightSumLanes];
  const int i = static_cast<int>(threadIdx.x);
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    const int64_t begin = offsets[e], end = offsets[e + 1];
    double acc = 0.0;
    for (int64_t c0 = begin + i * kWeightSumChunk; c0 < end; c0 += kWeightSumLanes * kWeightSumChunk) {
      const int64_t c1 = c0 + kWeightSumChunk < end ? c0 + kWeightSumChunk : end;
      for (int64_t r = c0; r < c1; ++r) acc += row_weight[r];
    }
    lane[i] = acc;
    __syncthreads();
    for (int step = kWeightSumLanes / 2; step > 0; step /= 2) {
      if (i < step) lane[i] += lane[i + step];
      __syncthreads();
    }
    if (i == 0) out[e] = lane[0];
    __syncthreads();  // lane[] is written again for the next expert of this block
  }
}

__global__ void kept_kernel(const int64_t *offsets, int64_t E, int64_t *kept) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < E; e += int64_t{gridDim.x} * blockDim.x)
    kept[e] = offsets[e + 1] - offsets[e];
}

// Expert choice: one key per (expert, token), expert-major then group, so one stable sort ranks
// every expert's tokens of each group best first with ties in token order. The (expert, group)
// segment keeps its place: it starts at e*T + the group's first token.
__global__ void choice_keys_kernel(const float *scores, int64_t T, int64_t E, int64_t group_size, int64_t groups,
                                   uint64_t *keys, int32_t *tokens) {
  const int64_t n = T * E;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = i / T, t = i % T;
    keys[i] = (static_cast<uint64_t>(e * groups + t / group_size) << 32) | descending_key(scores[t * E + e]);
    tokens[i] = static_cast<int32_t>(t);
  }
}

// The first C_g tokens of each (expert, group) segment, keyed (expert, token) for the sort into
// token order. An expert takes C tokens in all: take_full from each full group, then the rest
// from the last group.
__global__ void choice_take_kernel(const int32_t *sorted_tokens, int64_t T, int64_t C, int64_t E, int64_t group_size,
                                   int64_t take_full, int64_t full_groups, int token_bits, uint64_t *taken) {
  const int64_t n = E * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = i / C, c = i % C;
    const int64_t q = take_full > 0 ? c / take_full : full_groups;
    const int64_t g = q < full_groups ? q : full_groups;
    const int64_t at = e * T + g * group_size + (c - g * take_full);
    taken[i] = (static_cast<uint64_t>(e) << token_bits) | static_cast<uint64_t>(sorted_tokens[at]);
  }
}

__global__ void choice_rows_kernel(const uint64_t *keys, const float *scores, int64_t E, int64_t C, int token_bits,
                                   int32_t *row_token, int32_t *row_slot, float *row_weight, int32_t *row_ids) {
  const int64_t n = E * C;
  const uint64_t mask = (uint64_t{1} << token_bits) - 1;
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < n; r += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = r / C, t = static_cast<int64_t>(keys[r] & mask);
    row_token[r] = static_cast<int32_t>(t);
    row_slot[r] = static_cast<int32_t>(t * E + e);
    row_weight[r] = scores[t * E + e];
    row_ids[r] = static_cast<int32_t>(r);
  }
}

// token_offsets[t] = the first position of token t in the sorted row tokens (a lower bound):
// no histogram with one bin per token.
__global__ void lower_bounds_kernel(const int32_t *sorted, int64_t n, int64_t T, int64_t *offsets) {
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t <= T; t += int64_t{gridDim.x} * blockDim.x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted[mid] < t) lo = mid + 1;
      else hi = mid;
    }
    offsets[t] = lo;
  }
}

__global__ void segment_offsets_kernel(int64_t *offsets, int64_t segments, int64_t size) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i <= segments; i += int64_t{gridDim.x} * blockDim.x)
    offsets[i] = i * size;
}

// Runs a CUB call twice: once for its temporary size, once for real, in scratch[3].
template <class F>
void cub_call(State &st, const char *what, F &&f) {
  size_t bytes = 0;
  check(f(nullptr, bytes), what);
  st.scratch[3].ensure(std::max<size_t>(bytes, 1), st);
  check(f(st.scratch[3].as<void>(), bytes), what);
}

// counts of v[i] in [0, bins) and their exclusive prefix sums into offsets[0..bins].
void histogram_offsets(State &st, const int32_t *v, int64_t n, int64_t bins, int32_t *counts, int64_t *offsets) {
  cub_call(st, "cub::DeviceHistogram::HistogramEven", [&](void *tmp, size_t &bytes) {
    return cub::DeviceHistogram::HistogramEven(tmp, bytes, v, counts, static_cast<int>(bins + 1), 0,
                                               static_cast<int>(bins), n, st.stream);
  });
  check(cudaMemsetAsync(counts + bins, 0, sizeof(int32_t), st.stream), "cudaMemsetAsync");
  cub_call(st, "cub::DeviceScan::ExclusiveSum", [&](void *tmp, size_t &bytes) {
    return cub::DeviceScan::ExclusiveSum(tmp, bytes, counts, offsets, bins + 1, st.stream);
  });
}

// Brings offsets[E+1], kept[E] and weight_sum[E] to the host in one copy.
void finish(State &st, const moe_plan_args *a, const int64_t *offsets, int64_t *kept, double *wsum) {
  const int64_t E = a->E;
  kept_kernel<<<blocks_for(E, kThreads), kThreads, 0, st.stream>>>(offsets, E, kept);
  check_launch("kept");
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(E, 1), 65535));
  weight_sum_kernel<<<grid, kWeightSumLanes, 0, st.stream>>>(a->row_weight, offsets, E, wsum);
  check_launch("weight sums");
  const size_t bytes = sizeof(int64_t) * (2 * E + 1) + sizeof(double) * E;
  st.host.ensure(bytes);
  char *h = st.host.as<char>();
  // offsets, kept and wsum are consecutive in the scratch plan (see plan()).
  check(cudaMemcpyAsync(h, offsets, sizeof(int64_t) * (E + 1), cudaMemcpyDeviceToHost, st.stream), "cudaMemcpyAsync");
  check(cudaMemcpyAsync(h + sizeof(int64_t) * (E + 1), kept, sizeof(int64_t) * E, cudaMemcpyDeviceToHost, st.stream),
        "cudaMemcpyAsync");
  check(cudaMemcpyAsync(h + sizeof(int64_t) * (2 * E + 1), wsum, sizeof(double) * E, cudaMemcpyDeviceToHost,
                        st.stream),
        "cudaMemcpyAsync");
  // The expert GEMMs are sized on the host: the row counts must arrive before they are issued.
  check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize (plan)");
  const auto *ho = reinterpret_cast<const int64_t *>(h);
  std::copy(ho, ho + E + 1, a->offsets);
  std::copy(ho + E + 1, ho + 2 * E + 1, a->kept);
  const auto *hw = reinterpret_cast<const double *>(h + sizeof(int64_t) * (2 * E + 1));
  std::copy(hw, hw + E, a->weight_sum);
}

void plan_token_choice(State &st, const moe_plan_args *a, const CapacityGroups &groups) {
  const int64_t T = a->T, E = a->E, k = a->k, n = checked_mul(T, k, "num_tokens * top_k");
  const bool capped = a->capacity >= 0;
  ScratchPlan sp;
  const size_t h_keys = sp.add<uint64_t>(capped ? n : 0, "plan scratch");
  const size_t h_keys_out = sp.add<uint64_t>(capped ? n : 0, "plan scratch");
  const size_t h_slots = sp.add<int32_t>(n, "plan scratch");
  const size_t h_slots_out = sp.add<int32_t>(n, "plan scratch");
  const size_t h_bucket = sp.add<int32_t>(n, "plan scratch");
  const size_t h_bucket_out = sp.add<int32_t>(n, "plan scratch");
  const size_t h_counts = sp.add<int32_t>(E + 1, "plan scratch");
  const size_t h_offsets = sp.add<int64_t>(E + 2, "plan scratch");
  const size_t h_kept = sp.add<int64_t>(E, "plan scratch");
  const size_t h_wsum = sp.add<double>(E, "plan scratch");
  sp.commit(st.scratch[2], st);
  auto *slots = sp.get<int32_t>(h_slots), *slots_out = sp.get<int32_t>(h_slots_out);
  auto *bucket = sp.get<int32_t>(h_bucket), *bucket_out = sp.get<int32_t>(h_bucket_out);
  auto *counts = sp.get<int32_t>(h_counts);
  auto *offsets = sp.get<int64_t>(h_offsets);
  const unsigned g = stride_blocks(st, n, kThreads);

  if (n > 0 && capped) {
    const bool by_weight = a->drop_policy == MOE_DROP_PROBS;
    auto *keys = sp.get<uint64_t>(h_keys), *keys_out = sp.get<uint64_t>(h_keys_out);
    priority_keys_kernel<<<g, kThreads, 0, st.stream>>>(a->topk_ids, a->topk_w, T, k, E, groups.size, by_weight,
                                                        keys, slots);
    check_launch("priority keys");
    const int begin = by_weight ? 0 : 32, end = 32 + bits_for(groups.count * E);
    cub_call(st, "cub::DeviceRadixSort::SortPairs", [&](void *tmp, size_t &bytes) {
      return cub::DeviceRadixSort::SortPairs(tmp, bytes, keys, keys_out, slots, slots_out, n, begin, end, st.stream);
    });
    keep_kernel<<<g, kThreads, 0, st.stream>>>(keys_out, slots_out, n, E, groups.count, groups.capacity,
                                               groups.last_capacity, bucket, a->topk_ids);
    check_launch("keep");
  } else if (n > 0) {
    check(cudaMemcpyAsync(bucket, a->topk_ids, sizeof(int32_t) * n, cudaMemcpyDeviceToDevice, st.stream),
          "cudaMemcpyAsync");
  }
  // Kept slots by expert, in slot order (stable); dropped ones in bucket E, after every row.
  if (n > 0) {
    iota_kernel<<<g, kThreads, 0, st.stream>>>(slots, n);
    check_launch("iota");
    cub_call(st, "cub::DeviceRadixSort::SortPairs", [&](void *tmp, size_t &bytes) {
      return cub::DeviceRadixSort::SortPairs(tmp, bytes, bucket, bucket_out, slots, slots_out, n, 0,
                                             bits_for(E), st.stream);
    });
    histogram_offsets(st, bucket, n, E, counts, offsets);
    fill_rows_kernel<<<g, kThreads, 0, st.stream>>>(slots_out, n, offsets, E, k, a->topk_w, a->row_of_slot,
                                                    a->row_token, a->row_slot, a->row_weight);
    check_launch("fill rows");
  } else {
    check(cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (E + 1), st.stream), "cudaMemsetAsync");
  }
  finish(st, a, offsets, sp.get<int64_t>(h_kept), sp.get<double>(h_wsum));
}

void plan_expert_choice(State &st, const moe_plan_args *a, const CapacityGroups &groups) {
  const int64_t T = a->T, E = a->E, C = groups.taken();
  const int64_t n = checked_mul(T, E, "num_tokens * num_experts"), R = E * C;
  const int token_bits = bits_for(T), expert_bits = bits_for(E), segment_bits = bits_for(E * groups.count);
  ScratchPlan sp;
  const size_t h_keys = sp.add<uint64_t>(n, "plan scratch");
  const size_t h_keys_out = sp.add<uint64_t>(n, "plan scratch");
  const size_t h_tok = sp.add<int32_t>(n, "plan scratch");
  const size_t h_tok_out = sp.add<int32_t>(n, "plan scratch");
  const size_t h_ids = sp.add<int32_t>(R, "plan scratch");
  const size_t h_offsets = sp.add<int64_t>(E + 2, "plan scratch");
  const size_t h_kept = sp.add<int64_t>(E, "plan scratch");
  const size_t h_wsum = sp.add<double>(E, "plan scratch");
  sp.commit(st.scratch[2], st);
  auto *keys = sp.get<uint64_t>(h_keys), *keys_out = sp.get<uint64_t>(h_keys_out);
  auto *tok = sp.get<int32_t>(h_tok), *tok_out = sp.get<int32_t>(h_tok_out);
  auto *offsets = sp.get<int64_t>(h_offsets);
  auto *ids = sp.get<int32_t>(h_ids);

  segment_offsets_kernel<<<blocks_for(E + 1, kThreads), kThreads, 0, st.stream>>>(offsets, E, C);
  check_launch("expert offsets");
  if (R > 0) {
    choice_keys_kernel<<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(a->scores, T, E, groups.size,
                                                                                  groups.count, keys, tok);
    check_launch("choice keys");
    // Best first within each expert and group; the sort is stable and its input in token order,
    // so equal scores keep the lower token first.
    cub_call(st, "cub::DeviceRadixSort::SortPairs", [&](void *tmp, size_t &bytes) {
      return cub::DeviceRadixSort::SortPairs(tmp, bytes, keys, keys_out, tok, tok_out, n, 0, 32 + segment_bits,
                                             st.stream);
    });
    // The C chosen tokens of each expert, into token order.
    choice_take_kernel<<<stride_blocks(st, R, kThreads), kThreads, 0, st.stream>>>(
        tok_out, T, C, E, groups.size, groups.taken_from(0), groups.count - 1, token_bits, keys);
    check_launch("choice take");
    cub_call(st, "cub::DeviceRadixSort::SortKeys", [&](void *tmp, size_t &bytes) {
      return cub::DeviceRadixSort::SortKeys(tmp, bytes, keys, keys_out, R, 0, token_bits + expert_bits, st.stream);
    });
    choice_rows_kernel<<<stride_blocks(st, R, kThreads), kThreads, 0, st.stream>>>(
        keys_out, a->scores, E, C, token_bits, a->row_token, a->row_slot, a->row_weight, ids);
    check_launch("choice rows");
    // Each token's rows in expert (row) order: a stable sort of row ids by token.
    cub_call(st, "cub::DeviceRadixSort::SortPairs", [&](void *tmp, size_t &bytes) {
      return cub::DeviceRadixSort::SortPairs(tmp, bytes, a->row_token, tok, ids, a->token_rows, R, 0, token_bits,
                                             st.stream);
    });
    lower_bounds_kernel<<<stride_blocks(st, T + 1, kThreads), kThreads, 0, st.stream>>>(tok, R, T, a->token_offsets);
    check_launch("token offsets");
  } else {
    check(cudaMemsetAsync(a->token_offsets, 0, sizeof(int64_t) * (T + 1), st.stream), "cudaMemsetAsync");
  }
  finish(st, a, offsets, sp.get<int64_t>(h_kept), sp.get<double>(h_wsum));
}

}  // namespace

moe_status plan(void *state, const moe_plan_args *a) {
  return guarded(state, [&](State &st) {
    const CapacityGroups groups = capacity_groups(a->T, a->group_size, a->capacity, a->last_capacity);
    if (a->expert_choice) plan_expert_choice(st, a, groups);
    else plan_token_choice(st, a, groups);
  });
}

}  // namespace moe::cuda
