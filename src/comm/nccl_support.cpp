#include "comm/nccl_support.h"

#include "moe/moe_nccl.h"

#include <chrono>
#include <thread>

namespace moe_nccl {
namespace {

thread_local std::string t_last_error;

// NCCL's detailed text of its last error (a warning with the failing peer, a CUDA error), when
// this NCCL has ncclGetLastError (2.13); it may describe an earlier failure, hence "NCCL says".
std::string nccl_detail(ncclComm_t comm) {
#if NCCL_VERSION_CODE >= 21300
  const char *s = ncclGetLastError(comm);
  if (s && *s) return std::string(" (NCCL says: ") + s + ")";
#else
  (void)comm;
#endif
  return {};
}

ncclResult_t wait_in_progress(ncclComm_t comm, ncclResult_t r) {
#if NCCL_VERSION_CODE >= 21400
  // A non-blocking communicator finishes the call in the background; polling is NCCL's documented
  // way to wait for it (there is nothing to block on).
  for (unsigned spins = 0; r == ncclInProgress && comm; ++spins) {
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &async) != ncclSuccess) break;
    r = async;
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
#endif
  return r;
}

}  // namespace

void fail(moe_status status, std::string message) { throw Failure{status, std::move(message)}; }

void record_error(const char *fn, const std::string &message) noexcept {
  try {
    t_last_error = std::string(fn) + ": " + message;
  } catch (...) {
    t_last_error.clear();  // no memory for the text: the status still says what happened
  }
}

void cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return;
  // A non-sticky error would otherwise be reported again by the caller's next cudaGetLastError.
  (void)cudaGetLastError();
  fail(e == cudaErrorMemoryAllocation ? MOE_ERR_OUT_OF_MEMORY : MOE_ERR_COMM,
       std::string(what) + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

void check_async(ncclComm_t comm, const char *when) {
  ncclResult_t async = ncclSuccess;
  ncclResult_t r = ncclCommGetAsyncError(comm, &async);
  if (r != ncclSuccess)
    fail(MOE_ERR_COMM, std::string("ncclCommGetAsyncError ") + when + " failed: " + ncclGetErrorString(r) +
                           nccl_detail(comm));
#if NCCL_VERSION_CODE >= 21400
  if (async == ncclInProgress) return;
#endif
  if (async != ncclSuccess)
    fail(MOE_ERR_COMM, std::string("the NCCL communicator reports an asynchronous error ") + when + ": " +
                           ncclGetErrorString(async) + nccl_detail(comm) +
                           "; it must be aborted (ncclCommAbort) on every rank");
}

void nccl_ok(ncclComm_t comm, ncclResult_t r, const char *what) {
  r = wait_in_progress(comm, r);
  if (r != ncclSuccess) fail(MOE_ERR_COMM, std::string(what) + " failed: " + ncclGetErrorString(r) + nccl_detail(comm));
  if (comm) check_async(comm, (std::string("after ") + what).c_str());
}

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  cuda_ok(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) {
    cuda_ok(cudaSetDevice(device), "cudaSetDevice");
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

CudaMemory::CudaMemory(Kind kind, size_t bytes, int device) : kind_(kind), device_(device) {
  DeviceGuard on(device);
  cuda_ok(kind == kDevice ? cudaMalloc(&p_, bytes) : cudaMallocHost(&p_, bytes),
          kind == kDevice ? "cudaMalloc" : "cudaMallocHost");
}

CudaMemory::~CudaMemory() {
  if (!p_) return;
  // Destructors run on error paths too: nothing here may throw.
  int current = -1;
  const bool switched = cudaGetDevice(&current) == cudaSuccess && current != device_ &&
                        cudaSetDevice(device_) == cudaSuccess;
  (void)(kind_ == kDevice ? cudaFree(p_) : cudaFreeHost(p_));
  if (switched) (void)cudaSetDevice(current);
}

Group::Group(ncclComm_t comm) : comm_(comm) {
  nccl_ok(nullptr, ncclGroupStart(), "ncclGroupStart");
  open_ = true;
}

Group::~Group() {
  if (open_) (void)ncclGroupEnd();
}

void Group::end() {
  open_ = false;
  nccl_ok(comm_, ncclGroupEnd(), "ncclGroupEnd");
}

}  // namespace moe_nccl

extern "C" MOE_API const char *moe_nccl_last_error(void) { return moe_nccl::t_last_error.c_str(); }
