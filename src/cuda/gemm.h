// Row-major GEMM on the layer's stream through cuBLAS, with the CPU backend's sgemm signature
// (src/cpu/blas.h) so the stage files read the same on both backends.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/cuda.h"

namespace moe::cuda {

// C[M,N] = alpha * op(A) op(B) + beta * C; A is [M,K] ([K,M] when trans_a), B is [K,N] ([N,K]
// when trans_b), all row-major with leading dimensions lda, ldb, ldc. A and B are of type T
// (float, __nv_bfloat16 or __half), C of type T or float. Float32 accumulation, and a C in 16 bits
// is rounded once; TF32 tensor cores only for float32 operands, and only when the layer allows them.
template <class T, class TC>
void gemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const T *A, int64_t lda,
          const T *B, int64_t ldb, float beta, TC *C, int64_t ldc);

inline void sgemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                  int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  gemm<float, float>(st, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace moe::cuda
