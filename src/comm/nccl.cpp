// A moe_comm over NCCL: the hooks libmoe calls during an expert-parallel forward and backward of a
// CUDA layer (include/moe/moe_nccl.h has the contract).
#include "moe/moe_nccl.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "comm/nccl_support.h"

namespace moe_nccl {
namespace {

struct NcclComm {
  moe_comm base;  // what libmoe sees
  ncclComm_t comm = nullptr;
  cudaStream_t counts_stream = nullptr;
  int device = 0;
  int size = 0;
  // [send | recv] int64 counts: NCCL moves device memory only, and pinned host staging keeps the
  // copies asynchronous, so that waiting for them can watch for NCCL errors instead of blocking.
  CudaMemory device_counts, host_counts;
  // The reason for this comm's last failed hook, for moe_comm::last_error, which is per comm:
  // moe_nccl_last_error's text is per thread, shared by every comm used on it.
  std::string error;
};

// Records why fn failed: in the thread's text and, for a hook, in its comm (NULL: none).
moe_status failed(const char *fn, std::string *comm_error, moe_status status, const std::string &message) noexcept {
  record_error(fn, message);
  if (comm_error) {
    try {
      *comm_error = message;
    } catch (...) {
      comm_error->clear();  // no memory for the text: better none than an older failure's
    }
  }
  return status;
}

template <class F>
moe_status guarded(const char *fn, std::string *comm_error, F &&body) noexcept {
  try {
    body();
    return MOE_OK;
  } catch (const Failure &f) {
    return failed(fn, comm_error, f.status, f.message);
  } catch (const std::bad_alloc &) {
    return failed(fn, comm_error, MOE_ERR_OUT_OF_MEMORY, "out of host memory");
  } catch (...) {
    return failed(fn, comm_error, MOE_ERR_INTERNAL, "internal error");
  }
}

std::string *error_of(void *user) { return user ? &static_cast<NcclComm *>(user)->error : nullptr; }

std::string str(long long v) { return std::to_string(v); }

// Waits for the counts stream by polling, so that a communicator that fails meanwhile ends the
// wait with its error rather than hanging in cudaStreamSynchronize.
void wait_for(NcclComm &m) {
  for (unsigned spins = 0;; ++spins) {
    const cudaError_t e = cudaStreamQuery(m.counts_stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) cuda_ok(e, "cudaStreamQuery (waiting for the counts exchange)");
    check_async(m.comm, "while waiting for the counts exchange");
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

moe_status exchange_counts(void *user, const int64_t *send, int64_t *recv) {
  return guarded("moe_nccl exchange_counts", error_of(user), [&] {
    if (!user || !send || !recv) fail(MOE_ERR_INVALID_ARGUMENT, "user, send and recv must not be NULL");
    NcclComm &m = *static_cast<NcclComm *>(user);
    const size_t n = static_cast<size_t>(m.size), bytes = n * sizeof(int64_t);
    auto *host = static_cast<int64_t *>(m.host_counts.get());
    auto *dev = static_cast<int64_t *>(m.device_counts.get());
    DeviceGuard on(m.device);
    std::memcpy(host, send, bytes);
    cuda_ok(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, m.counts_stream), "cudaMemcpyAsync (counts to device)");
    Group g(m.comm);
    for (int p = 0; p < m.size; ++p) {
      nccl_ok(m.comm, ncclSend(dev + p, 1, ncclInt64, p, m.comm, m.counts_stream), "ncclSend (counts)");
      nccl_ok(m.comm, ncclRecv(dev + n + p, 1, ncclInt64, p, m.comm, m.counts_stream), "ncclRecv (counts)");
    }
    g.end();
    cuda_ok(cudaMemcpyAsync(host + n, dev + n, bytes, cudaMemcpyDeviceToHost, m.counts_stream),
            "cudaMemcpyAsync (counts to host)");
    wait_for(m);
    std::memcpy(recv, host + n, bytes);
  });
}

// Byte offsets of each peer's rows (prefix sums), refusing negative counts and sizes that do not
// fit size_t.
std::vector<size_t> offsets(const int64_t *counts, int size, size_t row_bytes, const char *which) {
  std::vector<size_t> off(static_cast<size_t>(size) + 1, 0);
  for (int p = 0; p < size; ++p) {
    if (counts[p] < 0)
      fail(MOE_ERR_INVALID_ARGUMENT, std::string(which) + "[" + str(p) + "] = " + str(counts[p]) + " is negative");
    const auto c = static_cast<uint64_t>(counts[p]);
    if (c > (SIZE_MAX - off[p]) / row_bytes)
      fail(MOE_ERR_INVALID_ARGUMENT, std::string(which) + ": the rows' bytes overflow size_t");
    off[p + 1] = off[p] + static_cast<size_t>(c) * row_bytes;
  }
  return off;
}

// NCCL cannot read host memory: a CPU layer's buffers would fault on the device or hang the peers,
// so they are refused here with a message that says what to use instead.
void require_device_memory(const void *p, int device, const char *which) {
  if (!p) fail(MOE_ERR_INVALID_ARGUMENT, std::string(which) + " is NULL but has rows");
  cudaPointerAttributes a{};
  cuda_ok(cudaPointerGetAttributes(&a, p), "cudaPointerGetAttributes");
  if (a.type == cudaMemoryTypeManaged) return;
  if (a.type != cudaMemoryTypeDevice)
    fail(MOE_ERR_INVALID_ARGUMENT, std::string(which) +
                                       " is not device memory: libmoe_nccl serves CUDA layers (use libmoe_mpi for CPU layers)");
  if (a.device != device)
    fail(MOE_ERR_INVALID_ARGUMENT, std::string(which) + " is on CUDA device " + str(a.device) +
                                       ", the NCCL communicator on device " + str(device));
}

moe_status exchange_rows(void *user, const void *send, const int64_t *send_counts, void *recv,
                         const int64_t *recv_counts, size_t row_bytes, void *stream) {
  return guarded("moe_nccl exchange_rows", error_of(user), [&] {
    if (!user || !send_counts || !recv_counts)
      fail(MOE_ERR_INVALID_ARGUMENT, "user, send_counts and recv_counts must not be NULL");
    if (row_bytes == 0) fail(MOE_ERR_INVALID_ARGUMENT, "row_bytes is 0");
    NcclComm &m = *static_cast<NcclComm *>(user);
    const std::vector<size_t> so = offsets(send_counts, m.size, row_bytes, "send_counts");
    const std::vector<size_t> ro = offsets(recv_counts, m.size, row_bytes, "recv_counts");
    DeviceGuard on(m.device);
    if (so.back() > 0) require_device_memory(send, m.device, "send");
    if (ro.back() > 0) require_device_memory(recv, m.device, "recv");
    auto *s = static_cast<const unsigned char *>(send);
    auto *r = static_cast<unsigned char *>(recv);
    auto *st = static_cast<cudaStream_t>(stream);
    // Bytes: NCCL's point-to-point moves bytes whatever the type, and its counts are size_t.
    // Empty pairs are left out on both sides alike (send_counts[q] here is recv_counts[me] on q).
    Group g(m.comm);
    for (int p = 0; p < m.size; ++p) {
      if (so[p + 1] > so[p])
        nccl_ok(m.comm, ncclSend(s + so[p], so[p + 1] - so[p], ncclUint8, p, m.comm, st), "ncclSend (rows)");
      if (ro[p + 1] > ro[p])
        nccl_ok(m.comm, ncclRecv(r + ro[p], ro[p + 1] - ro[p], ncclUint8, p, m.comm, st), "ncclRecv (rows)");
    }
    g.end();
  });
}

const char *last_error(void *user) { return user ? static_cast<NcclComm *>(user)->error.c_str() : ""; }

}  // namespace
}  // namespace moe_nccl

extern "C" {

MOE_API moe_status moe_nccl_comm_create(struct ncclComm *nccl_comm, void *cuda_stream, moe_comm **out) {
  using namespace moe_nccl;
  return guarded("moe_nccl_comm_create", nullptr, [&] {
    if (!out) fail(MOE_ERR_INVALID_ARGUMENT, "out is NULL");
    if (!nccl_comm) fail(MOE_ERR_INVALID_ARGUMENT, "nccl_comm is NULL");
    int version = 0;
    nccl_ok(nullptr, ncclGetVersion(&version), "ncclGetVersion");
    if (version < 2700)  // 2.7.0 is 2700 in the old encoding; 2.9 and later are 20900 and up
      fail(MOE_ERR_UNSUPPORTED, "the loaded NCCL (version code " + str(version) +
                                    ") is older than 2.7 and lacks ncclSend/ncclRecv");
    auto m = std::make_unique<NcclComm>();
    m->comm = nccl_comm;
    m->counts_stream = static_cast<cudaStream_t>(cuda_stream);
    int rank = 0;
    nccl_ok(nccl_comm, ncclCommCount(nccl_comm, &m->size), "ncclCommCount");
    nccl_ok(nccl_comm, ncclCommUserRank(nccl_comm, &rank), "ncclCommUserRank");
    nccl_ok(nccl_comm, ncclCommCuDevice(nccl_comm, &m->device), "ncclCommCuDevice");
    const size_t bytes = 2 * static_cast<size_t>(m->size) * sizeof(int64_t);
    m->device_counts = CudaMemory(CudaMemory::kDevice, bytes, m->device);
    m->host_counts = CudaMemory(CudaMemory::kPinnedHost, bytes, m->device);
    m->base.struct_size = sizeof(moe_comm);
    m->base.size = m->size;
    m->base.rank = rank;
    m->base.user = m.get();
    m->base.exchange_counts = exchange_counts;
    m->base.exchange_rows = exchange_rows;
    m->base.last_error = last_error;
    *out = &m.release()->base;
  });
}

MOE_API void moe_nccl_comm_destroy(moe_comm *comm) {
  if (!comm) return;
  delete static_cast<moe_nccl::NcclComm *>(comm->user);
}

}  // extern "C"
