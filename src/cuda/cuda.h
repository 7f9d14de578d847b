// Shared pieces of the CUDA backend's stage files: the state of one layer's backend, error
// handling, launch helpers and the stage entry points.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/backend.h"
#include "core/checked.h"
#include "core/error.h"
#include "core/stage_status.h"

namespace moe::cuda {

struct State;

// Device memory from the layer's stream-ordered pool, owned RAII-style. Freed on the layer's
// stream as it is at that time (the caller may have replaced the stream it was allocated on), so
// a buffer may be dropped while kernels that use it are still queued.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(DeviceMemory &&o) noexcept { swap(o); }
  DeviceMemory &operator=(DeviceMemory &&o) noexcept {
    DeviceMemory tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  DeviceMemory(const DeviceMemory &) = delete;
  DeviceMemory &operator=(const DeviceMemory &) = delete;
  // A destructor cannot report: a failed free is cleared here, so that the next kernel launch
  // does not find it and report it as its own. ensure() frees through check() and reports.
  ~DeviceMemory() {
    if (p_ && cudaFreeAsync(p_, *stream_) != cudaSuccess) cudaGetLastError();
  }
  void swap(DeviceMemory &o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    std::swap(stream_, o.stream_);
  }
  // Grow-only: keeps the memory when it is large enough. stream is the State's member.
  void ensure(size_t bytes, State &st);
  template <class T>
  T *as() const { return static_cast<T *>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void *p_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t *stream_ = nullptr;
};

// Pinned host memory for the few results that must reach the host (counts, aux-loss sums).
class PinnedMemory {
 public:
  PinnedMemory() = default;
  PinnedMemory(const PinnedMemory &) = delete;
  PinnedMemory &operator=(const PinnedMemory &) = delete;
  ~PinnedMemory() {
    if (p_ && cudaFreeHost(p_) != cudaSuccess) cudaGetLastError();
  }
  void ensure(size_t bytes);
  template <class T>
  T *as() const { return static_cast<T *>(p_); }

 private:
  void *p_ = nullptr;
  size_t bytes_ = 0;
};

struct State {
  std::string error;
  int device = 0;
  int sm_count = 0;
  bool tf32 = false;
  cudaStream_t own_stream = nullptr;  // made at create; used until the caller sets one
  cudaStream_t stream = nullptr;      // the layer's stream: every kernel, copy and GEMM runs on it
  cublasHandle_t blas = nullptr;
  cudaMemPool_t pool = nullptr;  // every allocation of the layer comes from it
  // Scratch reused from call to call (grow-only), for stages whose temporaries are not workspace
  // buffers of the core.
  DeviceMemory scratch[4];
  PinnedMemory host;

  State() = default;
  State(const State &) = delete;
  State &operator=(const State &) = delete;
  ~State();
};

// Throws moe::Error for a failed runtime or cuBLAS call, naming the call, with the status of
// cuda/status.h: allocation failures are MOE_ERR_OUT_OF_MEMORY, arguments cuBLAS refuses
// MOE_ERR_INTERNAL (they are libmoe's), the rest MOE_ERR_DEVICE.
void check(cudaError_t e, const char *what);
void check(cublasStatus_t s, const char *what);
// After a kernel launch: a bad configuration is reported here, faults at the next sync.
void check_launch(const char *kernel);

// Makes the layer's device current for the calling thread for the scope (threads may call
// different layers; cudaSetDevice is per thread).
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope &) = delete;
  DeviceScope &operator=(const DeviceScope &) = delete;

 private:
  int previous_ = -1;
};

inline void set_error(State *st, const char *message) noexcept { keep_message(st->error, message); }

// Runs a stage body on the layer's device, turning exceptions into a status and the message.
template <class F>
moe_status guarded(void *state, F &&body) noexcept {
  auto *st = static_cast<State *>(state);
  return stage_status(st->error, [&] {
    DeviceScope scope(st->device);
    // An error left by earlier work of the application would be reported by our first launch
    // check as our own: take it out of the way (a sticky one recurs at our first call).
    cudaGetLastError();
    body(*st);
  });
}

// Blocks for a grid-stride loop over n elements: enough to fill the device, no more.
inline unsigned stride_blocks(const State &st, int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads, cap = int64_t{st.sm_count > 0 ? st.sm_count : 16} * 16;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > (int64_t{1} << 30) ? (int64_t{1} << 30) : b));
}

// out[t] = sum over t's rows r of (weight[r] *) src[r], src in a->dtype, out float32 (combine.cu;
// used by dispatch_bwd).
void sum_token_rows(State &st, const moe_rows_args *a, const void *src, const float *weight, float *out);

// dst[i] = src[i] for n elements, converted between dtypes, queued on the layer's stream
// (convert.cu).
void convert_elements(State &st, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n);

// Table entries on activation memory (convert.cu).
moe_status find_nonfinite(void *, const void *, int, int64_t, int64_t *);
moe_status convert(void *, void *, int, const void *, int, int64_t);

// Stage entry points (one file each, named for the stage as in src/cpu).
moe_status gate(void *, const moe_gate_args *);
moe_status gate_bwd(void *, const moe_gate_args *);
moe_status select(void *, const moe_select_args *);
moe_status select_bwd(void *, const moe_select_bwd_args *);
moe_status plan(void *, const moe_plan_args *);
moe_status dispatch(void *, const moe_rows_args *);
moe_status dispatch_bwd(void *, const moe_rows_args *);
moe_status expert_ffn(void *, const moe_ffn_args *);
moe_status expert_ffn_bwd(void *, const moe_ffn_args *);
moe_status combine(void *, const moe_rows_args *);
moe_status combine_bwd(void *, const moe_rows_args *);
moe_status shared_combine(void *, const moe_shared_args *);
moe_status shared_combine_bwd(void *, const moe_shared_args *);

}  // namespace moe::cuda
