// Row access for the gather kernels: a row of d floats moved 16 bytes at a time when d and the
// pointers allow it, one float at a time otherwise.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace moe::cuda {

inline bool vec4_ok(int64_t d, std::initializer_list<const void *> ptrs) {
  if (d % 4 != 0) return false;
  for (const void *p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// One block per row (or token), up to the grid limit; kernels loop past it.
inline unsigned grid_rows(int64_t n) {
  return static_cast<unsigned>(n < (1 << 30) ? (n < 1 ? 1 : n) : (1 << 30));
}

template <bool kVec>
struct RowIo;

template <>
struct RowIo<true> {
  using V = float4;
  static constexpr int kWidth = 4;
  __device__ static V load(const float *p, int64_t i) { return reinterpret_cast<const float4 *>(p)[i]; }
  __device__ static void store(float *p, int64_t i, V v) { reinterpret_cast<float4 *>(p)[i] = v; }
  __device__ static V zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ static V fma(float w, V a, V acc) {
    return make_float4(acc.x + w * a.x, acc.y + w * a.y, acc.z + w * a.z, acc.w + w * a.w);
  }
  __device__ static V add(V a, V acc) { return make_float4(acc.x + a.x, acc.y + a.y, acc.z + a.z, acc.w + a.w); }
  __device__ static V scale(float w, V a) { return make_float4(w * a.x, w * a.y, w * a.z, w * a.w); }
  __device__ static float dot(V a, V b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
};

template <>
struct RowIo<false> {
  using V = float;
  static constexpr int kWidth = 1;
  __device__ static V load(const float *p, int64_t i) { return p[i]; }
  __device__ static void store(float *p, int64_t i, V v) { p[i] = v; }
  __device__ static V zero() { return 0.0f; }
  __device__ static V fma(float w, V a, V acc) { return acc + w * a; }
  __device__ static V add(V a, V acc) { return acc + a; }
  __device__ static V scale(float w, V a) { return w * a; }
  __device__ static float dot(V a, V b) { return a * b; }
};

// Sum over the block in a fixed tree (deterministic); every thread gets the result. blockDim.x is
// a multiple of 32 and at most 1024.
__device__ inline float block_sum(float v, float *shared32) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // shared32 may still be read by a previous call
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < warps; ++w) s += shared32[w];
  return s;
}

}  // namespace moe::cuda
