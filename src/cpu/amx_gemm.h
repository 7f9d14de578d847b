// The forward's large bfloat16 products X W^T on AMX tiles, with the weight as stored.
//
// oneDNN 2.6 (Debian 12's) runs these at 1.3-1.9 TFLOP/s in the layer on 2 cores of a Xeon with
// AMX, against 7.0 for the tile multiplies alone; the weight-shaped product of the down
// projection (N 1024, K 2048) is the slowest. This kernel, laid out for the caches as below, runs
// them 1.05-1.25x faster alone and about 1.35x faster (down projection) in the layer's sequence;
// see amx_gemm.cpp. It covers only the forward's X W^T (bfloat16 in, bfloat16 or float32 out,
// nothing added to); everything else stays on oneDNN.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe::cpu {

// Whether amx_xwt can run here: an x86-64 build (not under ThreadSanitizer), a CPU with AMX-BF16,
// oneDNN's effective ISA AMX (so ONEDNN_MAX_CPU_ISA turns this kernel off with oneDNN's), and
// Linux granting the process the tile state (asked once; the grant is process-wide).
bool amx_xwt_available();

// Whether amx_xwt takes these sizes: N and K multiples of 32 (whole tiles; any row strides).
bool amx_xwt_fits(int64_t N, int64_t K);

// Bytes of work memory amx_xwt needs for M rows on `threads` OpenMP threads (any alignment).
size_t amx_xwt_work_bytes(int64_t M, int64_t N, int64_t K, int threads);

// C[m, n] = sum_k X[m, k] W[n, k] for m < M, n < N: X [M, K] and W [N, K] bfloat16 (row strides ldx,
// ldw in elements), the sums in float32 on TDPBF16PS (pairs of k, denormal inputs as zero, as
// oneDNN's AMX kernels), C float32 or rounded to bfloat16 (cdt a moe_dtype; row stride ldc) as
// narrow() rounds. Rows of C past M and columns past N are not written. Threads over N with
// OpenMP (omp_get_max_threads(), as work was sized for): each output is one thread's sum over k
// in order, so the bits do not depend on the thread count. Requires amx_xwt_available() and
// amx_xwt_fits(); work of amx_xwt_work_bytes(M, N, K, omp_get_max_threads()) bytes.
void amx_xwt(int64_t M, int64_t N, int64_t K, const void *X, int64_t ldx, const void *W, int64_t ldw, void *C,
             int cdt, int64_t ldc, unsigned char *work);

}  // namespace moe::cpu
