/*
 * libmoe_mpi: a moe_comm over an MPI communicator (link -lmoe_mpi, pkg-config libmoe-mpi).
 *
 * Every exchange is an all-to-all made of point-to-point messages (MPI_Isend/MPI_Irecv with every
 * rank, itself and empty messages included, on a duplicated communicator), waited for against a
 * deadline. Rows travel as a contiguous datatype of one row, so row counts (not bytes) must fit an
 * int. CPU layers pass host buffers; CUDA layers pass device buffers, which need a CUDA-aware MPI
 * (Open MPI built with CUDA) — otherwise use libmoe_nccl.
 *
 * Deadline. A rank that never joins an exchange (it died, skipped a call, or makes a different
 * sequence of layer calls) would otherwise leave the others waiting for ever. Each exchange waits
 * at most the comm's timeout: 300 s by default, the environment variable MOE_MPI_TIMEOUT (seconds,
 * read by moe_mpi_comm_create; 0 or "inf": no deadline) or moe_mpi_comm_set_timeout. Past it the
 * hook fails with MOE_ERR_COMM and a reason that names the exchange and the ranks that did not
 * answer, e.g. "exchange_rows (all-to-all of rows): rank 3 of 4 did not answer within 300 s ...",
 * so moe_forward/moe_backward return MOE_ERR_COMM with that text (their context left empty, the
 * layer's parameters unchanged, as moe.h says). The comm is then unusable: the ranks no longer
 * agree on which exchange comes next, so every later hook fails at once with the same reason.
 * Its receives are cancelled; sends the missing rank never took cannot be (MPI has no cancel for
 * them) and stay with MPI until moe_mpi_comm_destroy frees their requests: destroy the layers and
 * the comm, then end the job or carry on without the missing rank (a new communicator, a new comm).
 * Those sends point into libmoe's buffers, which are gone once the call has failed: a rank that
 * was late rather than dead must not take part in that exchange afterwards (it would receive
 * whatever those bytes hold by then, or the sender's MPI would read freed memory). A rank whose
 * own call failed destroys its comm; a late rank learns of the failure only from its own deadline,
 * so on a deadline, end the job (MPI_Abort) unless every rank is known to have failed.
 * Waiting polls MPI_Test (MPI progresses inside it, as inside MPI_Waitall) and yields the core
 * between rounds, so ranks that share cores are not starved.
 *
 * Errors. The duplicated communicator keeps the error handler of the one it was made from, and MPI's
 * default, MPI_ERRORS_ARE_FATAL, aborts the job at the first failed MPI call. To have failures
 * returned instead, set MPI_ERRORS_RETURN on the communicator before moe_mpi_comm_create. A hook
 * then fails with MOE_ERR_COMM (an MPI call failed, or the deadline passed), MOE_ERR_INVALID_ARGUMENT
 * (counts or a row size MPI's int cannot hold) or MOE_ERR_OUT_OF_MEMORY, and keeps its reason in
 * the comm: comm->last_error(comm->user) returns it (e.g. "exchange_rows (all-to-all of rows)
 * failed: the receive from rank 1: " and MPI_Error_string's text), so moe_forward/moe_backward fail
 * with MOE_ERR_COMM and a moe_last_error() text that names the hook and ends with that reason. As
 * with any MPI error, whether the communicator is still usable afterwards is up to the MPI library.
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
 * The comm's deadline comes from MOE_MPI_TIMEOUT (see Deadline above).
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL out, MPI_COMM_NULL or a MOE_MPI_TIMEOUT that
 *         is not a number >= 0; MOE_ERR_COMM if
 *         MPI_Comm_dup fails (and returns: see Errors above); MOE_ERR_OUT_OF_MEMORY. *out is
 *         untouched on failure. This function sets no error text: moe_last_error() is unchanged.
 * Thread-safety: the comm may be used by one layer call at a time, as the MPI communicator itself;
 *         the hooks are called on the layer call's thread, which MPI's thread level must allow.
 */
MOE_API moe_status moe_mpi_comm_create(MPI_Comm comm, moe_comm **out);

/** Free a comm made by moe_mpi_comm_create* (collective: frees the duplicated communicator).
 *  NULL: no-op. */
MOE_API void moe_mpi_comm_destroy(moe_comm *comm);

/**
 * Set how long each exchange of comm (made by moe_mpi_comm_create*) waits for the other ranks:
 * seconds > 0, or 0 or +infinity for no deadline. Local. Takes effect from the next exchange.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a comm not made by libmoe_mpi, a negative or NaN value.
 */
MOE_API moe_status moe_mpi_comm_set_timeout(moe_comm *comm, double seconds);

/* For callers that cannot name an MPI_Comm (bindings of languages without MPI bindings: Java,
 * Rust): MPI's start and end, a comm over MPI_COMM_WORLD, and one over a communicator given by
 * its Fortran handle (mpi4py's comm.py2f(), MPI_Comm_c2f), an integer every MPI binding can hand over. */

/** MPI_Init_thread(MPI_THREAD_SERIALIZED) unless MPI is initialised already (then MOE_OK).
 *  @return MOE_OK; MOE_ERR_STATE if MPI was finalised; MOE_ERR_COMM if MPI_Init_thread fails. */
MOE_API moe_status moe_mpi_init(void);

/** MPI_Finalize if MPI is initialised and not finalised (else MOE_OK). Destroy every comm first.
 *  @return MOE_OK; MOE_ERR_COMM if MPI_Finalize fails. */
MOE_API moe_status moe_mpi_finalize(void);

/** moe_mpi_comm_create over MPI_COMM_WORLD. @return as moe_mpi_comm_create; MOE_ERR_STATE if MPI
 *  is not initialised (moe_mpi_init) or already finalised. */
MOE_API moe_status moe_mpi_comm_create_world(moe_comm **out);

/** moe_mpi_comm_create over MPI_Comm_f2c(fortran_comm). @return as moe_mpi_comm_create_world;
 *  MOE_ERR_INVALID_ARGUMENT for a handle outside MPI_Fint's range. */
MOE_API moe_status moe_mpi_comm_create_f(int64_t fortran_comm, moe_comm **out);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_MPI_H */
