#include "cpu/few_rows_columns.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/half.h"
#include "cpu/convert.h"
#include "moe/moe.h"

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#include <immintrin.h>
#endif

namespace moe::cpu {
namespace {

// Any CPU: the same sums, one output at a time.
void plain_rows(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int dtype, int64_t n0, int64_t n1,
                int64_t K, float *C, int64_t ldc) {
  constexpr int64_t kPiece = 256;
  float wf[kPiece];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) C[m * ldc + n] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kPiece) {
      const int64_t len = std::min(kPiece, K - k0);
      widen(wf, elem_at(W, dtype, n * ldw + k0), dtype, len);
      for (int64_t m = 0; m < M; ++m) {
        float acc = C[m * ldc + n];
        for (int64_t i = 0; i < len; ++i) acc = std::fma(wf[i], Xt[(k0 + i) * ldt + m], acc);
        C[m * ldc + n] = acc;
      }
    }
  }
}

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))

// Weight element k of row w in all eight lanes, widened exactly. kAnd (bfloat16, k >= 1): the
// 32 bits from element k - 1 on, element k in their upper half, its lower half cleared by an AND
// (which any of the vector pipes runs, where a shift competes with the multiply-adds for one).
template <int D, bool kAnd = false>
MOE_AVX2 inline __m256 broadcast(const void *w, int64_t k) {
  if constexpr (D == MOE_DTYPE_F32) {
    return _mm256_broadcast_ss(static_cast<const float *>(w) + k);
  } else if constexpr (D == MOE_DTYPE_BF16 && kAnd) {
    int32_t pair;
    std::memcpy(&pair, static_cast<const uint16_t *>(w) + k - 1, sizeof pair);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_set1_epi32(pair)),
                         _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))));
  } else if constexpr (D == MOE_DTYPE_BF16) {
    // The 32 bits from element k on hold element k in their lower half: a float32 once shifted
    // into the upper (k + 1 < K).
    int32_t pair;
    std::memcpy(&pair, static_cast<const uint16_t *>(w) + k, sizeof pair);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi32(pair), 16));
  } else {
    return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(static_cast<const uint16_t *>(w)[k])));
  }
}

// bfloat16 element k alone (a row's first, with no element before it, or its last).
MOE_AVX2 inline __m256 broadcast_one_bf16(const void *w, int64_t k) {
  const uint32_t v = static_cast<uint32_t>(static_cast<const uint16_t *>(w)[k]) << 16;
  return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(v)));
}

// One k: the input rows' vector(s) at k against each weight row's element, broadcast as it is
// used (all NR broadcasts first would take NR registers more than the 16 there are). kAlone:
// bfloat16 element k read alone (broadcast_one_bf16), a row's first or last.
template <int D, int MV, int NR, bool kAlone = false, bool kAnd = false>
MOE_AVX2 inline void step(__m256 (&acc)[NR][MV], const char *const (&w)[NR], const float *Xt, int64_t ldt, int64_t k) {
  __m256 x[MV];
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) x[v] = _mm256_loadu_ps(Xt + k * ldt + 8 * v);
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) {
    const __m256 b = kAlone ? broadcast_one_bf16(w[r], k) : broadcast<D, kAnd>(w[r], k);
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(b, x[v], acc[r][v]);
  }
}

// Bytes from a row's element on that each step asks for ahead of its loads: the tile reads NR
// rows at once, more streams than the hardware's prefetchers follow.
constexpr int64_t kAhead = 512;

// Fetching ahead: `lines` cache lines from `next` at every step of 64 bytes of the rows.
struct Ahead {
  const char *next = nullptr;
  int64_t lines = 0;
};

// NR weight rows from n on against MV vectors of the pass's columns (M of them, at most 8 MV).
template <int D, int MV, int NR>
MOE_AVX2 void tile(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int64_t n, int64_t K,
                   float *C, int64_t ldc, Ahead ahead, bool rows_ahead) {
  constexpr int64_t es = D == MOE_DTYPE_F32 ? 4 : 2, kStep = 64 / es;
  const char *w[NR];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) w[r] = static_cast<const char *>(W) + (n + r) * ldw * es;
  __m256 acc[NR][MV];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
  // bfloat16 reads pairs of elements: the first (kAnd: up to two vectors, where the mask has a
  // register) or the last one alone.
  constexpr bool kAnd = D == MOE_DTYPE_BF16 && MV <= 2;
  const int64_t end = D == MOE_DTYPE_BF16 && !kAnd && K > 0 ? K - 1 : K;
  int64_t k = 0;
  if (kAnd && K > 0) step<D, MV, NR, true>(acc, w, Xt, ldt, k++);
  for (int64_t s = 0; k + kStep <= end; k += kStep, ++s) {
    if (rows_ahead)
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) _mm_prefetch(w[r] + k * es + kAhead, _MM_HINT_T0);
    for (int64_t i = 0; i < ahead.lines; ++i) _mm_prefetch(ahead.next + (s * ahead.lines + i) * 64, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kStep; ++i) step<D, MV, NR, false, kAnd>(acc, w, Xt, ldt, k + i);
  }
  for (; k < end; ++k) step<D, MV, NR, false, kAnd>(acc, w, Xt, ldt, k);
  if (end < K) step<D, MV, NR, true>(acc, w, Xt, ldt, k);
  alignas(32) float out[8 * MV];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm256_store_ps(out + 8 * v, acc[r][v]);
    for (int64_t m = 0; m < M; ++m) C[m * ldc + n + r] = out[m];
  }
}

// Rows per tile: the accumulators (NR x MV), MV input vectors and a broadcast in 16 registers.
template <int MV>
constexpr int kTileRows = MV == 1 ? 12 : MV == 2 ? 6 : 4;

// Weight rows [n0, n1) against one pass of MV vectors: whole tiles, then tiles of 4, 2 and 1 row.
template <int D, int MV>
MOE_AVX2 void pass(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int64_t n0, int64_t n1,
                   int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes, bool rows_ahead) {
  constexpr int NR = kTileRows<MV>;
  constexpr int64_t es = D == MOE_DTYPE_F32 ? 4 : 2;
  const int64_t tiles = (n1 - n0) / NR, steps = std::max<int64_t>(1, K * es / 64);
  // next_bytes spread over the whole tiles' steps, whole cache lines (rounded up).
  const int64_t lines = tiles > 0 ? ((next_bytes + 63) / 64 + tiles * steps - 1) / (tiles * steps) : 0;
  Ahead ahead{next, lines};
  int64_t n = n0;
  for (; n + NR <= n1; n += NR, ahead.next += lines * steps * 64)
    tile<D, MV, NR>(Xt, ldt, M, W, ldw, n, K, C, ldc, ahead, rows_ahead);
  if constexpr (NR > 4)
    for (; n + 4 <= n1; n += 4) tile<D, MV, 4>(Xt, ldt, M, W, ldw, n, K, C, ldc, Ahead{}, rows_ahead);
  for (; n + 2 <= n1; n += 2) tile<D, MV, 2>(Xt, ldt, M, W, ldw, n, K, C, ldc, Ahead{}, rows_ahead);
  for (; n < n1; ++n) tile<D, MV, 1>(Xt, ldt, M, W, ldw, n, K, C, ldc, Ahead{}, rows_ahead);
}

template <int D>
void simd_rows(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
               float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  // The columns in passes of up to three vectors, split evenly (four as 2 + 2, not 3 + 1); the
  // chunk of weight rows stays in cache between passes, and the passes share the fetching ahead.
  const int64_t vectors = (M + 7) / 8, passes = (vectors + 2) / 3, share = (next_bytes + passes - 1) / passes;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t v0 = vectors * p / passes, v1 = vectors * (p + 1) / passes;
    const int64_t m0 = 8 * v0, m = std::min(M, 8 * v1) - m0;
    const float *x = Xt + m0;
    float *c = C + m0 * ldc;
    const char *pf = next ? next + p * share : nullptr;
    const int64_t pf_bytes = next ? std::max<int64_t>(0, std::min(share, next_bytes - p * share)) : 0;
    switch (v1 - v0) {
      case 1:
        pass<D, 1>(x, ldt, m, W, ldw, n0, n1, K, c, ldc, pf, pf_bytes, p == 0);
        break;
      case 2:
        pass<D, 2>(x, ldt, m, W, ldw, n0, n1, K, c, ldc, pf, pf_bytes, p == 0);
        break;
      default:
        pass<D, 3>(x, ldt, m, W, ldw, n0, n1, K, c, ldc, pf, pf_bytes, p == 0);
        break;
    }
  }
}
#else
template <int D>
void simd_rows(const float *, int64_t, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, float *, int64_t,
               const char *, int64_t) {}
#endif

}  // namespace

void columns_rows(const float *Xt, int64_t ldt, int64_t M, const void *W, int64_t ldw, int dtype, int64_t n0,
                  int64_t n1, int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes, bool simd) {
  if (M <= 0 || n0 >= n1) return;
  if (!simd) return plain_rows(Xt, ldt, M, W, ldw, dtype, n0, n1, K, C, ldc);
  switch (dtype) {
    case MOE_DTYPE_BF16:
      return simd_rows<MOE_DTYPE_BF16>(Xt, ldt, M, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case MOE_DTYPE_F16:
      return simd_rows<MOE_DTYPE_F16>(Xt, ldt, M, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    default:
      return simd_rows<MOE_DTYPE_F32>(Xt, ldt, M, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
  }
}

}  // namespace moe::cpu
