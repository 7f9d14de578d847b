#include "cpu/few_rows.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/half.h"
#include "cpu/convert.h"
#include "moe/moe.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
// GCC 12's AVX-512 headers initialise the pass-through operand of several intrinsics from itself
// (_mm512_undefined_*), which warns at every inlined call (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moe::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 64;  // weight rows per OpenMP work item
constexpr int64_t kGroup = 8;          // input rows per pass over a chunk

// ---- AVX-512: 16 elements per step, every dtype widened exactly to float32 in registers ---------
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#define MOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

template <int D>
MOE_AVX512 inline __m512 load16(const void *p, int64_t k) {
  if constexpr (D == MOE_DTYPE_F32) {
    return _mm512_loadu_ps(static_cast<const float *>(p) + k);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + k));
    if constexpr (D == MOE_DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

template <int D>
MOE_AVX512 inline __m512 load_tail(const void *p, int64_t k, __mmask16 m) {
  if constexpr (D == MOE_DTYPE_F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float *>(p) + k);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t *>(p) + k);
    if constexpr (D == MOE_DTYPE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

template <int D>
inline const void *row(const void *p, int64_t r, int64_t ld) {
  return static_cast<const unsigned char *>(p) + static_cast<size_t>(r * ld) * dtype_size(D);
}

// The sum of the 16 lanes, halves added pairwise (lane i += lane i + 8, then + 4, + 2, + 1).
MOE_AVX512 inline float reduce(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

template <int D, int M, int R>
MOE_AVX512 inline void avx512_block(const void *const *x, const void *W, int64_t ldw, int64_t n, int64_t K, float *C,
                                    int64_t ldc) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1u);
  const void *w[R];
  for (int r = 0; r < R; ++r) w[r] = row<D>(W, n + r, ldw);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < full; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16<D>(w[r], k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = load16<D>(x[m], k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (tail) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_tail<D>(w[r], full, tail);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = load_tail<D>(x[m], full, tail);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) C[m * ldc + n + r] = reduce(acc[r][m]);
}

// Two weight rows at a time (one where M is large, for the registers): each input piece loaded
// once serves both, and the two streams keep more of memory's bandwidth busy.
template <int D, int M>
MOE_AVX512 void avx512_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
                            float *C, int64_t ldc) {
  const void *x[M];
  for (int m = 0; m < M; ++m) x[m] = row<D>(X, m, ldx);
  constexpr int R = M <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) avx512_block<D, M, R>(x, W, ldw, n, K, C, ldc);
  for (; n < n1; ++n) avx512_block<D, M, 1>(x, W, ldw, n, K, C, ldc);
}

template <int D>
void avx512_dispatch(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                     int64_t K, float *C, int64_t ldc) {
  switch (M) {
    case 1: return avx512_rows<D, 1>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 2: return avx512_rows<D, 2>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 3: return avx512_rows<D, 3>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 4: return avx512_rows<D, 4>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 5: return avx512_rows<D, 5>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 6: return avx512_rows<D, 6>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    case 7: return avx512_rows<D, 7>(X, ldx, W, ldw, n0, n1, K, C, ldc);
    default: return avx512_rows<D, 8>(X, ldx, W, ldw, n0, n1, K, C, ldc);
  }
}

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}
#else
bool have_avx512() { return false; }
template <int D>
void avx512_dispatch(const void *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *,
                     int64_t) {}
#endif

// ---- any CPU: float32 pieces, the same sums in 16 lanes, so both paths give the same bits --------
void generic_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t n0, int64_t n1,
                  int64_t K, float *C, int64_t ldc) {
  constexpr int64_t kPiece = 256;  // a multiple of 16
  float wf[kPiece], xf[kPiece];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float lanes[16] = {};
      for (int64_t k = 0; k < K; k += kPiece) {
        const int64_t len = std::min(kPiece, K - k);
        widen(wf, elem_at(W, dtype, n * ldw + k), dtype, len);
        widen(xf, elem_at(X, dtype, m * ldx + k), dtype, len);
        for (int64_t i = 0; i < len; ++i) lanes[i % 16] = std::fma(wf[i], xf[i], lanes[i % 16]);
      }
      // reduce()'s order: halves added pairwise down to one lane.
      for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
      C[m * ldc + n] = lanes[0];
    }
}

}  // namespace

void few_rows_xwt(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t N, int64_t K,
                  float *C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  const bool avx512 = have_avx512();
#pragma omp parallel for schedule(static) if (chunks > 1 && N * K >= (int64_t{1} << 16))
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kRowsPerChunk, n1 = std::min(N, n0 + kRowsPerChunk);
    // Eight input rows at a time (the accumulators a pass keeps in registers); the chunk of
    // weight rows stays in cache between passes, so memory sees it once.
    for (int64_t m0 = 0; m0 < M; m0 += kGroup) {
      const int64_t m = std::min(kGroup, M - m0);
      const void *Xg = elem_at(X, dtype, m0 * ldx);
      float *Cg = C + m0 * ldc;
      if (!avx512) {
        generic_rows(Xg, ldx, W, ldw, dtype, m, n0, n1, K, Cg, ldc);
      } else if (dtype == MOE_DTYPE_BF16) {
        avx512_dispatch<MOE_DTYPE_BF16>(Xg, ldx, W, ldw, m, n0, n1, K, Cg, ldc);
      } else if (dtype == MOE_DTYPE_F16) {
        avx512_dispatch<MOE_DTYPE_F16>(Xg, ldx, W, ldw, m, n0, n1, K, Cg, ldc);
      } else {
        avx512_dispatch<MOE_DTYPE_F32>(Xg, ldx, W, ldw, m, n0, n1, K, Cg, ldc);
      }
    }
  }
}

}  // namespace moe::cpu
