// Shared pieces of the GPU test battery: the device check (device_rules.h) that turns every case
// into a visible skip on a machine without a CUDA device, or a failure where a device cannot be
// used or MOE_REQUIRE_GPU is set; and CUDA runtime calls as assertions. The inputs,
// host bfloat16 / float16 and the comparisons come from the test-support library (tests/support).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>

#include "device_rules.h"
#include "support/compare.h"
#include "support/half.h"
#include "support/random.h"

namespace gpu_test {

// ---- the device ---------------------------------------------------------------------------------

inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace gpu_test

// In SetUp (or a test body): run the case, report it skipped with the reason, or fail it, by the
// rule of device_rules.h (a skip fails too under MOE_REQUIRE_GPU). ctest sees gtest's
// "[  SKIPPED ]" line (SKIP_REGULAR_EXPRESSION) and counts the test as skipped.
#define MOE_GPU_REQUIRE_DEVICE()                                                         \
  do {                                                                                   \
    const ::gpu_test::DeviceCheck &moe_gpu_check_ = ::gpu_test::device_check();         \
    if (moe_gpu_check_.verdict == ::gpu_test::Verdict::kSkip)                            \
      GTEST_SKIP() << "SKIPPED: " << moe_gpu_check_.reason;                              \
    if (moe_gpu_check_.verdict == ::gpu_test::Verdict::kFail) GTEST_FAIL() << moe_gpu_check_.reason; \
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
