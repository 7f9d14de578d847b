// When a GPU test may report itself skipped, and when it must fail: the one rule of the GPU test
// battery (the gtest cases, gpu_probe, the compute-sanitizer entries), written as a function of
// what the CUDA runtime said so that the unit tests check it with faked error codes.
//
//  - A device: run.
//  - cudaErrorNoDevice (or a count of 0): no GPU on this machine: skip, with the reason.
//  - cudaErrorInsufficientDriver where no NVIDIA driver is installed at all (libcuda.so.1 cannot
//    be loaded): the CUDA runtime says this on a machine without a driver, i.e. without a GPU:
//    skip. With a driver installed it means the driver is older than the runtime: fail.
//  - Any other error (cudaErrorCompatNotSupportedOnDevice, cudaErrorSystemNotReady, ...): a GPU
//    may be there but cannot be used: fail, naming the error.
//  - MOE_REQUIRE_GPU set to anything but "" or "0" (the GPU machine runs with it): every skip is a
//    failure, so that a run that tested nothing cannot pass.
#pragma once

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace gpu_test {

enum class Verdict { kRun, kSkip, kFail };

struct DeviceCheck {
  Verdict verdict = Verdict::kFail;
  std::string reason;  // why the tests are skipped or fail; empty when they run
};

inline bool require_gpu(const char *env_value) {
  return env_value != nullptr && env_value[0] != '\0' && std::strcmp(env_value, "0") != 0;
}

// Whether an NVIDIA driver is installed: the driver's library can be loaded (and is at once let go).
inline bool driver_installed() {
  void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (!h) return false;
  dlclose(h);
  return true;
}

// e and count: what cudaGetDeviceCount returned.
inline DeviceCheck judge(cudaError_t e, int count, bool driver, bool required) {
  DeviceCheck c;
  const std::string err = e == cudaSuccess ? std::string()
                                           : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  if (e == cudaSuccess && count > 0) {
    c.verdict = Verdict::kRun;
    return c;
  }
  if (e == cudaSuccess) {
    c.verdict = Verdict::kSkip;
    c.reason = "no CUDA device (cudaGetDeviceCount reports " + std::to_string(count) + " devices)";
  } else if (e == cudaErrorNoDevice) {
    c.verdict = Verdict::kSkip;
    c.reason = "no CUDA device (cudaGetDeviceCount: " + err + ")";
  } else if (e == cudaErrorInsufficientDriver && !driver) {
    c.verdict = Verdict::kSkip;
    c.reason = "no CUDA device: no NVIDIA driver is installed (libcuda.so.1 cannot be loaded; cudaGetDeviceCount: " +
               err + ")";
  } else {
    c.verdict = Verdict::kFail;
    c.reason = "the CUDA runtime cannot use this machine's GPU: cudaGetDeviceCount failed with " + err +
               (e == cudaErrorInsufficientDriver ? " (an NVIDIA driver is installed, older than this CUDA runtime)" : "");
    return c;
  }
  if (required) {
    c.verdict = Verdict::kFail;
    c.reason = "MOE_REQUIRE_GPU is set, but " + c.reason;
  }
  return c;
}

// This process's answer: asked once (it cannot change), and never before a test case runs, so that
// listing the tests touches no CUDA API.
inline const DeviceCheck &device_check() {
  static const DeviceCheck check = [] {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    (void)cudaGetLastError();
    return judge(e, n, e == cudaErrorInsufficientDriver ? driver_installed() : true,
                 require_gpu(std::getenv("MOE_REQUIRE_GPU")));
  }();
  return check;
}

}  // namespace gpu_test
