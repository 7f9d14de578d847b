/*
 * libmoe_nccl: a moe_comm over an NCCL communicator, for expert-parallel CUDA layers
 * (link -lmoe_nccl, CMake target libmoe::moe_nccl, Debian package libmoe-nccl0).
 *
 * Counts travel as int64 through a small device buffer owned by the comm; rows travel with one
 * ncclSend/ncclRecv pair per peer inside ncclGroupStart/ncclGroupEnd, so an exchange costs one
 * NCCL launch whatever the number of ranks. Rows must be device (or managed) memory: use
 * libmoe_mpi for CPU layers.
 *
 * This header needs neither nccl.h nor the CUDA headers: ncclComm_t is `struct ncclComm *` and
 * cudaStream_t is passed as void *, so a program that only forwards them builds without CUDA.
 *
 * Errors. NCCL reports many failures asynchronously (a peer that died, a network error): the
 * comm checks ncclCommGetAsyncError after every NCCL call and while it waits for the counts, and
 * a communicator in error makes the hook fail instead of waiting for ever. A peer that is alive
 * but never joins the exchange is not an error NCCL can see, so each exchange has a deadline:
 * 300 s by default, MOE_NCCL_TIMEOUT (seconds, read by moe_nccl_comm_create; 0 or "inf": none) or
 * moe_nccl_comm_set_timeout. With a deadline, exchange_rows waits for its transfer too (polling
 * the layer's stream) instead of returning once it is queued. Past the deadline the comm calls
 * ncclCommAbort on the communicator (which stops NCCL's waiting kernels and frees the
 * communicator) and the hook fails with MOE_ERR_COMM, a reason naming the exchange (NCCL cannot
 * tell which rank is missing) and saying the communicator was aborted: the caller must then not
 * use, destroy or abort that ncclComm_t again; every later hook of this comm fails at once.
 * After any other NCCL failure the communicator is unusable: abort it (ncclCommAbort) on every
 * rank, after destroying the layers and this comm.
 * A hook that fails returns MOE_ERR_COMM (NCCL or CUDA failed), MOE_ERR_OUT_OF_MEMORY or
 * MOE_ERR_INVALID_ARGUMENT (negative counts, rows in host memory or on another device) and records
 * why, both in the comm (its last_error hook returns it) and as the thread's moe_nccl_last_error().
 * moe_forward/moe_backward then fail with MOE_ERR_COMM and a moe_last_error() text that names the
 * hook and ends with the reason (NCCL's or CUDA's message).
 */
#ifndef MOE_MOE_NCCL_H
#define MOE_MOE_NCCL_H

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ncclComm; /* NCCL's opaque communicator: ncclComm_t is `struct ncclComm *` */

/**
 * Create a moe_comm whose ranks are those of nccl_comm, which must be initialised (for a
 * non-blocking communicator: its initialisation finished) and is borrowed, not duplicated: it
 * must outlive the moe_comm, and libmoe's NCCL calls are ordered with the caller's own on it.
 * Local (not collective). Allocates 2*size int64 on the communicator's device.
 * @param nccl_comm   an ncclComm_t.
 * @param cuda_stream a cudaStream_t of the communicator's device (NULL: the default stream) on which
 *                    exchange_counts runs and which it waits for; borrowed. The layer's own stream
 *                    (moe_layer_set_stream) is the natural choice: the counts then queue behind the
 *                    layer's work. exchange_rows runs on the stream the layer passes to it instead
 *                    and returns without waiting (the layer orders its reads on that stream).
 * @param out         receives the comm, owned by the caller, freed with moe_nccl_comm_destroy after
 *                    every layer using it is destroyed. Its last_error hook is set: it returns the
 *                    reason for the comm's most recent failed hook call, "" before any failure (a
 *                    successful call does not clear it); the string lives in the comm, valid until
 *                    its next hook call or moe_nccl_comm_destroy.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL out or nccl_comm (*out untouched, no CUDA
 *         or NCCL call made) or a MOE_NCCL_TIMEOUT that is not a number >= 0;
 *         MOE_ERR_UNSUPPORTED if the loaded NCCL is older than 2.7 (no
 *         ncclSend/ncclRecv); MOE_ERR_COMM if an NCCL or CUDA call fails or the communicator
 *         holds an asynchronous error; MOE_ERR_OUT_OF_MEMORY. On failure moe_nccl_last_error()
 *         says which call failed and why.
 * Thread-safety: may be called from any thread. The comm it returns may be used by one layer call
 * at a time (as the NCCL communicator itself).
 */
MOE_API moe_status moe_nccl_comm_create(struct ncclComm *nccl_comm, void *cuda_stream, moe_comm **out);

/**
 * Set how long each exchange of comm (made by moe_nccl_comm_create) may take: seconds > 0, or 0 or
 * +infinity for no deadline (exchange_rows then returns once its transfer is queued). Local.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for another comm, a negative or NaN value.
 */
MOE_API moe_status moe_nccl_comm_set_timeout(moe_comm *comm, double seconds);

/**
 * Free a comm made by moe_nccl_comm_create: its device buffer (cudaFree, which waits for the
 * device), not the NCCL communicator, not the stream. NULL: no-op. Never fails.
 */
MOE_API void moe_nccl_comm_destroy(moe_comm *comm);

/**
 * The message of the calling thread's most recent failure in libmoe_nccl (moe_nccl_comm_create or
 * a hook called on this thread, by a layer or directly), "" if none: "function: reason", where
 * the reason is NCCL's or CUDA's (ncclGetErrorString, ncclGetLastError, cudaGetErrorString) or the
 * refused argument. The only source of the reason for a failed moe_nccl_comm_create; a failed hook's
 * reason also reaches moe_last_error() through the comm's last_error.
 * @return a thread-local string owned by the library, valid until this thread's next libmoe_nccl
 *         call. Successful calls do not clear it. Thread-safe.
 */
MOE_API const char *moe_nccl_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_NCCL_H */
