#include "cuda/gemm.h"

#include <climits>
#include <type_traits>

#include "cuda/dtype.cuh"

namespace moe::cuda {

// cuBLAS is column-major: a row-major [M,N] matrix is its column-major transpose, so
// C^T = op(B)^T op(A)^T is the same call with the operands swapped and the flags kept.
template <class T, class TC>
void gemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const T *A, int64_t lda,
          const T *B, int64_t ldb, float beta, TC *C, int64_t ldc) {
  static_assert(std::is_same_v<TC, T> || std::is_same_v<TC, float>, "C is of the operands' type or float32");
  if (M == 0 || N == 0) return;
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
    fail(MOE_ERR_INVALID_ARGUMENT, "a GEMM of %lld x %lld x %lld exceeds cuBLAS's int dimensions", (long long)M,
         (long long)N, (long long)K);
  if (K == 0 && beta == 1.0f) return;  // an empty sum added to C
  // Every combination used here is in cublasGemmEx's table for CUBLAS_COMPUTE_32F (float alpha
  // and beta): 32F/32F, 16BF/16BF, 16F/16F, 16BF/32F and 16F/32F for A,B / C.
  const cublasComputeType_t compute =
      std::is_same_v<T, float> && st.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  check(cublasGemmEx(st.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                     static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, blas_type<T>(),
                     static_cast<int>(ldb), A, blas_type<T>(), static_cast<int>(lda), &beta, C, blas_type<TC>(),
                     static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}

template void gemm<float, float>(State &, bool, bool, int64_t, int64_t, int64_t, float, const float *, int64_t,
                                 const float *, int64_t, float, float *, int64_t);
template void gemm<__nv_bfloat16, __nv_bfloat16>(State &, bool, bool, int64_t, int64_t, int64_t, float,
                                                 const __nv_bfloat16 *, int64_t, const __nv_bfloat16 *, int64_t, float,
                                                 __nv_bfloat16 *, int64_t);
template void gemm<__nv_bfloat16, float>(State &, bool, bool, int64_t, int64_t, int64_t, float, const __nv_bfloat16 *,
                                         int64_t, const __nv_bfloat16 *, int64_t, float, float *, int64_t);
template void gemm<__half, __half>(State &, bool, bool, int64_t, int64_t, int64_t, float, const __half *, int64_t,
                                   const __half *, int64_t, float, __half *, int64_t);
template void gemm<__half, float>(State &, bool, bool, int64_t, int64_t, int64_t, float, const __half *, int64_t,
                                  const __half *, int64_t, float, float *, int64_t);

}  // namespace moe::cuda
