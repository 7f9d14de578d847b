#include "cpu/blas.h"

#include "core/error.h"

#if defined(MOE_BLAS_DNNL)
#include <dnnl.h>
#else
#include <cblas.h>
#endif

namespace moe::cpu {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
           int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#if defined(MOE_BLAS_DNNL)
  // Row-major, like the rest of libmoe; threads with OpenMP (omp_get_max_threads()).
  dnnl_status_t s = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (s == dnnl_out_of_memory) fail(MOE_ERR_OUT_OF_MEMORY, "oneDNN sgemm %lldx%lldx%lld: out of memory", (long long)M,
                                    (long long)N, (long long)K);
  if (s != dnnl_success)
    fail(MOE_ERR_INTERNAL, "oneDNN sgemm %lldx%lldx%lld failed with status %d", (long long)M, (long long)N,
         (long long)K, (int)s);
#else
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
              static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
#endif
}

const char *blas_name() {
#if defined(MOE_BLAS_DNNL)
  return "oneDNN sgemm";
#else
  return "OpenBLAS cblas_sgemm";
#endif
}

}  // namespace moe::cpu
