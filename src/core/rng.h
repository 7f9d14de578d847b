// Counter-based random numbers: a value depends only on (seed, stream, counter), never on the
// order or the thread that draws it, so every backend and thread count draws the same numbers.
#pragma once
#include <math.h>
#include <stdint.h>

// The CUDA backend draws the same numbers on the device (src/cuda/gate.cu).
#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moe {

// splitmix64's finaliser: a bijective 64-bit mix with full avalanche.
MOE_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

MOE_HOST_DEVICE inline uint64_t rng_bits(uint64_t seed, uint64_t stream, uint64_t counter) {
  return mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) ^ mix64(stream + 0x632be59bd9b4e019ULL) ^
               (counter * 0xd1b54a32d192ed03ULL));
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
MOE_HOST_DEVICE inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
  return static_cast<float>(rng_bits(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal by Box-Muller on two independent uniforms drawn from this counter.
MOE_HOST_DEVICE inline float rng_normal(uint64_t seed, uint64_t stream, uint64_t counter) {
  uint64_t b = rng_bits(seed, stream, counter);
  double u1 = (static_cast<double>(b >> 40) + 1.0) * (1.0 / 16777217.0);  // (0, 1]
  double u2 = static_cast<double>(b & 0xffffffULL) * (1.0 / 16777216.0);
  return static_cast<float>(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// Streams used by libmoe; a stream is a namespace of counters.
enum RngStream : uint64_t {
  kStreamInit = 1,          // parameter initialisation: stream + param index << 8
  kStreamNoise = 1ull << 32,  // router noise: counter (step, t, e)
  kStreamJitter = 2ull << 32,
};

}  // namespace moe
