// Says which GPU the results come from and exits 0; or, by the rule of device_rules.h, prints why
// there is none and exits 77 (ctest's skip code), or why the one there cannot be used (or that
// MOE_REQUIRE_GPU wants one) and exits 1. Run before the compute-sanitizer entries so that they
// report the same.
#include <cuda_runtime_api.h>

#include <cstdio>

#include "device_rules.h"

int main() {
  const gpu_test::DeviceCheck &check = gpu_test::device_check();
  if (check.verdict == gpu_test::Verdict::kSkip) {
    std::printf("SKIPPED: %s\n", check.reason.c_str());
    return 77;
  }
  if (check.verdict == gpu_test::Verdict::kFail) {
    std::printf("FAILED: %s\n", check.reason.c_str());
    return 1;
  }
  int n = 0, runtime = 0, driver = 0;
  cudaGetDeviceCount(&n);
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) == cudaSuccess)
    std::printf("%d CUDA device(s); device 0: %s, compute capability %d.%d, %zu MiB; runtime %d, driver %d\n", n,
                p.name, p.major, p.minor, p.totalGlobalMem >> 20, runtime, driver);
  return 0;
}
