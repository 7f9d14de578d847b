// The CUDA module's status mapping (src/cuda/status.h), checked on the host: which moe_status a
// failure of the CUDA runtime, of a kernel launch and of cuBLAS becomes.
#include <gtest/gtest.h>

#include "cuda/status.h"

namespace {

using moe::cuda::launch_status_of;
using moe::cuda::status_of;

TEST(CudaStatus, RuntimeErrors) {
  EXPECT_EQ(status_of(cudaSuccess), MOE_OK);
  EXPECT_EQ(status_of(cudaErrorMemoryAllocation), MOE_ERR_OUT_OF_MEMORY);
  for (cudaError_t e : {cudaErrorInvalidValue, cudaErrorIllegalAddress, cudaErrorLaunchFailure, cudaErrorNoDevice,
                        cudaErrorInsufficientDriver, cudaErrorInvalidResourceHandle, cudaErrorUnknown})
    EXPECT_EQ(status_of(e), MOE_ERR_DEVICE) << cudaGetErrorName(e);
}

TEST(CudaStatus, LaunchConfigurationsAreLibmoesOwn) {
  EXPECT_EQ(launch_status_of(cudaSuccess), MOE_OK);
  EXPECT_EQ(launch_status_of(cudaErrorInvalidConfiguration), MOE_ERR_INTERNAL);
  EXPECT_EQ(launch_status_of(cudaErrorLaunchOutOfResources), MOE_ERR_INTERNAL);
  EXPECT_EQ(launch_status_of(cudaErrorMemoryAllocation), MOE_ERR_OUT_OF_MEMORY);
  // A kernel image missing for this device, or a fault left by earlier work: the device's.
  EXPECT_EQ(launch_status_of(cudaErrorNoKernelImageForDevice), MOE_ERR_DEVICE);
  EXPECT_EQ(launch_status_of(cudaErrorIllegalAddress), MOE_ERR_DEVICE);
}

TEST(CudaStatus, CublasArgumentsAreLibmoesOwn) {
  EXPECT_EQ(status_of(CUBLAS_STATUS_SUCCESS), MOE_OK);
  EXPECT_EQ(status_of(CUBLAS_STATUS_ALLOC_FAILED), MOE_ERR_OUT_OF_MEMORY);
  EXPECT_EQ(status_of(CUBLAS_STATUS_INVALID_VALUE), MOE_ERR_INTERNAL);
  EXPECT_EQ(status_of(CUBLAS_STATUS_NOT_SUPPORTED), MOE_ERR_INTERNAL);
  for (cublasStatus_t s : {CUBLAS_STATUS_NOT_INITIALIZED, CUBLAS_STATUS_ARCH_MISMATCH, CUBLAS_STATUS_MAPPING_ERROR,
                           CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_INTERNAL_ERROR, CUBLAS_STATUS_LICENSE_ERROR})
    EXPECT_EQ(status_of(s), MOE_ERR_DEVICE) << static_cast<int>(s);
}

}  // namespace
