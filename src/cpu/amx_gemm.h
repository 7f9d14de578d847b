// The experts' large bfloat16 products on AMX tiles, with every operand as stored.
//
// oneDNN 2.6 (Debian 12's) runs these at 1.0-1.9 TFLOP/s in the layer on 2 cores of a Xeon with
// AMX, against 7.0 for the tile multiplies alone: the forward's down projection (N 1024, K 2048)
// at 1.3, the weight gradients (A transposed, added to) at 1.0. This kernel, laid out for the
// caches as amx_gemm.cpp says, runs them faster (the figures are there); everything it does not
// take (float16, N off a multiple of 32, few rows) stays on oneDNN.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe::cpu {

// Whether amx_gemm can run here: an x86-64 build (not under ThreadSanitizer), a CPU with
// AMX-BF16, oneDNN's effective ISA AMX (so ONEDNN_MAX_CPU_ISA turns this kernel off with
// oneDNN's), and Linux granting the process the tile state (asked once; the grant is
// process-wide).
bool amx_gemm_available();

// Whether amx_gemm takes these sizes: N a multiple of 32 (whole column tiles), K at least 1. Any
// M, any K (padded with zeros to a multiple of 32), any row strides.
bool amx_gemm_fits(int64_t N, int64_t K);

// Bytes of work memory amx_gemm needs for these sizes on `threads` OpenMP threads (any alignment).
size_t amx_gemm_work_bytes(int64_t M, int64_t N, int64_t K, int threads);

// C[m, n] (+)= sum_k op(A)[m, k] op(B)[k, n] for m < M, n < N: op(A) [M, K] is A stored [M, K], or
// [K, M] with a_trans (row stride lda); op(B) [K, N] is B stored [K, N], or [N, K] with b_trans (a
// weight as stored; row stride ldb); both bfloat16. The sums run in float32 on TDPBF16PS (pairs
// of k, denormal inputs as zero, as oneDNN's AMX kernels), from zero; C is float32 or bfloat16
// (cdt, a moe_dtype; row stride ldc): with accumulate, C + sum (bfloat16: rounded once, as
// narrow() rounds), else the sum. Rows of C past M and columns past N are not touched. Threads
// over N with OpenMP (omp_get_max_threads(), as work was sized for): each output is one thread's
// sum over k in order, so the bits do not depend on the thread count. Requires
// amx_gemm_available() and amx_gemm_fits(); work of amx_gemm_work_bytes(M, N, K,
// omp_get_max_threads()) bytes.
void amx_gemm(int64_t M, int64_t N, int64_t K, const void *A, int64_t lda, bool a_trans, const void *B, int64_t ldb,
              bool b_trans, void *C, int cdt, int64_t ldc, bool accumulate, unsigned char *work);

}  // namespace moe::cpu
