/*
 * libmoe_mpi: a moe_comm over an MPI communicator (link -lmoe_mpi, pkg-config libmoe-mpi).
 *
 * Counts travel with MPI_Alltoall, rows with MPI_Alltoallv over a contiguous datatype of one row,
 * so row counts (not bytes) must fit an int. CPU layers pass host buffers; CUDA layers pass device
 * buffers, which need a CUDA-aware MPI (Open MPI built with CUDA) — otherwise use libmoe_nccl.
 *
 * Errors. The duplicated communicator keeps the error handler of the one it was made from, and MPI's
 * default, MPI_ERRORS_ARE_FATAL, aborts the job at the first failed MPI call. To have failures
 * returned instead, set MPI_ERRORS_RETURN on the communicator before moe_mpi_comm_create. A hook
 * then fails with MOE_ERR_COMM (an MPI call failed), MOE_ERR_INVALID_ARGUMENT (counts or a row size
 * MPI's int cannot hold) or MOE_ERR_OUT_OF_MEMORY, and keeps its reason in the comm:
 * comm->last_error(comm->user) returns it (e.g. "MPI_Alltoallv (rows) failed: " and
 * MPI_Error_string's text), so moe_forward/moe_backward fail with MOE_ERR_COMM and a
 * moe_last_error() text that names the hook and ends with that reason. As with any MPI error,
 * whether the communicator is still usable afterwards is up to the MPI library.
 */
#ifndef MOE_MOE_MPI_H
#define MOE_MOE_MPI_H

#include <mpi.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Create a moe_comm whose ranks are those of comm (duplicated with MPI_Comm_dup, so libmoe's
 * traffic never mixes with the caller's). Collective over comm. *out is owned by the caller and
 * freed with moe_mpi_comm_destroy after every layer using it is destroyed. Its last_error hook is
 * set: it returns the reason for the comm's most recent failed hook call, "" before any failure
 * (a successful call does not clear it); the string lives in the comm, valid until its next hook
 * call or moe_mpi_comm_destroy.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL out or MPI_COMM_NULL; MOE_ERR_COMM if
 *         MPI_Comm_dup fails (and returns: see Errors above); MOE_ERR_OUT_OF_MEMORY. *out is
 *         untouched on failure. This function sets no error text: moe_last_error() is unchanged.
 * Thread-safety: the comm may be used by one layer call at a time, as the MPI communicator itself;
 *         the hooks are called on the layer call's thread, which MPI's thread level must allow.
 */
MOE_API moe_status moe_mpi_comm_create(MPI_Comm comm, moe_comm **out);

/** Free a comm made by moe_mpi_comm_create (collective: frees the duplicated communicator). NULL: no-op. */
MOE_API void moe_mpi_comm_destroy(moe_comm *comm);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_MPI_H */
