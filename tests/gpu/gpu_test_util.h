// Shared pieces of the GPU test battery: the device check that turns every case into a visible
// skip on a machine without a CUDA device, a small deterministic generator for the inputs (random,
// never zero), host conversions to bfloat16 / float16, and scale-aware comparisons.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace gpu_test {

// ---- the device ---------------------------------------------------------------------------------

// Whether this process sees a CUDA device; *why says why not. Asked once per process (the answer
// cannot change), and never before a test case runs: listing the tests touches no CUDA API.
inline bool device_available(std::string *why) {
  struct Probe {
    bool ok = false;
    std::string why;
    Probe() {
      int n = 0;
      const cudaError_t e = cudaGetDeviceCount(&n);
      if (e != cudaSuccess) {
        why = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
        (void)cudaGetLastError();
      } else if (n <= 0) {
        why = "cudaGetDeviceCount reports 0 devices";
      } else {
        ok = true;
      }
    }
  };
  static const Probe probe;
  if (why) *why = probe.why;
  return probe.ok;
}

inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace gpu_test

// In SetUp (or a test body): report the case as skipped, with the reason, when there is no device.
// ctest sees gtest's "[  SKIPPED ]" line (SKIP_REGULAR_EXPRESSION) and counts the test as skipped.
#define MOE_GPU_REQUIRE_DEVICE()                                                 \
  do {                                                                           \
    std::string moe_gpu_why_;                                                    \
    if (!::gpu_test::device_available(&moe_gpu_why_))                            \
      GTEST_SKIP() << "SKIPPED: no CUDA device (" << moe_gpu_why_ << ")";        \
  } while (0)

// A CUDA runtime call in a test body or a void helper: a fatal failure naming the error.
#define CUDA_ASSERT(call)                                                                          \
  do {                                                                                             \
    const cudaError_t moe_cuda_e_ = (call);                                                        \
    ASSERT_EQ(moe_cuda_e_, cudaSuccess) << #call << ": " << cudaGetErrorName(moe_cuda_e_) << ": " \
                                        << cudaGetErrorString(moe_cuda_e_);                        \
  } while (0)

#define CUDA_EXPECT(call)                                                                          \
  do {                                                                                             \
    const cudaError_t moe_cuda_e_ = (call);                                                        \
    EXPECT_EQ(moe_cuda_e_, cudaSuccess) << #call << ": " << cudaGetErrorName(moe_cuda_e_) << ": " \
                                        << cudaGetErrorString(moe_cuda_e_);                        \
  } while (0)

namespace gpu_test {

// ---- inputs -------------------------------------------------------------------------------------

// splitmix64: small, deterministic, independent of the library's own generator.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double unit() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  // Integer in [0, n).
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(unit()); }
  // Random sign, magnitude uniform in [bound/64, bound]: random and never (near) zero.
  float nonzero(float bound) {
    const float m = bound * static_cast<float>(1.0 / 64 + (1.0 - 1.0 / 64) * unit());
    return (next() & 1) ? m : -m;
  }
  std::vector<float> nonzeros(size_t n, float bound) {
    std::vector<float> v(n);
    for (float &x : v) x = nonzero(bound);
    return v;
  }
  // Odd multiples of step in [-(2m-1) step, (2m-1) step]: never zero, exact in bf16 and f16 for m <= 4
  // and a power-of-two step, and their dot products are exact in float32 (CUTLASS's habit).
  float odd_grid(int m, float step) {
    const int64_t i = below(2 * m);
    return static_cast<float>(2 * i - (2 * m - 1)) * step;
  }
  std::vector<float> odd_grids(size_t n, int m, float step) {
    std::vector<float> v(n);
    for (float &x : v) x = odd_grid(m, step);
    return v;
  }
  template <class T>
  void shuffle(std::vector<T> &v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(below(static_cast<int64_t>(i)))]);
  }

 private:
  uint64_t s_;
};

// ---- bfloat16 / float16 on the host (round to nearest even) --------------------------------------

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}
inline float bf16_to_f32(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

inline uint16_t f32_to_f16(float f) {
  const uint32_t x = bits_of(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));  // Inf, NaN
  const int32_t e = static_cast<int32_t>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow: Inf
  if (e <= 0) {                                               // float16 subnormal, or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right (up to Inf)
  return static_cast<uint16_t>(h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return float_of(sign);
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400u));
    return float_of(sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13));
  }
  if (exp == 31) return float_of(sign | 0x7f800000u | (mant << 13));
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

// dtype: 0 float32, 1 bfloat16, 2 float16 (moe_dtype's values).
inline size_t dtype_size(int dtype) { return dtype == 0 ? 4 : 2; }
inline float round_to(int dtype, float v) {
  if (dtype == 1) return bf16_to_f32(f32_to_bf16(v));
  if (dtype == 2) return f16_to_f32(f32_to_f16(v));
  return v;
}
inline std::vector<float> rounded(int dtype, std::vector<float> v) {
  for (float &x : v) x = round_to(dtype, x);
  return v;
}
// Host float32 values as the bytes of a device tensor of that dtype, and back.
inline std::vector<unsigned char> encode(int dtype, const std::vector<float> &v) {
  std::vector<unsigned char> out(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == 0) {
      std::memcpy(&out[i * 4], &v[i], 4);
    } else {
      const uint16_t h = dtype == 1 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}
inline std::vector<float> decode(int dtype, const std::vector<unsigned char> &bytes) {
  const size_t n = bytes.size() / dtype_size(dtype);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == 0) {
      std::memcpy(&out[i], &bytes[i * 4], 4);
    } else {
      uint16_t h;
      std::memcpy(&h, &bytes[i * 2], 2);
      out[i] = dtype == 1 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

// ---- comparisons --------------------------------------------------------------------------------

// Scale-aware closeness of a tensor: every |got - ref| <= rtol * scale, where scale is the largest
// |ref| of the tensor (at least floor). Float rounding of a GEMM or a reduction grows with the sum
// of the magnitudes of its terms, which the tensor's largest value bounds from below; a per-element
// relative test would fail on outputs that cancel to near zero. Non-finite values must match
// exactly (NaN where NaN, the same Inf). One failure per tensor, naming the worst element.
template <class T>
::testing::AssertionResult close(const std::string &what, const T *got, const T *ref, size_t n, double rtol,
                                 double floor = 1e-30) {
  double scale = floor;
  for (size_t i = 0; i < n; ++i)
    if (std::isfinite(static_cast<double>(ref[i]))) scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
  size_t bad = 0, worst = 0;
  double worst_err = -1.0;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    double err;
    if (std::isfinite(g) && std::isfinite(r)) {
      err = std::fabs(g - r);
    } else {
      const bool same = (std::isnan(g) && std::isnan(r)) || g == r;
      err = same ? 0.0 : std::numeric_limits<double>::infinity();
    }
    if (err > rtol * scale) {
      ++bad;
      if (err > worst_err) {
        worst_err = err;
        worst = i;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(9) << what << ": " << bad << " of " << n << " elements differ by more than " << rtol
     << " x " << scale << " (largest |expected|); worst [" << worst << "]: got " << static_cast<double>(got[worst])
     << ", expected " << static_cast<double>(ref[worst]) << ", |diff| " << worst_err << " = "
     << worst_err / scale << " x scale";
  return ::testing::AssertionFailure() << os.str();
}

template <class T>
::testing::AssertionResult close(const std::string &what, const std::vector<T> &got, const std::vector<T> &ref,
                                 double rtol, double floor = 1e-30) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " values, expected " << ref.size();
  return close(what, got.data(), ref.data(), got.size(), rtol, floor);
}

// A scalar: |got - ref| <= rtol * max(|ref|, floor).
inline ::testing::AssertionResult close_scalar(const std::string &what, double got, double ref, double rtol,
                                               double floor = 1e-30) {
  const double tol = rtol * std::max(std::fabs(ref), floor);
  if ((std::isnan(got) && std::isnan(ref)) || std::fabs(got - ref) <= tol) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(12) << what << ": got " << got << ", expected " << ref << " (|diff| "
     << std::fabs(got - ref) << " > " << tol << ")";
  return ::testing::AssertionFailure() << os.str();
}

// Exact equality of the first n values (all when n is npos); floats compared bit for bit.
template <class T>
::testing::AssertionResult same(const std::string &what, const std::vector<T> &got, const std::vector<T> &ref,
                                size_t n = static_cast<size_t>(-1)) {
  if (n == static_cast<size_t>(-1)) {
    if (got.size() != ref.size())
      return ::testing::AssertionFailure() << what << ": " << got.size() << " values, expected " << ref.size();
    n = got.size();
  }
  if (got.size() < n || ref.size() < n)
    return ::testing::AssertionFailure() << what << ": fewer than " << n << " values to compare";
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &ref[i], sizeof(T)) != 0) {
      if (bad++ == 0) first = i;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(17) << what << ": " << bad << " of " << n << " values differ; first at [" << first
     << "]: got " << +got[first] << ", expected " << +ref[first];
  return ::testing::AssertionFailure() << os.str();
}

}  // namespace gpu_test
