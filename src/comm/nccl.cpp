// A moe_comm over NCCL: the hooks libmoe calls during an expert-parallel forward and backward of a
// CUDA layer (include/moe/moe_nccl.h has the contract).
#include "moe/moe_nccl.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "comm/nccl_support.h"
#include "comm/timeout_env.h"

namespace moe_nccl {
namespace {

using moe_comm_support::kDefaultTimeout;

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
  double timeout = kDefaultTimeout;  // seconds each exchange may take; <= 0: none
  // Set once a deadline passed and the communicator was aborted: comm is then gone (ncclCommAbort
  // frees it) and every later hook fails at once with this reason.
  std::string aborted;
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

void refuse_if_aborted(const NcclComm &m) {
  if (!m.aborted.empty()) fail(MOE_ERR_COMM, "not attempted: an earlier exchange failed: " + m.aborted);
}

// Waits for stream by polling, so that a communicator that fails meanwhile ends the wait with its
// error rather than hanging in cudaStreamSynchronize, and so that a rank that never joins (NCCL
// cannot tell which one) ends it at the deadline: the communicator is then aborted, which is what
// frees the stream of NCCL's waiting kernels.
void wait_for(NcclComm &m, cudaStream_t stream, const char *what) {
  using clock = std::chrono::steady_clock;
  const auto deadline =
      clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(m.timeout));
  for (unsigned spins = 0;; ++spins) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) cuda_ok(e, (std::string("cudaStreamQuery (waiting for ") + what + ")").c_str());
    check_async(m.comm, (std::string("while waiting for ") + what).c_str());
    if (m.timeout > 0 && clock::now() >= deadline) {
      const ncclResult_t r = ncclCommAbort(m.comm);
      m.comm = nullptr;
      m.aborted = std::string(what) + ": the ranks did not all answer within " + std::to_string(m.timeout) +
                  " s (the deadline: MOE_NCCL_TIMEOUT or moe_nccl_comm_set_timeout; NCCL does not say which "
                  "rank is missing); the NCCL communicator was aborted (ncclCommAbort" +
                  (r == ncclSuccess ? "" : std::string(" failed: ") + ncclGetErrorString(r)) +
                  "): do not use, destroy or abort it again; destroy this comm and its layers";
      fail(MOE_ERR_COMM, m.aborted);
    }
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

moe_status exchange_counts(void *user, const int64_t *send, int64_t *recv) {
  return guarded("moe_nccl exchange_counts", error_of(user), [&] {
    if (!user || !send || !recv) fail(MOE_ERR_INVALID_ARGUMENT, "user, send and recv must not be NULL");
    NcclComm &m = *static_cast<NcclComm *>(user);
    refuse_if_aborted(m);
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
    wait_for(m, m.counts_stream, "exchange_counts (all-to-all of row counts)");
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
    refuse_if_aborted(m);
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
    // With a deadline the transfer is waited for here, where a missing rank can be caught: libmoe
    // synchronizes its stream before its next step anyway, and that wait has no deadline.
    if (m.timeout > 0) wait_for(m, st, "exchange_rows (all-to-all of rows)");
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
    if (!moe_comm_support::timeout_from_env("MOE_NCCL_TIMEOUT", m->timeout))
      fail(MOE_ERR_INVALID_ARGUMENT, std::string("MOE_NCCL_TIMEOUT = '") + std::getenv("MOE_NCCL_TIMEOUT") +
                                         "': expected seconds >= 0 (0 or inf: no deadline)");
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

MOE_API moe_status moe_nccl_comm_set_timeout(moe_comm *comm, double seconds) {
  using namespace moe_nccl;
  return guarded("moe_nccl_comm_set_timeout", nullptr, [&] {
    if (!comm || comm->exchange_rows != exchange_rows || !comm->user)
      fail(MOE_ERR_INVALID_ARGUMENT, "comm was not made by moe_nccl_comm_create");
    if (std::isnan(seconds) || seconds < 0)
      fail(MOE_ERR_INVALID_ARGUMENT, "seconds = " + std::to_string(seconds) + ": expected >= 0 (0 or inf: none)");
    static_cast<NcclComm *>(comm->user)->timeout = std::isinf(seconds) ? 0.0 : seconds;
  });
}

MOE_API void moe_nccl_comm_destroy(moe_comm *comm) {
  if (!comm) return;
  delete static_cast<moe_nccl::NcclComm *>(comm->user);
}

}  // extern "C"
