// Vectorised conversions between float32 and the 16-bit storage types, one thread each call
// (callers split the work). Rounding to nearest even, as core/half.h: the same bits.
#pragma once
#include <cstdint>

namespace moe::cpu {

// float16 runs on F16C where the CPU has it, else on portable loops: the same bits either way.
// portable picks the loops on any CPU (tests check both on one CPU).
enum class ConvertPath { best, portable };

// dst[i] = src[i] as float32, exact; src holds n elements of dtype (a moe_dtype).
void widen(float *dst, const void *src, int dtype, int64_t n, ConvertPath path = ConvertPath::best);
// dst[i] = src[i] rounded to dtype.
void narrow(void *dst, int dtype, const float *src, int64_t n, ConvertPath path = ConvertPath::best);
// dst[i] = v[i] rounded to 16-bit dtype, and v[i] = that value as float32, in one pass (as narrow
// then round_in_place); nothing for float32.
void narrow_rounded(void *dst, int dtype, float *v, int64_t n, ConvertPath path = ConvertPath::best);
// v[i] = v[i] rounded to dtype and back (what storing in dtype keeps); no-op for float32.
void round_in_place(float *v, int dtype, int64_t n, ConvertPath path = ConvertPath::best);

// dst[i, j] = src[j, i] rounded to dtype for i < rows, j < cols: src float32 with row stride lds,
// dst of dtype with row stride ld (elements); the same bits as narrow(), on eight by eight blocks
// in registers where the CPU has AVX2 and F16C (and path is best). The results of products
// computed transposed (W X^T) into their rows.
void transpose_narrow(void *dst, int dtype, int64_t ld, const float *src, int64_t lds, int64_t rows, int64_t cols,
                      ConvertPath path = ConvertPath::best);

}  // namespace moe::cpu
