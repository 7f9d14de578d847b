// Which moe_status a failure of the CUDA runtime or of cuBLAS becomes. Plain functions of the
// codes, with no CUDA call, so that the unit tests check them on a machine without a device.
#pragma once
#include <cublas_api.h>
#include <driver_types.h>

#include "moe/moe.h"

namespace moe::cuda {

// A runtime call: out of memory, or the device (or the runtime) failed.
inline moe_status status_of(cudaError_t e) {
  if (e == cudaSuccess) return MOE_OK;
  return e == cudaErrorMemoryAllocation ? MOE_ERR_OUT_OF_MEMORY : MOE_ERR_DEVICE;
}

// A kernel launch. Its configuration (grid, block, shared memory, registers per block) is
// libmoe's own choice, so a configuration the device refuses is a libmoe bug.
inline moe_status launch_status_of(cudaError_t e) {
  if (e == cudaErrorInvalidConfiguration || e == cudaErrorLaunchOutOfResources) return MOE_ERR_INTERNAL;
  return status_of(e);
}

// cuBLAS. INVALID_VALUE and NOT_SUPPORTED answer arguments libmoe chose (shapes, leading
// dimensions, type combinations), after every argument of the caller has been checked: a libmoe
// bug. ALLOC_FAILED is memory; the rest (not initialised, architecture mismatch, execution
// failed, cuBLAS's internal errors) come from the device or its driver.
inline moe_status status_of(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return MOE_OK;
    case CUBLAS_STATUS_ALLOC_FAILED: return MOE_ERR_OUT_OF_MEMORY;
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_NOT_SUPPORTED: return MOE_ERR_INTERNAL;
    default: return MOE_ERR_DEVICE;
  }
}

}  // namespace moe::cuda
