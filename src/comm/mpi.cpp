// A moe_comm over MPI: the hooks libmoe calls during an expert-parallel forward and backward.
// The C API only: keep the deprecated MPI C++ bindings out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include "moe/moe_mpi.h"

#include <climits>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <new>
#include <vector>

namespace {

struct MpiComm {
  moe_comm base;  // first: libmoe sees only this part
  MPI_Comm comm = MPI_COMM_NULL;
  int size = 0;
  // The reason for the last failed hook (moe_comm::last_error). A fixed buffer: recording a
  // failure must not itself fail for want of memory.
  char error[MPI_MAX_ERROR_STRING + 160] = "";
};

// Keeps the reason for last_error and returns s.
__attribute__((format(printf, 3, 4))) moe_status failure(MpiComm &m, moe_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(m.error, sizeof m.error, fmt, ap);
  va_end(ap);
  return s;
}

moe_status mpi_failure(MpiComm &m, const char *call, int code) {
  char text[MPI_MAX_ERROR_STRING] = "";
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof text, "MPI error code %d", code);
  return failure(m, MOE_ERR_COMM, "%s failed: %s", call, text);
}

// MPI counts and displacements are int: anything else is refused before MPI sees it.
moe_status to_counts(MpiComm &m, const int64_t *c, const char *which, std::vector<int> &counts,
                     std::vector<int> &displs) {
  counts.resize(static_cast<size_t>(m.size));
  displs.resize(static_cast<size_t>(m.size));
  long long offset = 0;
  for (int i = 0; i < m.size; ++i) {
    if (c[i] < 0 || c[i] > INT_MAX)
      return failure(m, MOE_ERR_INVALID_ARGUMENT, "%s[%d] = %lld rows: MPI counts rows in an int", which, i,
                     static_cast<long long>(c[i]));
    if (offset > INT_MAX)
      return failure(m, MOE_ERR_INVALID_ARGUMENT, "%s: %lld rows come before rank %d's: MPI counts rows in an int",
                     which, offset, i);
    counts[i] = static_cast<int>(c[i]);
    displs[i] = static_cast<int>(offset);
    offset += c[i];
  }
  return MOE_OK;
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

moe_status exchange_counts(void *user, const int64_t *send, int64_t *recv) {
  auto &m = *static_cast<MpiComm *>(user);
  const int rc = MPI_Alltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, m.comm);
  return rc == MPI_SUCCESS ? MOE_OK : mpi_failure(m, "MPI_Alltoall (counts)", rc);
}

moe_status exchange_rows(void *user, const void *send, const int64_t *send_counts, void *recv,
                         const int64_t *recv_counts, size_t row_bytes, void *) {
  auto &m = *static_cast<MpiComm *>(user);
  if (row_bytes == 0 || row_bytes > INT_MAX)
    return failure(m, MOE_ERR_INVALID_ARGUMENT, "row_bytes = %zu: one row must be 1 to INT_MAX bytes", row_bytes);
  try {
    std::vector<int> sc, sd, rc, rd;
    moe_status s = to_counts(m, send_counts, "send_counts", sc, sd);
    if (s == MOE_OK) s = to_counts(m, recv_counts, "recv_counts", rc, rd);
    if (s != MOE_OK) return s;
    RowType row;
    int err = row.create(row_bytes);
    if (err != MPI_SUCCESS) return mpi_failure(m, "MPI_Type_contiguous (one row)", err);
    err = MPI_Alltoallv(send, sc.data(), sd.data(), row.get(), recv, rc.data(), rd.data(), row.get(), m.comm);
    return err == MPI_SUCCESS ? MOE_OK : mpi_failure(m, "MPI_Alltoallv (rows)", err);
  } catch (const std::bad_alloc &) {  // nothing may unwind into libmoe's C caller
    return failure(m, MOE_ERR_OUT_OF_MEMORY, "out of host memory for %d ranks' counts", m.size);
  }
}

const char *last_error(void *user) { return static_cast<MpiComm *>(user)->error; }

}  // namespace

extern "C" {

MOE_API moe_status moe_mpi_comm_create(MPI_Comm comm, moe_comm **out) {
  if (!out || comm == MPI_COMM_NULL) return MOE_ERR_INVALID_ARGUMENT;
  auto m = std::unique_ptr<MpiComm>(new (std::nothrow) MpiComm());
  if (!m) return MOE_ERR_OUT_OF_MEMORY;
  if (MPI_Comm_dup(comm, &m->comm) != MPI_SUCCESS) return MOE_ERR_COMM;
  int rank = 0;
  MPI_Comm_size(m->comm, &m->size);
  MPI_Comm_rank(m->comm, &rank);
  m->base.struct_size = sizeof(moe_comm);
  m->base.size = m->size;
  m->base.rank = rank;
  m->base.user = m.get();
  m->base.exchange_counts = exchange_counts;
  m->base.exchange_rows = exchange_rows;
  m->base.last_error = last_error;
  *out = &m.release()->base;
  return MOE_OK;
}

MOE_API void moe_mpi_comm_destroy(moe_comm *comm) {
  if (!comm) return;
  std::unique_ptr<MpiComm> m(static_cast<MpiComm *>(comm->user));
  MPI_Comm_free(&m->comm);
}

}  // extern "C"
