// moe-gpu-peak: the current CUDA device's own reference rates, against which moe-bench and the
// PyTorch scripts are judged (bench/compare_gpu.sh): dense bf16 GEMM (cublasGemmEx, bf16 inputs
// and output, fp32 accumulation) and device-to-device copy bandwidth. Prints one JSON object.
//
//   moe-gpu-peak [--device N] [--gemm-size N (8192)] [--copy-mib N (1024)] [--iters N (20)]
//
// Each figure is the median of `iters` runs timed with CUDA events after warm-up runs, so clocks
// have ramped up and cuBLAS has chosen its kernel. Inputs are random, non-zero bf16: all-zero
// operands draw less power and would flatter the GEMM rate.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string &what) {
  std::fprintf(stderr, "moe-gpu-peak: %s\n", what.c_str());
  std::exit(1);
}

void cuda_ok(cudaError_t e, const char *what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorString(e));
}

void cublas_ok(cublasStatus_t s, const char *what) {
  if (s != CUBLAS_STATUS_SUCCESS) die(std::string(what) + ": cuBLAS status " + std::to_string(static_cast<int>(s)));
}

__global__ void fill_random_bf16(__nv_bfloat16 *p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (i + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = __float2bfloat16((z & 1 ? 1.0f : -1.0f) * (0.1f + 0.9f * u));
  }
}

struct DeviceMemory {
  void *p = nullptr;
  explicit DeviceMemory(size_t bytes) { cuda_ok(cudaMalloc(&p, bytes), "cudaMalloc"); }
  ~DeviceMemory() { cudaFree(p); }
  DeviceMemory(const DeviceMemory &) = delete;
  DeviceMemory &operator=(const DeviceMemory &) = delete;
};

struct Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    cuda_ok(cudaEventCreate(&start), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
};

// Median milliseconds of `iters` runs of op on stream, after `warmup` untimed runs.
template <class Op>
double median_ms(cudaStream_t stream, int warmup, int iters, Op op) {
  for (int i = 0; i < warmup; ++i) op();
  cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize (warm-up)");
  Events ev;
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    cuda_ok(cudaEventRecord(ev.start, stream), "cudaEventRecord");
    op();
    cuda_ok(cudaEventRecord(ev.stop, stream), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(ev.stop), "cudaEventSynchronize");
    float t = 0;
    cuda_ok(cudaEventElapsedTime(&t, ev.start, ev.stop), "cudaEventElapsedTime");
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const size_t m = ms.size();
  return m % 2 ? ms[m / 2] : 0.5 * (ms[m / 2 - 1] + ms[m / 2]);
}

long long arg_value(int &i, int argc, char **argv) {
  if (i + 1 >= argc) die(std::string(argv[i]) + " needs a value");
  char *end = nullptr;
  const long long v = std::strtoll(argv[++i], &end, 10);
  if (*end || v < 0) die(std::string(argv[i - 1]) + " expects a non-negative integer, got '" + argv[i] + "'");
  return v;
}

}  // namespace

int main(int argc, char **argv) {
  int device = 0, iters = 20;
  long long n = 8192, copy_mib = 1024;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device") device = static_cast<int>(arg_value(i, argc, argv));
    else if (a == "--gemm-size") n = arg_value(i, argc, argv);
    else if (a == "--copy-mib") copy_mib = arg_value(i, argc, argv);
    else if (a == "--iters") iters = static_cast<int>(arg_value(i, argc, argv));
    else if (a == "-h" || a == "--help") {
      std::printf("usage: moe-gpu-peak [--device N] [--gemm-size N (8192)] [--copy-mib N (1024)] [--iters N (20)]\n");
      return 0;
    } else {
      die("unknown option '" + a + "' (see --help)");
    }
  }
  if (n < 1 || n > 65536 || copy_mib < 1 || iters < 1) die("sizes and --iters must be >= 1 (gemm-size <= 65536)");

  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  // ---- dense bf16 GEMM: C[n,n] = A[n,n] B[n,n] ----
  const size_t elems = static_cast<size_t>(n) * static_cast<size_t>(n);
  double gemm_ms = 0;
  {
    DeviceMemory a(elems * 2), b(elems * 2), c(elems * 2);
    fill_random_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16 *>(a.p), elems, 1);
    fill_random_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16 *>(b.p), elems, 2);
    cuda_ok(cudaGetLastError(), "fill_random_bf16");
    cublasHandle_t h;
    cublas_ok(cublasCreate(&h), "cublasCreate");
    cublas_ok(cublasSetStream(h, stream), "cublasSetStream");
    const float alpha = 1.0f, beta = 0.0f;
    const int ni = static_cast<int>(n);
    gemm_ms = median_ms(stream, 3, iters, [&] {
      cublas_ok(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &alpha, a.p, CUDA_R_16BF, ni, b.p, CUDA_R_16BF,
                             ni, &beta, c.p, CUDA_R_16BF, ni, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "cublasGemmEx");
    });
    cublasDestroy(h);
  }
  const double gemm_tflops = 2.0 * static_cast<double>(n) * n * n / (gemm_ms * 1e-3) / 1e12;

  // ---- device-to-device copy ----
  const size_t copy_bytes = static_cast<size_t>(copy_mib) << 20;
  double copy_ms = 0;
  {
    DeviceMemory src(copy_bytes), dst(copy_bytes);
    cuda_ok(cudaMemsetAsync(src.p, 0x3C, copy_bytes, stream), "cudaMemsetAsync");
    copy_ms = median_ms(stream, 3, iters, [&] {
      cuda_ok(cudaMemcpyAsync(dst.p, src.p, copy_bytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
    });
  }
  // A copy reads and writes every byte: memory traffic is twice the bytes copied. Reading weights
  // once (the bound compare_gpu.sh uses) moves at the traffic rate, not the copy rate.
  const double copy_gbps = static_cast<double>(copy_bytes) / (copy_ms * 1e-3) / 1e9;
  cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");

  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  std::printf("{\"device\": \"%s\", \"device_index\": %d, \"compute_capability\": \"%d.%d\", \"sms\": %d, "
              "\"memory_gib\": %.1f, \"cuda_runtime\": %d, \"cuda_driver\": %d, \"iters\": %d, "
              "\"gemm\": {\"dtype\": \"bf16\", \"compute\": \"fp32\", \"m\": %lld, \"n\": %lld, \"k\": %lld, "
              "\"ms_median\": %.4f, \"tflops\": %.2f}, "
              "\"copy\": {\"bytes\": %zu, \"ms_median\": %.4f, \"copy_gbps\": %.1f, \"traffic_gbps\": %.1f}}\n",
              prop.name, device, prop.major, prop.minor, prop.multiProcessorCount,
              static_cast<double>(prop.totalGlobalMem) / (1ull << 30), runtime, driver, iters, n, n, n, gemm_ms,
              gemm_tflops, copy_bytes, copy_ms, copy_gbps, 2.0 * copy_gbps);
  return 0;
}
