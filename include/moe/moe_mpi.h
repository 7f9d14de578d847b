/*
 * libmoe_mpi: a moe_comm over an MPI communicator (link -lmoe_mpi, pkg-config libmoe-mpi).
 *
 * Counts travel with MPI_Alltoall, rows with MPI_Alltoallv over a contiguous datatype of one row,
 * so row counts (not bytes) must fit an int. CPU layers pass host buffers; CUDA layers pass device
 * buffers, which need a CUDA-aware MPI (Open MPI built with CUDA) — otherwise use libmoe_nccl.
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
 * freed with moe_mpi_comm_destroy after every layer using it is destroyed.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL out or MPI_COMM_NULL; MOE_ERR_COMM if an
 *         MPI call fails (moe_last_error() gives MPI's message); MOE_ERR_OUT_OF_MEMORY.
 */
MOE_API moe_status moe_mpi_comm_create(MPI_Comm comm, moe_comm **out);

/** Free a comm made by moe_mpi_comm_create (collective: frees the duplicated communicator). NULL: no-op. */
MOE_API void moe_mpi_comm_destroy(moe_comm *comm);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_MPI_H */
