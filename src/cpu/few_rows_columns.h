// The few-rows forward kernel for input rows laid out as columns (XwtProduct::columns in
// cpu/few_rows.h): each weight element broadcast against 8 to 24 input rows at once, every
// accumulator one output, so a weight is read once per 8-24 rows and no sum runs across lanes.
#pragma once
#include <cstdint>

namespace moe::cpu {

// C[m, n] = sum_k Xt[k * ldt + m] W[n, k] for m < M and weight rows n in [n0, n1): Xt float32
// (the columns layout, ldt a multiple of 8 and at least M, the columns past M zero), W [.., K]
// in dtype (row stride ldw), C float32 (row stride ldc). Each sum runs over k in order, one fused
// multiply-add per term, from zero, whatever M, the rows or the CPU. simd: on AVX2 and FMA (the
// caller has checked the CPU), else a plain loop. The `next_bytes` from `next` on (the thread's
// next chunk) are fetched into L2 meanwhile.
void columns_rows(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int dtype, int64_t n0,
                  int64_t n1, int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes, bool simd);

}  // namespace moe::cpu
