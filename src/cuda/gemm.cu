#include "cuda/gemm.h"

#include <climits>

namespace moe::cuda {

// cuBLAS is column-major: a row-major [M,N] matrix is its column-major transpose, so
// C^T = op(B)^T op(A)^T is the same call with the operands swapped and the flags kept.
void sgemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
           int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
    fail(MOE_ERR_INVALID_ARGUMENT, "a GEMM of %lld x %lld x %lld exceeds cuBLAS's int dimensions", (long long)M,
         (long long)N, (long long)K);
  if (K == 0 && beta == 1.0f) return;  // an empty sum added to C
  const cublasComputeType_t compute = st.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  check(cublasGemmEx(st.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                     static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, CUDA_R_32F,
                     static_cast<int>(ldb), A, CUDA_R_32F, static_cast<int>(lda), &beta, C, CUDA_R_32F,
                     static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

}  // namespace moe::cuda
