// Row-major GEMM on the layer's stream through cuBLAS, with the CPU backend's sgemm signature
// (src/cpu/blas.h) so the stage files read the same on both backends.
#pragma once
#include <cstdint>

#include "cuda/cuda.h"

namespace moe::cuda {

// C[M,N] = alpha * op(A) op(B) + beta * C; A is [M,K] ([K,M] when trans_a), B is [K,N] ([N,K]
// when trans_b), all row-major with leading dimensions lda, ldb, ldc. Float32 accumulation; TF32
// tensor cores only when the layer allows them.
void sgemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
           int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

}  // namespace moe::cuda
