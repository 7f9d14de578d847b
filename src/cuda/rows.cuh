// Row access for the row and elementwise kernels: W consecutive elements at a time, widened to
// float. With W = 16 / sizeof(T) a pack of the storage type is one 16-byte access (4 floats, or 8
// bfloat16 / float16 values); a float32 tensor read beside them moves as two 16-byte accesses.
// W = 1 is the path for any length and alignment.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/dtype.cuh"

namespace moe::cuda {

// Elements of T that fill 16 bytes: the width of the vector path for storage type T.
template <class T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

inline bool aligned16(std::initializer_list<const void *> ptrs) {
  for (const void *p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Whether rows of d elements can take the W-wide path: d a multiple of W and every (non-null)
// pointer 16-byte aligned. Row starts then stay aligned: W elements of any type used here span a
// multiple of 16 bytes.
inline bool vec_ok(int64_t d, int w, std::initializer_list<const void *> ptrs) { return d % w == 0 && aligned16(ptrs); }

// Calls body(std::integral_constant<int, W>{}): W = kVecWidth<T> when vec, else W = 1.
template <class T, class F>
void with_width(bool vec, F &&body) {
  if (vec)
    body(std::integral_constant<int, kVecWidth<T>>{});
  else
    body(std::integral_constant<int, 1>{});
}

// One block per row (or token), up to the grid limit; kernels loop past it.
inline unsigned grid_rows(int64_t n) { return static_cast<unsigned>(n < (1 << 30) ? (n < 1 ? 1 : n) : (1 << 30)); }

template <class T, int W>
struct alignas(16) Pack {
  static_assert(W * sizeof(T) % 16 == 0, "a pack is a whole number of 16-byte accesses");
  T v[W];
};

template <int W>
struct Frag {
  float v[W];
};

// Elements [i*W, i*W + W) of p.
template <int W, class T>
__device__ __forceinline__ Frag<W> load(const T *p, int64_t i) {
  Frag<W> f;
  if constexpr (W == 1) {
    f.v[0] = to_float(p[i]);
  } else {
    const Pack<T, W> k = reinterpret_cast<const Pack<T, W> *>(p)[i];
#pragma unroll
    for (int j = 0; j < W; ++j) f.v[j] = to_float(k.v[j]);
  }
  return f;
}

template <int W, class T>
__device__ __forceinline__ void store(T *p, int64_t i, const Frag<W> &f) {
  if constexpr (W == 1) {
    p[i] = from_float<T>(f.v[0]);
  } else {
    Pack<T, W> k;
#pragma unroll
    for (int j = 0; j < W; ++j) k.v[j] = from_float<T>(f.v[j]);
    reinterpret_cast<Pack<T, W> *>(p)[i] = k;
  }
}

template <int W>
__device__ __forceinline__ Frag<W> zero() {
  Frag<W> f;
#pragma unroll
  for (int j = 0; j < W; ++j) f.v[j] = 0.0f;
  return f;
}

// acc + w * a, elementwise
template <int W>
__device__ __forceinline__ Frag<W> axpy(float w, const Frag<W> &a, Frag<W> acc) {
#pragma unroll
  for (int j = 0; j < W; ++j) acc.v[j] += w * a.v[j];
  return acc;
}

template <int W>
__device__ __forceinline__ Frag<W> add(const Frag<W> &a, Frag<W> acc) {
#pragma unroll
  for (int j = 0; j < W; ++j) acc.v[j] += a.v[j];
  return acc;
}

template <int W>
__device__ __forceinline__ Frag<W> scale(float w, Frag<W> a) {
#pragma unroll
  for (int j = 0; j < W; ++j) a.v[j] *= w;
  return a;
}

template <int W>
__device__ __forceinline__ float dot(const Frag<W> &a, const Frag<W> &b) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < W; ++j) s += a.v[j] * b.v[j];
  return s;
}

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
