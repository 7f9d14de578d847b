// Warp-level pieces of the router kernels (select.cu): one warp routes one token, its lanes
// striding over the experts. Orders match the CPU backend: a NaN counts as -inf, ties go to the
// lower index.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace moe::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline float nan_to_neginf(float v) { return isnan(v) ? -INFINITY : v; }

// True when (va, ia) comes before (vb, ib) in top-k order: higher value, then lower index.
__device__ inline bool before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

// The best entry of v[0, n) (never NaN) strictly after (prev_v, prev_i) in top-k order; prev_i < 0
// means "from the start". Every lane returns the same index; -1 when none is left.
__device__ inline int warp_next_best(const float *v, int n, float prev_v, int prev_i) {
  const int lane = threadIdx.x & 31;
  float bv = -INFINITY;
  int bi = -1;
  for (int i = lane; i < n; i += 32) {
    const float x = v[i];
    if (prev_i >= 0 && !before(prev_v, prev_i, x, i)) continue;
    if (bi < 0 || before(x, i, bv, bi)) {
      bv = x;
      bi = i;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, off);
    const int oi = __shfl_xor_sync(kFullMask, bi, off);
    if (oi >= 0 && (bi < 0 || before(ov, oi, bv, bi))) {
      bv = ov;
      bi = oi;
    }
  }
  return bi;
}

__device__ inline float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ inline bool warp_any(bool v) { return __any_sync(kFullMask, v); }

// Shazeer et al. 2017: indices of the k-th and (k+1)-th largest of v[0, E) (-1 when k == E);
// an entry is in the top k when it is not after the k-th.
struct Thresholds {
  int kth, k1th;
  float kth_v;
};

__device__ inline Thresholds warp_thresholds(const float *v, int E, int k) {
  Thresholds th{-1, -1, 0.0f};
  float pv = 0.0f;
  int pi = -1;
  const int want = k + 1 < E ? k + 1 : E;
  for (int j = 0; j < want; ++j) {
    const int i = warp_next_best(v, E, pv, pi);
    pv = v[i];
    pi = i;
    if (j == k - 1) {
      th.kth = i;
      th.kth_v = pv;
    }
    if (j == k) th.k1th = i;
  }
  return th;
}

__device__ inline bool in_top(const Thresholds &th, const float *v, int e) {
  return !before(th.kth_v, th.kth, v[e], e) || e == th.kth;
}

}  // namespace moe::cuda
