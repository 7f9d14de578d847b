// Error handling and RAII owners for libmoe_nccl (src/comm/nccl.cpp): every NCCL and CUDA result
// becomes a Failure carrying a moe_status and the library's own message, which the extern "C"
// functions turn into a status and the thread's error text. Nothing here prints or aborts.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <string>
#include <utility>

#include "moe/moe.h"

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < 2700
#error "libmoe_nccl needs NCCL 2.7 or later (ncclSend/ncclRecv)"
#endif

namespace moe_nccl {

struct Failure {
  moe_status status;
  std::string message;
};

[[noreturn]] void fail(moe_status status, std::string message);

// Sets the calling thread's error text (moe_nccl_last_error); never throws.
void record_error(const char *fn, const std::string &message) noexcept;

// A CUDA error as a Failure: MOE_ERR_OUT_OF_MEMORY for an allocation failure, else MOE_ERR_COMM.
void cuda_ok(cudaError_t e, const char *what);

// An NCCL result as a Failure (MOE_ERR_COMM). ncclInProgress (a non-blocking communicator) is
// waited out first; then the communicator's asynchronous error is checked, since a failure of an
// earlier operation (a dead peer, a network error) is only reported there.
void nccl_ok(ncclComm_t comm, ncclResult_t r, const char *what);

// Fails if the communicator holds an asynchronous error (ncclInProgress counts as none).
void check_async(ncclComm_t comm, const char *when);

// Makes `device` current for its lifetime: the hooks run on the caller's thread, whose current
// device may be another one than the communicator's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;

 private:
  int previous_ = -1;
};

// cudaMalloc'd (device) or cudaMallocHost'd (pinned host) bytes, freed on destruction.
class CudaMemory {
 public:
  enum Kind { kDevice, kPinnedHost };
  CudaMemory() = default;
  CudaMemory(Kind kind, size_t bytes, int device);
  ~CudaMemory();
  CudaMemory(CudaMemory &&o) noexcept { swap(o); }
  CudaMemory &operator=(CudaMemory &&o) noexcept {
    CudaMemory(std::move(o)).swap(*this);
    return *this;
  }
  void *get() const { return p_; }

 private:
  void swap(CudaMemory &o) noexcept {
    std::swap(p_, o.p_);
    std::swap(kind_, o.kind_);
    std::swap(device_, o.device_);
  }
  void *p_ = nullptr;
  Kind kind_ = kDevice;
  int device_ = 0;
};

// ncclGroupStart on construction; end() closes the group and checks it. A group left by an
// exception is closed too: otherwise the thread's next NCCL calls would join it.
class Group {
 public:
  explicit Group(ncclComm_t comm);
  ~Group();
  void end();
  Group(const Group &) = delete;
  Group &operator=(const Group &) = delete;

 private:
  ncclComm_t comm_;
  bool open_ = false;
};

}  // namespace moe_nccl
