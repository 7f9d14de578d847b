// The CUDA backend's table: device memory from the stream-ordered pool, the layer's stream and
// cuBLAS handle, plus the stage files of this folder. Built as libmoe_cuda.so, which libmoe.so
// loads with dlopen (src/core/module.cpp).
#include <cstdio>
#include <memory>

#include "cuda/cuda.h"
#include "cuda/status.h"

namespace moe::cuda {

void check(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the layer stays usable
  fail(status_of(e), "%s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

void check(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  cudaGetLastError();
  const moe_status st = status_of(s);
  fail(st, "%s failed: %s%s", what, cublasGetStatusString(s),
       st == MOE_ERR_INTERNAL ? " (the arguments libmoe passed were refused: a bug in libmoe)" : "");
}

void check_launch(const char *kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return;
  const moe_status st = launch_status_of(e);
  fail(st, "launching the %s kernel failed: %s (%s)%s", kernel, cudaGetErrorString(e), cudaGetErrorName(e),
       st == MOE_ERR_INTERNAL ? ": a launch configuration the device refuses is a bug in libmoe" : "");
}

DeviceScope::DeviceScope(int device) {
  int current = -1;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) {
    check(cudaSetDevice(device), "cudaSetDevice");
    previous_ = current;
  }
}

DeviceScope::~DeviceScope() {
  if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
}

void DeviceMemory::ensure(size_t bytes, State &st) {
  if (p_ && bytes_ >= bytes) return;
  void *p = nullptr;
  check(cudaMallocFromPoolAsync(&p, bytes, st.pool, st.stream), "cudaMallocFromPoolAsync");
  void *old = p_;
  p_ = p;
  bytes_ = bytes;
  stream_ = &st.stream;
  // On the stream, after the work queued on it; a failed free is reported by this call.
  if (old) check(cudaFreeAsync(old, st.stream), "cudaFreeAsync");
}

void PinnedMemory::ensure(size_t bytes) {
  if (p_ && bytes_ >= bytes) return;
  void *p = nullptr;
  check(cudaMallocHost(&p, bytes), "cudaMallocHost");
  void *old = p_;
  p_ = p;
  bytes_ = bytes;
  if (old) check(cudaFreeHost(old), "cudaFreeHost");
}

State::~State() {
  // Pending work first: scratch is freed on the stream, which must outlive it.
  if (stream) cudaStreamSynchronize(stream);
  for (DeviceMemory &m : scratch) m = DeviceMemory();
  if (stream) cudaStreamSynchronize(stream);
  if (blas) cublasDestroy(blas);
  if (own_stream) cudaStreamDestroy(own_stream);
  // Freed once its last allocation is (the core frees its buffers before the backend).
  if (pool) cudaMemPoolDestroy(pool);
  cudaGetLastError();
}

namespace {

// On failure the state is still handed back, so the core can read the reason with last_error
// before it destroys it (src/core/backend.h).
moe_status create(const moe_config *cfg, void **state) {
  *state = nullptr;
  std::unique_ptr<State> st;
  try {
    st = std::make_unique<State>();
  } catch (const std::bad_alloc &) {
    return MOE_ERR_OUT_OF_MEMORY;
  }
  State *s = st.get();
  const moe_status status = stage_status(s->error, [&] {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(MOE_ERR_DEVICE, "no usable CUDA device: cudaGetDeviceCount failed: %s (%s)", cudaGetErrorString(e),
           cudaGetErrorName(e));
    }
    if (cfg->device_index < 0 || cfg->device_index >= count)
      fail(MOE_ERR_DEVICE, "cfg->device_index is %d but this machine has %d CUDA device(s)", cfg->device_index, count);
    // The routing kernels keep a few rows of E floats per warp in shared memory.
    if (cfg->num_experts > 4096)
      fail(MOE_ERR_UNSUPPORTED, "cfg->num_experts is %lld: the CUDA backend routes at most 4096 experts",
           (long long)cfg->num_experts);
    s->device = cfg->device_index;
    DeviceScope scope(s->device);
    check(cudaDeviceGetAttribute(&s->sm_count, cudaDevAttrMultiProcessorCount, s->device), "cudaDeviceGetAttribute");
    int pools = 0;
    check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, s->device), "cudaDeviceGetAttribute");
    if (!pools) fail(MOE_ERR_DEVICE, "CUDA device %d has no stream-ordered memory pool", s->device);
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, s->device), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, s->device), "cudaDeviceGetAttribute");
    if (major < 8)
      fail(MOE_ERR_DEVICE, "CUDA device %d has compute capability %d.%d; libmoe_cuda is built for 8.0 and newer",
           s->device, major, minor);
    // A pool of the layer's own that keeps what it frees: the routing waits on the host every
    // forward, and the default pool would hand memory back to the driver at each wait. Its own,
    // so the application's default pool keeps its settings, and so that what it keeps is given
    // back when the core says memory was freed for good (`reserved` with trim: a context
    // destroyed, a buffer replaced by a larger one), not held as each layer's peak for ever.
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = s->device;
    check(cudaMemPoolCreate(&s->pool, &props), "cudaMemPoolCreate");
    uint64_t keep = UINT64_MAX;
    check(cudaMemPoolSetAttribute(s->pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
    s->tf32 = cfg->allow_tf32 != 0;
    // A blocking stream: it orders itself after work the caller put on the legacy default stream.
    check(cudaStreamCreate(&s->own_stream), "cudaStreamCreate");
    s->stream = s->own_stream;
    check(cublasCreate(&s->blas), "cublasCreate");
    // A split-K GEMM with a 16-bit C may otherwise add its partial results in 16 bits: the stages
    // promise float32 accumulation and one rounding of each output.
    check(cublasSetMathMode(s->blas, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                               CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
          "cublasSetMathMode");
    check(cublasSetStream(s->blas, s->stream), "cublasSetStream");
  });
  *state = st.release();
  return status;
}

void destroy(void *state) {
  auto *st = static_cast<State *>(state);
  if (!st) return;
  try {
    DeviceScope scope(st->device);
    std::unique_ptr<State> owned(st);
  } catch (...) {
    std::unique_ptr<State> owned(st);
  }
}

const char *last_error(void *state) { return static_cast<State *>(state)->error.c_str(); }

moe_status set_stream(void *state, void *stream) {
  return guarded(state, [&](State &st) {
    cudaStream_t s = stream ? static_cast<cudaStream_t>(stream) : st.own_stream;
    if (s == st.stream) return;
    // Work already queued on the old stream must finish before the new one may touch its buffers.
    check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize");
    check(cublasSetStream(st.blas, s), "cublasSetStream");
    st.stream = s;
  });
}

moe_status alloc(void *state, size_t bytes, void **out) {
  return guarded(state, [&](State &st) {
    void *p = nullptr;
    check(cudaMallocFromPoolAsync(&p, bytes ? bytes : 1, st.pool, st.stream), "cudaMallocFromPoolAsync");
    *out = p;
  });
}

void release(void *state, void *p) {
  auto *st = static_cast<State *>(state);
  if (!p) return;
  int current = -1;
  cudaGetDevice(&current);
  if (current != st->device) cudaSetDevice(st->device);
  cudaFreeAsync(p, st->stream);
  if (current >= 0 && current != st->device) cudaSetDevice(current);
  cudaGetLastError();  // nothing to report from a free; keep it from blaming the next launch
}

moe_status memset_zero(void *state, void *p, size_t bytes) {
  return guarded(state, [&](State &st) {
    if (bytes) check(cudaMemsetAsync(p, 0, bytes, st.stream), "cudaMemsetAsync");
  });
}

// Host copies are synchronous: the host buffer may be reused as soon as the call returns.
moe_status upload(void *state, void *dst, const void *host, size_t bytes) {
  return guarded(state, [&](State &st) {
    if (!bytes) return;
    check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, st.stream), "cudaMemcpyAsync (upload)");
    check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize (upload)");
  });
}

moe_status download(void *state, void *host, const void *src, size_t bytes) {
  return guarded(state, [&](State &st) {
    if (!bytes) return;
    check(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, st.stream), "cudaMemcpyAsync (download)");
    check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize (download)");
  });
}

moe_status copy(void *state, void *dst, const void *src, size_t bytes) {
  return guarded(state, [&](State &st) {
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st.stream), "cudaMemcpyAsync");
  });
}

moe_status check_pointer(void *state, const void *p) {
  return guarded(state, [&](State &st) {
    cudaPointerAttributes attr{};
    const cudaError_t e = cudaPointerGetAttributes(&attr, p);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(MOE_ERR_INVALID_ARGUMENT, "cannot query the pointer %p: %s", p, cudaGetErrorString(e));
    }
    if (attr.type == cudaMemoryTypeUnregistered || attr.type == cudaMemoryTypeHost)
      fail(MOE_ERR_INVALID_ARGUMENT, "%p is host memory; a CUDA layer on device %d needs device memory", p, st.device);
    if (attr.type == cudaMemoryTypeDevice && attr.device != st.device)
      fail(MOE_ERR_INVALID_ARGUMENT, "%p is memory of CUDA device %d; this layer runs on device %d", p, attr.device,
           st.device);
  });
}

moe_status synchronize(void *state) {
  return guarded(state, [&](State &st) { check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize"); });
}

void *stream_of(void *state) { return static_cast<State *>(state)->stream; }

// Trimming gives back what no buffer holds: the layer's pool keeps freed memory for reuse
// (cudaMemPoolAttrReleaseThreshold is UINT64_MAX, so that the routing's host wait each forward
// does not hand it back), and the core asks for it when memory has been freed for good.
moe_status reserved(void *state, int trim, size_t *bytes) {
  return guarded(state, [&](State &st) {
    if (trim) {
      check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize");
      check(cudaMemPoolTrimTo(st.pool, 0), "cudaMemPoolTrimTo");
    }
    uint64_t held = 0;
    check(cudaMemPoolGetAttribute(st.pool, cudaMemPoolAttrReservedMemCurrent, &held), "cudaMemPoolGetAttribute");
    *bytes = static_cast<size_t>(held);
  });
}

const moe_backend_ops kOps = {
    MOE_BACKEND_ABI, "cuda", create, destroy, last_error, set_stream, alloc, release, memset_zero, upload, download,
    copy, check_pointer, find_nonfinite, convert, synchronize,
    gate, select, plan, dispatch, expert_ffn, combine, shared_combine,
    shared_combine_bwd, combine_bwd, expert_ffn_bwd, dispatch_bwd, select_bwd, gate_bwd, stream_of, reserved,
};

}  // namespace
}  // namespace moe::cuda

extern "C" __attribute__((visibility("default"))) const moe_backend_ops *moe_cuda_backend_v1(uint32_t abi) {
  return abi == MOE_BACKEND_ABI ? &moe::cuda::kOps : nullptr;
}
