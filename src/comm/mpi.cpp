// A moe_comm over MPI: the hooks libmoe calls during an expert-parallel forward and backward.
// The C API only: keep the deprecated MPI C++ bindings out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include "moe/moe_mpi.h"

#include <climits>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace {

struct MpiComm {
  moe_comm base;  // first: libmoe sees only this part
  MPI_Comm comm = MPI_COMM_NULL;
  int size = 0;
};

// The hooks' errors reach the caller as MOE_ERR_COMM from moe_forward/moe_backward; MPI's text is
// kept here for moe_mpi_last_error-style diagnostics through the status name only.
moe_status to_counts(const int64_t *c, int n, std::vector<int> &out) {
  out.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    if (c[i] < 0 || c[i] > INT_MAX) return MOE_ERR_INVALID_ARGUMENT;
    out[i] = static_cast<int>(c[i]);
  }
  return MOE_OK;
}

moe_status exchange_counts(void *user, const int64_t *send, int64_t *recv) {
  auto *m = static_cast<MpiComm *>(user);
  if (MPI_Alltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, m->comm) != MPI_SUCCESS) return MOE_ERR_COMM;
  return MOE_OK;
}

moe_status exchange_rows(void *user, const void *send, const int64_t *send_counts, void *recv,
                         const int64_t *recv_counts, size_t row_bytes, void *) {
  auto *m = static_cast<MpiComm *>(user);
  if (row_bytes == 0 || row_bytes > INT_MAX) return MOE_ERR_INVALID_ARGUMENT;
  std::vector<int> sc, rc, sd(static_cast<size_t>(m->size)), rd(static_cast<size_t>(m->size));
  if (to_counts(send_counts, m->size, sc) != MOE_OK || to_counts(recv_counts, m->size, rc) != MOE_OK)
    return MOE_ERR_INVALID_ARGUMENT;
  long long so = 0, ro = 0;
  for (int i = 0; i < m->size; ++i) {
    if (so > INT_MAX || ro > INT_MAX) return MOE_ERR_INVALID_ARGUMENT;
    sd[i] = static_cast<int>(so);
    rd[i] = static_cast<int>(ro);
    so += sc[i];
    ro += rc[i];
  }
  MPI_Datatype row;
  if (MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &row) != MPI_SUCCESS) return MOE_ERR_COMM;
  MPI_Type_commit(&row);
  int rc_mpi = MPI_Alltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, m->comm);
  MPI_Type_free(&row);
  return rc_mpi == MPI_SUCCESS ? MOE_OK : MOE_ERR_COMM;
}

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
  *out = &m.release()->base;
  return MOE_OK;
}

MOE_API void moe_mpi_comm_destroy(moe_comm *comm) {
  if (!comm) return;
  std::unique_ptr<MpiComm> m(static_cast<MpiComm *>(comm->user));
  MPI_Comm_free(&m->comm);
}

}  // extern "C"
