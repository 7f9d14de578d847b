// The GPU test battery's rule for skipping (tests/gpu/device_rules.h), with faked answers of
// cudaGetDeviceCount: only "no GPU here" skips, an unusable GPU fails naming the error, and
// MOE_REQUIRE_GPU turns every skip into a failure.
#include <gtest/gtest.h>

#include <string>

#include "gpu/device_rules.h"

namespace {

using gpu_test::judge;
using gpu_test::Verdict;

bool mentions(const std::string &text, const char *what) { return text.find(what) != std::string::npos; }

TEST(GpuDeviceRules, ADeviceRuns) {
  for (bool required : {false, true}) {
    const gpu_test::DeviceCheck c = judge(cudaSuccess, 2, true, required);
    EXPECT_EQ(c.verdict, Verdict::kRun);
    EXPECT_TRUE(c.reason.empty()) << c.reason;
  }
}

TEST(GpuDeviceRules, NoDeviceSkipsWithTheReason) {
  gpu_test::DeviceCheck c = judge(cudaErrorNoDevice, 0, true, false);
  EXPECT_EQ(c.verdict, Verdict::kSkip);
  EXPECT_TRUE(mentions(c.reason, "cudaErrorNoDevice")) << c.reason;
  c = judge(cudaSuccess, 0, true, false);
  EXPECT_EQ(c.verdict, Verdict::kSkip);
  EXPECT_TRUE(mentions(c.reason, "0 devices")) << c.reason;
  // No driver installed at all: the runtime's answer on a machine without a GPU.
  c = judge(cudaErrorInsufficientDriver, 0, false, false);
  EXPECT_EQ(c.verdict, Verdict::kSkip);
  EXPECT_TRUE(mentions(c.reason, "libcuda.so.1")) << c.reason;
}

TEST(GpuDeviceRules, AnUnusableDeviceFailsNamingTheError) {
  // A driver older than the runtime, a device the compatibility package does not support, a
  // system not ready (fabric manager), anything else: a GPU may be there, so nothing was tested.
  for (cudaError_t e : {cudaErrorInsufficientDriver, cudaErrorCompatNotSupportedOnDevice, cudaErrorSystemNotReady,
                        cudaErrorInitializationError, cudaErrorDevicesUnavailable, cudaErrorUnknown}) {
    const gpu_test::DeviceCheck c = judge(e, 0, true, false);
    EXPECT_EQ(c.verdict, Verdict::kFail) << cudaGetErrorName(e);
    EXPECT_TRUE(mentions(c.reason, cudaGetErrorName(e))) << c.reason;
  }
  EXPECT_TRUE(mentions(judge(cudaErrorInsufficientDriver, 0, true, false).reason, "older than"));
}

TEST(GpuDeviceRules, RequireGpuTurnsEverySkipIntoAFailure) {
  for (const gpu_test::DeviceCheck &c : {judge(cudaErrorNoDevice, 0, true, true), judge(cudaSuccess, 0, true, true),
                                         judge(cudaErrorInsufficientDriver, 0, false, true)}) {
    EXPECT_EQ(c.verdict, Verdict::kFail);
    EXPECT_TRUE(mentions(c.reason, "MOE_REQUIRE_GPU")) << c.reason;
  }
  EXPECT_EQ(judge(cudaErrorSystemNotReady, 0, true, true).verdict, Verdict::kFail);
}

TEST(GpuDeviceRules, RequireGpuValues) {
  EXPECT_FALSE(gpu_test::require_gpu(nullptr));
  EXPECT_FALSE(gpu_test::require_gpu(""));
  EXPECT_FALSE(gpu_test::require_gpu("0"));
  EXPECT_TRUE(gpu_test::require_gpu("1"));
  EXPECT_TRUE(gpu_test::require_gpu("yes"));
}

}  // namespace
