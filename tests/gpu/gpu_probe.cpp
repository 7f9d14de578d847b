// Exits 0 when this process sees a CUDA device, else prints why and exits 77 (ctest's skip code):
// run before the compute-sanitizer entries so that they report SKIPPED on a machine without one.
#include <cuda_runtime_api.h>

#include <cstdio>

int main() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    std::printf("SKIPPED: no CUDA device (cudaGetDeviceCount: %s: %s)\n", cudaGetErrorName(e), cudaGetErrorString(e));
    return 77;
  }
  if (n <= 0) {
    std::printf("SKIPPED: no CUDA device (cudaGetDeviceCount reports 0 devices)\n");
    return 77;
  }
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) == cudaSuccess)
    std::printf("%d CUDA device(s); device 0: %s, compute capability %d.%d, %zu MiB; runtime %d, driver %d\n", n,
                p.name, p.major, p.minor, p.totalGlobalMem >> 20, runtime, driver);
  return 0;
}
