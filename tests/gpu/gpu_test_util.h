// Shared pieces of the GPU test battery: the device check that turns every case into a visible
// skip on a machine without a CUDA device, and CUDA runtime calls as assertions. The inputs,
// host bfloat16 / float16 and the comparisons come from the test-support library (tests/support).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>

#include "support/compare.h"
#include "support/half.h"
#include "support/random.h"

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
