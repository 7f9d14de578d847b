// The order in which a plan adds up each expert's kept weights (moe_plan_args.weight_sum), the
// same on both backends so that they agree bit for bit, and fixed by these constants rather than
// by a device's grid, so that a backend gives the same bits on every device:
//  - the expert's rows are dealt to kWeightSumLanes lanes in chunks of kWeightSumChunk consecutive
//    rows: lane i takes chunks i, i + L, i + 2L, ... and adds their weights in row order, in double;
//  - the lanes are then added pairwise: for s = L/2, L/4, ..., 1, lane i += lane i + s (i < s).
// An expert with at most kWeightSumChunk rows gets the plain sum in row order (the other lanes add
// +0.0, which changes nothing). On the device, lane i is thread i of the expert's block.
#pragma once
#include <stdint.h>

namespace moe {

constexpr int kWeightSumLanes = 128;  // a power of two
constexpr int64_t kWeightSumChunk = 32;

// The sum of w[begin, end) in the order above (host).
inline double ordered_weight_sum(const float *w, int64_t begin, int64_t end) {
  double lane[kWeightSumLanes];
  for (int i = 0; i < kWeightSumLanes; ++i) {
    double acc = 0.0;
    for (int64_t c0 = begin + i * kWeightSumChunk; c0 < end; c0 += kWeightSumLanes * kWeightSumChunk) {
      const int64_t c1 = c0 + kWeightSumChunk < end ? c0 + kWeightSumChunk : end;
      for (int64_t r = c0; r < c1; ++r) acc += w[r];
    }
    lane[i] = acc;
  }
  for (int s = kWeightSumLanes / 2; s > 0; s /= 2)
    for (int i = 0; i < s; ++i) lane[i] += lane[i + s];
  return lane[0];
}

}  // namespace moe
