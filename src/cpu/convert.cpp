// Conversions between activation dtypes, and the search for the first non-finite element.
#include <algorithm>
#include <bit>
#include <cmath>

#include "cpu/convert.h"

#include <cstring>

#include "cpu/convert_x8.h"
#include "cpu/cpu.h"
#include "cpu/elem.h"

// Not under ThreadSanitizer: see activation.cpp.
#if defined(__SANITIZE_THREAD__)
#define MOE_CLONES
#else
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

namespace moe::cpu {
namespace {

// Branch-free forms of core/half.h's conversions, so that the loops below vectorise.
inline uint16_t bf16_bits(uint32_t u) {
  const uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

MOE_CLONES void bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
  uint32_t *d = reinterpret_cast<uint32_t *>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(src[i]) << 16;
}

MOE_CLONES void f32_to_bf16(uint16_t *dst, const float *src, int64_t n) {
  const uint32_t *s = reinterpret_cast<const uint32_t *>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(s[i]);
}

MOE_CLONES void f32_store_bf16(uint16_t *dst, float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = bf16_bits(u[i]);
    dst[i] = b;
    u[i] = static_cast<uint32_t>(b) << 16;
  }
}

MOE_CLONES void f32_round_bf16(float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = static_cast<uint32_t>(bf16_bits(u[i])) << 16;
}

// c ? a : b through a mask: GCC 12 turns some chains of ?: into branches, which keep a loop scalar.
inline uint32_t pick(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c))); }

// core/half.h's float16 conversions, branch-free (selects instead of branches) so that they
// vectorise: the same bits for every input. The scalar forms widened a float16 layer's panels at
// a fraction of bfloat16's speed.
inline uint32_t f16_value_bits(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (man << 13);
  const uint32_t special = sign | 0x7f800000u | (man << 13);
  // man * 2^-24, exact
  const uint32_t sub = sign | std::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(man)) * 0x1p-24f);
  return pick(exp == 0x1fu, special, pick(exp == 0, sub, normal));
}

// (A tie test on the quotient's low bit, as the scalar form has, keeps GCC 12's loops scalar.)
inline uint16_t f16_bits(uint32_t u) {
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t r = a - (112u << 23);
  r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  // Below 2^-14: m * 2^(e - 150) as a multiple of 2^-24, to nearest even, as r above. A shift of
  // 25 or more (below 2^-25, float32 subnormals too) leaves zero, as the scalar form's early
  // return; shifts are clamped to 1..31 where their result is not taken.
  const int32_t e = static_cast<int32_t>(a >> 23);
  const uint32_t shift = static_cast<uint32_t>(std::min(std::max(126 - e, 1), 31));
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t sub = (m + ((1u << (shift - 1u)) - 1u) + ((m >> shift) & 1u)) >> shift;
  const uint32_t v = a > 0x7f800000u ? 0x7e00u : a >= 0x477ff000u ? 0x7c00u : a < 0x38800000u ? sub : r;
  return static_cast<uint16_t>(sign | v);
}

MOE_CLONES void f16_to_f32(float *dst, const uint16_t *src, int64_t n) {
  uint32_t *d = reinterpret_cast<uint32_t *>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = f16_value_bits(src[i]);
}

MOE_CLONES void f32_to_f16(uint16_t *dst, const float *src, int64_t n) {
  const uint32_t *s = reinterpret_cast<const uint32_t *>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_bits(s[i]);
}

MOE_CLONES void f32_store_f16(uint16_t *dst, float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = f16_bits(u[i]);
    dst[i] = h;
    u[i] = f16_value_bits(h);
  }
}

MOE_CLONES void f32_round_f16(float *v, int64_t n) {
  uint32_t *u = reinterpret_cast<uint32_t *>(v);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = f16_value_bits(f16_bits(u[i]));
}

// The same four on F16C (eight elements an instruction, cpu/convert_x8.h), where the CPU has it:
// 2.5-7x the loops above (AMD EPYC Zen 3), which leaves float16's weight gradients of few rows
// (widened, added to, narrowed, per piece) as fast as bfloat16's.
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
using x8::narrow_f16;
using x8::widen_f16;

MOE_X8 void f16_to_f32_f16c(float *dst, const uint16_t *src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, widen_f16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
  for (; i < n; ++i) dst[i] = std::bit_cast<float>(f16_value_bits(src[i]));
}

MOE_X8 void f32_to_f16_f16c(uint16_t *dst, const float *src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + i), narrow_f16(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = f16_bits(std::bit_cast<uint32_t>(src[i]));
}

MOE_X8 void f32_store_f16_f16c(uint16_t *dst, float *v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = narrow_f16(_mm256_loadu_ps(v + i));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + i), h);
    _mm256_storeu_ps(v + i, _mm256_cvtph_ps(h));  // no signalling NaN left to mend
  }
  for (; i < n; ++i) {
    dst[i] = f16_bits(std::bit_cast<uint32_t>(v[i]));
    v[i] = std::bit_cast<float>(f16_value_bits(dst[i]));
  }
}

MOE_X8 void f32_round_f16_f16c(float *v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_cvtph_ps(narrow_f16(_mm256_loadu_ps(v + i))));
  for (; i < n; ++i) v[i] = std::bit_cast<float>(f16_value_bits(f16_bits(std::bit_cast<uint32_t>(v[i]))));
}

// Eight elements at element i of dst, rounded to dtype.
MOE_X8 inline void store8(void *dst, int dtype, int64_t i, __m256 v) {
  if (dtype == MOE_DTYPE_F32)
    _mm256_storeu_ps(static_cast<float *>(dst) + i, v);
  else
    x8::narrow(dtype, static_cast<uint16_t *>(dst) + i, v);
}

// Eight rows and eight columns of a transposition (transpose_narrow), through registers: the
// scattered reads of an element-by-element transposition took 0.07-0.08 ms of a 2048 x 130
// result (a forward's W X^T product, in cache; 2 cores of a Xeon with AMX), a tenth of a bfloat16
// forward of 512 tokens; eight at a time, 0.05.
MOE_X8 void transpose8(void *dst, int dtype, int64_t ld, const float *src, int64_t lds) {
  __m256 r[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + q * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                       _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                       _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                       _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
  for (int q = 0; q < 4; ++q) {  // rows q and q + 4 of the result: the low and high halves of u[q], u[q + 4]
    store8(dst, dtype, q * ld, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
    store8(dst, dtype, (q + 4) * ld, _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
  }
}

bool have_f16c() { return x8::supported(); }
#else
bool have_f16c() { return false; }
void f16_to_f32_f16c(float *, const uint16_t *, int64_t) {}
void f32_to_f16_f16c(uint16_t *, const float *, int64_t) {}
void f32_store_f16_f16c(uint16_t *, float *, int64_t) {}
void f32_round_f16_f16c(float *, int64_t) {}
void transpose8(void *, int, int64_t, const float *, int64_t) {}
#endif

}  // namespace

void widen(float *dst, const void *src, int dtype, int64_t n, ConvertPath path) {
  if (n <= 0) return;
  if (dtype == MOE_DTYPE_BF16) return bf16_to_f32(dst, static_cast<const uint16_t *>(src), n);
  if (dtype == MOE_DTYPE_F32) {
    if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  if (path == ConvertPath::best && have_f16c()) return f16_to_f32_f16c(dst, static_cast<const uint16_t *>(src), n);
  f16_to_f32(dst, static_cast<const uint16_t *>(src), n);
}

void narrow(void *dst, int dtype, const float *src, int64_t n, ConvertPath path) {
  if (n <= 0) return;
  if (dtype == MOE_DTYPE_BF16) return f32_to_bf16(static_cast<uint16_t *>(dst), src, n);
  if (dtype == MOE_DTYPE_F32) {
    if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  if (path == ConvertPath::best && have_f16c()) return f32_to_f16_f16c(static_cast<uint16_t *>(dst), src, n);
  f32_to_f16(static_cast<uint16_t *>(dst), src, n);
}

void narrow_rounded(void *dst, int dtype, float *v, int64_t n, ConvertPath path) {
  if (n <= 0 || dtype == MOE_DTYPE_F32) return;
  if (dtype == MOE_DTYPE_BF16) return f32_store_bf16(static_cast<uint16_t *>(dst), v, n);
  if (path == ConvertPath::best && have_f16c()) return f32_store_f16_f16c(static_cast<uint16_t *>(dst), v, n);
  f32_store_f16(static_cast<uint16_t *>(dst), v, n);
}

void round_in_place(float *v, int dtype, int64_t n, ConvertPath path) {
  if (dtype == MOE_DTYPE_BF16) return f32_round_bf16(v, n);
  if (dtype == MOE_DTYPE_F16 && path == ConvertPath::best && have_f16c()) return f32_round_f16_f16c(v, n);
  if (dtype == MOE_DTYPE_F16) f32_round_f16(v, n);
}

void transpose_narrow(void *dst, int dtype, int64_t ld, const float *src, int64_t lds, int64_t rows, int64_t cols,
                      ConvertPath path) {
  const bool x8 = path == ConvertPath::best && have_f16c();
  const int64_t rows8 = x8 ? rows / 8 * 8 : 0, cols8 = x8 ? cols / 8 * 8 : 0;
  const size_t es = dtype_size(dtype);
  auto out = [&](int64_t i, int64_t j) { return static_cast<unsigned char *>(dst) + (i * ld + j) * es; };
  // Sixteen rows at a time: a block's reads take half of each source line, the next block the rest.
  for (int64_t i0 = 0; i0 < rows8; i0 += 16)
    for (int64_t j = 0; j < cols8; j += 8)
      for (int64_t i = i0; i < std::min(i0 + 16, rows8); i += 8) transpose8(out(i, j), dtype, ld, src + j * lds + i, lds);
  // The rest element by element, gathered into pieces and narrowed as narrow() does.
  auto gathered = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    constexpr int64_t kPiece = 64;
    float piece[kPiece];
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; j += kPiece) {
        const int64_t m = std::min(kPiece, j1 - j);
        for (int64_t k = 0; k < m; ++k) piece[k] = src[(j + k) * lds + i];
        narrow(out(i, j), dtype, piece, m, path);
      }
  };
  gathered(0, rows8, cols8, cols);
  gathered(rows8, rows, 0, cols);
}

moe_status convert(void *st, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  return guarded(st, [&] {
    if (dst_dtype == src_dtype) {
      convert_host(dst, dst_dtype, src, src_dtype, n);
      return;
    }
    if (dst_dtype == MOE_DTYPE_F32 || src_dtype == MOE_DTYPE_F32) {
      // The vectorised loops, each thread over one run of whole cache lines: element by element,
      // the float32 <-> bfloat16 conversions of a bfloat16 forward's input and output took about
      // 2 % of a forward of 512 tokens (d 1024, 2 cores of a Xeon with AMX).
#pragma omp parallel if (worth_threads(n))
      {
        const auto [i0, i1] = thread_run(n);
        if (i1 > i0) {
          if (dst_dtype == MOE_DTYPE_F32)
            widen(static_cast<float *>(dst) + i0, elem_at(src, src_dtype, i0), src_dtype, i1 - i0);
          else
            narrow(elem_at(dst, dst_dtype, i0), dst_dtype, static_cast<const float *>(src) + i0, i1 - i0);
        }
      }
      return;
    }
    with_dtype(dst_dtype, [&](auto dtag) {
      with_dtype(src_dtype, [&](auto stag) {
        using D = decltype(dtag);
        using S = decltype(stag);
        D *out = static_cast<D *>(dst);
        const S *in = static_cast<const S *>(src);
#pragma omp parallel for schedule(static) if (worth_threads(n))
        for (int64_t i = 0; i < n; ++i) put(out[i], f32(in[i]));
      });
    });
  });
}

moe_status find_nonfinite(void *st, const void *p, int dtype, int64_t n, int64_t *first) {
  return guarded(st, [&] {
    *first = -1;
    with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      const E *v = static_cast<const E *>(p);
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(f32(v[i]))) {
          *first = i;
          break;
        }
    });
  });
}

}  // namespace moe::cpu
