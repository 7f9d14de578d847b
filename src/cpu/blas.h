// The one GEMM the CPU backend calls. Row-major: C = alpha * op(A) * op(B) + beta * C with
// op(A) [M,K], op(B) [K,N]. Deterministic for a fixed thread count.
#pragma once
#include <cstdint>

namespace moe::cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
           int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

// Name of the BLAS in use and its kernel (for moe-bench and error messages).
const char *blas_name();

}  // namespace moe::cpu
