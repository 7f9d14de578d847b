// What moe-bench's single-rank and expert-parallel runs share: failing loudly, reproducible
// random activations, the CUDA runtime (loaded with dlopen, so that the bench runs on machines
// without it) and buffers on the layer's device, and the median/min summary of timed iterations.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <vector>

#include <moe/moe.h>

namespace moe_bench {

[[noreturn]] inline void die(const char *fmt, const char *a = "", const char *b = "") {
  std::fprintf(stderr, "moe-bench: ");
  std::fprintf(stderr, fmt, a, b);
  std::fprintf(stderr, "\n");
  std::exit(1);
}

inline void check(moe_status st, const char *what) {
  if (st == MOE_OK) return;
  std::fprintf(stderr, "moe-bench: %s failed: %s: %s\n", what, moe_status_name(st), moe_last_error());
  std::exit(1);
}

// ---- a small deterministic PRNG ---------------------------------------------------------------
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // uniform in ±[0.1, 1): random and never zero
  float nonzero() {
    double u = static_cast<double>(next() >> 11) * 0x1.0p-53;
    double m = 0.1 + 0.9 * u;
    return static_cast<float>((next() & 1) ? m : -m);
  }
};

// ---- activations on the layer's device --------------------------------------------------------
struct Cuda {
  void *lib = nullptr;
  int (*malloc_)(void **, size_t) = nullptr;
  int (*free_)(void *) = nullptr;
  int (*memcpy_)(void *, const void *, size_t, int) = nullptr;
  int (*sync)() = nullptr;
  int (*set_device)(int) = nullptr;
  const char *(*error_string)(int) = nullptr;

  void open() {
    for (const char *n : {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"})
      if ((lib = dlopen(n, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    if (!lib) die("CUDA runtime (libcudart.so) not found: %s", dlerror());
    malloc_ = reinterpret_cast<decltype(malloc_)>(dlsym(lib, "cudaMalloc"));
    free_ = reinterpret_cast<decltype(free_)>(dlsym(lib, "cudaFree"));
    memcpy_ = reinterpret_cast<decltype(memcpy_)>(dlsym(lib, "cudaMemcpy"));
    sync = reinterpret_cast<decltype(sync)>(dlsym(lib, "cudaDeviceSynchronize"));
    set_device = reinterpret_cast<decltype(set_device)>(dlsym(lib, "cudaSetDevice"));
    error_string = reinterpret_cast<decltype(error_string)>(dlsym(lib, "cudaGetErrorString"));
    if (!malloc_ || !free_ || !memcpy_ || !sync || !set_device || !error_string) die("libcudart lacks the functions moe-bench needs");
  }
  void ok(int e, const char *what) {
    if (e != 0) die("%s failed: %s", what, error_string(e));
  }
};

struct DeviceBuffer {
  Cuda *cuda = nullptr;  // null: host memory
  void *p = nullptr;
  std::vector<unsigned char> host;
  DeviceBuffer(Cuda *c, const std::vector<unsigned char> &bytes) : cuda(c) {
    if (!cuda) {
      host = bytes;
      if (host.empty()) host.resize(1);
      p = host.data();
    } else {
      cuda->ok(cuda->malloc_(&p, std::max<size_t>(bytes.size(), 1)), "cudaMalloc");
      if (!bytes.empty()) cuda->ok(cuda->memcpy_(p, bytes.data(), bytes.size(), 1), "cudaMemcpy");
    }
  }
  ~DeviceBuffer() {
    if (cuda && p) cuda->free_(p);
  }
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
};

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even (inputs are finite)
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

inline std::vector<unsigned char> random_activations(int64_t n, moe_dtype dtype, Rng &rng) {
  const size_t es = dtype == MOE_DTYPE_F32 ? 4 : 2;
  std::vector<unsigned char> out(static_cast<size_t>(n) * es);
  for (int64_t i = 0; i < n; ++i) {
    float v = rng.nonzero();
    if (dtype == MOE_DTYPE_F32) {
      std::memcpy(out.data() + i * 4, &v, 4);
    } else {
      uint16_t h = dtype == MOE_DTYPE_BF16 ? to_bf16(v) : to_f16(v);
      std::memcpy(out.data() + i * 2, &h, 2);
    }
  }
  return out;
}

struct Timing {
  double median_ms = 0, min_ms = 0;
};

inline Timing summarize(std::vector<double> ms) {
  Timing t;
  if (ms.empty()) return t;
  std::sort(ms.begin(), ms.end());
  const size_t m = ms.size();
  t.median_ms = m % 2 ? ms[m / 2] : 0.5 * (ms[m / 2 - 1] + ms[m / 2]);
  t.min_ms = ms.front();
  return t;
}

}  // namespace moe_bench
