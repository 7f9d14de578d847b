// A moe_comm over MPI: the hooks libmoe calls during an expert-parallel forward and backward.
// Each exchange is a point-to-point all-to-all (MPI_Isend/MPI_Irecv with every rank, itself
// included) waited for against a deadline, so that a rank which never joins is named instead of
// hanging the others (include/moe/moe_mpi.h has the contract).
// The C API only: keep the deprecated MPI C++ bindings out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include "moe/moe_mpi.h"

#include <sched.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "comm/timeout_env.h"

namespace {

using moe_comm_support::kDefaultTimeout;

struct MpiComm {
  moe_comm base;  // first: libmoe sees only this part
  MPI_Comm comm = MPI_COMM_NULL;
  int size = 0;
  int rank = 0;
  int tag_ub = 32767;         // MPI guarantees at least this
  unsigned long long seq = 0; // exchanges so far: tags keep one exchange's messages apart from the next
  double timeout = kDefaultTimeout;  // seconds; <= 0: none
  // Set when an exchange ran past its deadline: a rank is missing, the ranks no longer agree on
  // which exchange comes next, and every later hook fails at once with this text.
  bool broken = false;
  std::string broken_reason;
  // Sends a missing rank never received: MPI cannot cancel them, so they are kept here and
  // released (MPI_Request_free) when the comm is destroyed.
  std::vector<MPI_Request> orphans;
  // The reason for the last failed hook (moe_comm::last_error). A fixed buffer: recording a
  // failure must not itself fail for want of memory.
  char error[MPI_MAX_ERROR_STRING + 512] = "";
};

// Keeps the reason for last_error and returns s.
__attribute__((format(printf, 3, 4))) moe_status failure(MpiComm &m, moe_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(m.error, sizeof m.error, fmt, ap);
  va_end(ap);
  return s;
}

std::string mpi_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = "";
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof text, "MPI error code %d", code);
  return text;
}

// One row as an MPI datatype, freed however the exchange ends.
class RowType {
 public:
  ~RowType() {
    if (type_ != MPI_DATATYPE_NULL) MPI_Type_free(&type_);
  }
  int create(size_t row_bytes) {
    int rc = MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &type_);
    if (rc != MPI_SUCCESS) {
      type_ = MPI_DATATYPE_NULL;
      return rc;
    }
    return MPI_Type_commit(&type_);
  }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// One all-to-all: a receive from and a send to every rank (empty ones too, so that every rank's
// presence is seen), then a wait against the comm's deadline.
class Exchange {
 public:
  Exchange(MpiComm &m, const char *name) : m_(m), name_(name) {
    recv_.assign(static_cast<size_t>(m.size), MPI_REQUEST_NULL);
    send_.assign(static_cast<size_t>(m.size), MPI_REQUEST_NULL);
    tag_ = static_cast<int>(m.seq++ % (static_cast<unsigned long long>(m.tag_ub) + 1));
  }
  // Whatever is still pending when the exchange ends early is cancelled or parked.
  ~Exchange() { abandon(); }
  Exchange(const Exchange &) = delete;
  Exchange &operator=(const Exchange &) = delete;

  // Post rank p's receive and send. false (with the failure recorded) if MPI refuses.
  bool post(int p, void *recv, int recv_count, const void *send, int send_count, MPI_Datatype type) {
    int rc = MPI_Irecv(recv, recv_count, type, p, tag_, m_.comm, &recv_[p]);
    if (rc != MPI_SUCCESS) {
      recv_[p] = MPI_REQUEST_NULL;
      return record(rc, "MPI_Irecv", p);
    }
    rc = MPI_Isend(send, send_count, type, p, tag_, m_.comm, &send_[p]);
    if (rc != MPI_SUCCESS) {
      send_[p] = MPI_REQUEST_NULL;
      return record(rc, "MPI_Isend", p);
    }
    return true;
  }

  // Waits for every request, testing them in turn (MPI progresses inside MPI_Test, as inside
  // MPI_Waitall) and yielding the core between rounds for ranks that share it.
  moe_status wait() {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const bool bounded = m_.timeout > 0;
    const auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(m_.timeout));
    for (;;) {
      bool pending = false;
      for (int p = 0; p < m_.size; ++p) {
        pending |= !test(recv_[p], "the receive from", p);
        pending |= !test(send_[p], "the send to", p);
      }
      if (!pending) break;
      if (bounded && clock::now() >= deadline) return timed_out();
      sched_yield();
    }
    return failed_ ? status_ : MOE_OK;
  }

 private:
  // true once the request is complete (or was never posted); an error is recorded, not fatal:
  // the other requests are still waited for, so that nothing is left pending.
  bool test(MPI_Request &r, const char *what, int p) {
    if (r == MPI_REQUEST_NULL) return true;
    int done = 0;
    MPI_Status st;
    const int rc = MPI_Test(&r, &done, &st);
    if (rc != MPI_SUCCESS) {
      // The request may be gone or not; either way it must not be tested again.
      if (!done) r = MPI_REQUEST_NULL;
      record(rc == MPI_ERR_IN_STATUS ? st.MPI_ERROR : rc, what, p);
      return true;
    }
    return done != 0;
  }

  bool record(int code, const char *what, int p) {
    if (!failed_) {
      failed_ = true;
      status_ = failure(m_, MOE_ERR_COMM, "%s failed: %s rank %d: %s", name_, what, p, mpi_text(code).c_str());
    }
    return false;
  }

  moe_status timed_out() {
    std::string missing;
    int n = 0;
    for (int p = 0; p < m_.size; ++p) {
      if (recv_[p] == MPI_REQUEST_NULL && send_[p] == MPI_REQUEST_NULL) continue;
      missing += (n++ ? ", " : "") + std::to_string(p);
    }
    failure(m_, MOE_ERR_COMM,
            "%s: rank%s %s of %d did not answer within %g s (the deadline: MOE_MPI_TIMEOUT or "
            "moe_mpi_comm_set_timeout); this comm is unusable from now on: destroy it and its layers",
            name_, n > 1 ? "s" : "", missing.c_str(), m_.size, m_.timeout);
    m_.broken = true;
    m_.broken_reason = m_.error;
    abandon();
    return MOE_ERR_COMM;
  }

  // Receives are cancelled and completed (their buffers are libmoe's); sends that MPI cannot
  // take back go to the comm's orphans.
  void abandon() noexcept {
    for (int p = 0; p < m_.size; ++p) {
      if (recv_[p] != MPI_REQUEST_NULL) {
        MPI_Cancel(&recv_[p]);
        MPI_Wait(&recv_[p], MPI_STATUS_IGNORE);  // completes at once once cancelled
      }
      if (send_[p] != MPI_REQUEST_NULL) {
        MPI_Cancel(&send_[p]);
        int done = 0;
        MPI_Test(&send_[p], &done, MPI_STATUS_IGNORE);
        if (!done) {
          try {
            m_.orphans.push_back(send_[p]);
          } catch (...) {
            MPI_Request_free(&send_[p]);  // no memory to keep it: MPI lets it finish on its own
          }
        }
        send_[p] = MPI_REQUEST_NULL;
      }
    }
  }

  MpiComm &m_;
  const char *name_;
  int tag_ = 0;
  std::vector<MPI_Request> recv_, send_;
  bool failed_ = false;
  moe_status status_ = MOE_OK;
};

moe_status refuse_if_broken(MpiComm &m, const char *hook) {
  if (!m.broken) return MOE_OK;
  return failure(m, MOE_ERR_COMM, "%s: not attempted: an earlier exchange failed: %s", hook, m.broken_reason.c_str());
}

moe_status exchange_counts(void *user, const int64_t *send, int64_t *recv) {
  auto &m = *static_cast<MpiComm *>(user);
  const char *name = "exchange_counts (all-to-all of row counts)";
  if (moe_status s = refuse_if_broken(m, name)) return s;
  try {
    Exchange x(m, name);
    for (int p = 0; p < m.size; ++p)
      if (!x.post(p, recv + p, 1, send + p, 1, MPI_INT64_T)) return MOE_ERR_COMM;
    return x.wait();
  } catch (const std::bad_alloc &) {  // nothing may unwind into libmoe's C caller
    return failure(m, MOE_ERR_OUT_OF_MEMORY, "%s: out of host memory for %d ranks' requests", name, m.size);
  }
}

moe_status exchange_rows(void *user, const void *send, const int64_t *send_counts, void *recv,
                         const int64_t *recv_counts, size_t row_bytes, void *) {
  auto &m = *static_cast<MpiComm *>(user);
  const char *name = "exchange_rows (all-to-all of rows)";
  if (moe_status s = refuse_if_broken(m, name)) return s;
  if (row_bytes == 0 || row_bytes > INT_MAX)
    return failure(m, MOE_ERR_INVALID_ARGUMENT, "row_bytes = %zu: one row must be 1 to INT_MAX bytes", row_bytes);
  // MPI counts are int: anything else is refused before MPI sees it, on every rank alike.
  for (int p = 0; p < m.size; ++p) {
    for (const auto &[c, which] : {std::pair{send_counts, "send_counts"}, std::pair{recv_counts, "recv_counts"}})
      if (c[p] < 0 || c[p] > INT_MAX)
        return failure(m, MOE_ERR_INVALID_ARGUMENT, "%s[%d] = %lld rows: MPI counts rows in an int", which, p,
                       static_cast<long long>(c[p]));
  }
  try {
    RowType row;
    if (int err = row.create(row_bytes); err != MPI_SUCCESS)
      return failure(m, MOE_ERR_COMM, "MPI_Type_contiguous (one row of %zu bytes) failed: %s", row_bytes,
                     mpi_text(err).c_str());
    Exchange x(m, name);
    auto *s = static_cast<const unsigned char *>(send);
    auto *r = static_cast<unsigned char *>(recv);
    for (int p = 0; p < m.size; ++p) {
      if (!x.post(p, r, static_cast<int>(recv_counts[p]), s, static_cast<int>(send_counts[p]), row.get()))
        return MOE_ERR_COMM;
      s += static_cast<size_t>(send_counts[p]) * row_bytes;
      r += static_cast<size_t>(recv_counts[p]) * row_bytes;
    }
    return x.wait();
  } catch (const std::bad_alloc &) {
    return failure(m, MOE_ERR_OUT_OF_MEMORY, "%s: out of host memory for %d ranks' requests", name, m.size);
  }
}

const char *last_error(void *user) { return static_cast<MpiComm *>(user)->error; }

moe_status create(MPI_Comm comm, moe_comm **out) {
  if (!out || comm == MPI_COMM_NULL) return MOE_ERR_INVALID_ARGUMENT;
  double timeout = 0;
  if (!moe_comm_support::timeout_from_env("MOE_MPI_TIMEOUT", timeout)) return MOE_ERR_INVALID_ARGUMENT;
  auto m = std::unique_ptr<MpiComm>(new (std::nothrow) MpiComm());
  if (!m) return MOE_ERR_OUT_OF_MEMORY;
  m->timeout = timeout;
  if (MPI_Comm_dup(comm, &m->comm) != MPI_SUCCESS) return MOE_ERR_COMM;
  MPI_Comm_size(m->comm, &m->size);
  MPI_Comm_rank(m->comm, &m->rank);
  int *ub = nullptr, flag = 0;
  if (MPI_Comm_get_attr(m->comm, MPI_TAG_UB, &ub, &flag) == MPI_SUCCESS && flag && ub && *ub > 0) m->tag_ub = *ub;
  m->base.struct_size = sizeof(moe_comm);
  m->base.size = m->size;
  m->base.rank = m->rank;
  m->base.user = m.get();
  m->base.exchange_counts = exchange_counts;
  m->base.exchange_rows = exchange_rows;
  m->base.last_error = last_error;
  *out = &m.release()->base;
  return MOE_OK;
}

bool is_ours(const moe_comm *comm) { return comm && comm->exchange_rows == exchange_rows && comm->user; }

}  // namespace

extern "C" {

MOE_API moe_status moe_mpi_comm_create(MPI_Comm comm, moe_comm **out) { return create(comm, out); }

MOE_API moe_status moe_mpi_comm_create_world(moe_comm **out) {
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (!up || down) return MOE_ERR_STATE;
  return create(MPI_COMM_WORLD, out);
}

MOE_API moe_status moe_mpi_comm_create_f(int64_t fortran_comm, moe_comm **out) {
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (!up || down) return MOE_ERR_STATE;
  if (fortran_comm < INT_MIN || fortran_comm > INT_MAX) return MOE_ERR_INVALID_ARGUMENT;
  return create(MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_comm)), out);
}

MOE_API moe_status moe_mpi_comm_set_timeout(moe_comm *comm, double seconds) {
  if (!is_ours(comm) || std::isnan(seconds) || seconds < 0) return MOE_ERR_INVALID_ARGUMENT;
  static_cast<MpiComm *>(comm->user)->timeout = std::isinf(seconds) ? 0.0 : seconds;
  return MOE_OK;
}

MOE_API moe_status moe_mpi_init(void) {
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (down) return MOE_ERR_STATE;
  if (up) return MOE_OK;
  int provided = 0;
  return MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided) == MPI_SUCCESS ? MOE_OK : MOE_ERR_COMM;
}

MOE_API moe_status moe_mpi_finalize(void) {
  int up = 0, down = 0;
  MPI_Initialized(&up);
  MPI_Finalized(&down);
  if (!up || down) return MOE_OK;
  return MPI_Finalize() == MPI_SUCCESS ? MOE_OK : MOE_ERR_COMM;
}

MOE_API void moe_mpi_comm_destroy(moe_comm *comm) {
  if (!comm) return;
  std::unique_ptr<MpiComm> m(static_cast<MpiComm *>(comm->user));
  // Legal for point-to-point requests: MPI completes them (or drops them at finalisation) itself.
  for (MPI_Request &r : m->orphans) MPI_Request_free(&r);
  MPI_Comm_free(&m->comm);
}

}  // extern "C"
