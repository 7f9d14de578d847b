#include "cpu/few_rows.h"

#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/half.h"
#include "cpu/convert.h"
#include "cpu/convert_x8.h"
#include "cpu/few_rows_columns.h"
#include "cpu/gcc12_avx512.h"
#include "moe/moe.h"

namespace moe::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 64;       // weight rows per work item, at most
// And at most this many bytes of them: a quarter of L2, so that the chunk in hand and the next
// one, fetched ahead, take half of it; no more than 256 KB, as measured on 1 MB of L2 (AMD Zen
// 4). With 512 KB of L2 (2 cores of an AMD EPYC Zen 3, d 1024, d_ff 2048, 8 experts, top-2,
// same-process A/B), 128 KB chunks against 256 KB: forward of 1 and 8 tokens 0.93-0.98 of the
// time in float32 and bfloat16, of 64 tokens and a training step of 8 within 0.99-1.02.
int64_t chunk_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::clamp<int64_t>(l2 / 4, int64_t{64} << 10, int64_t{256} << 10) : int64_t{256} << 10;
  }();
  return bytes;
}
constexpr int64_t kGroup = 6;          // input rows per pass over a chunk
constexpr int kBlockRows = 4;          // weight rows per register block
constexpr int kBf16Dot = -1;           // the xw_dispatch tag of bfloat16 on VDPBF16PS

// bfloat16 inputs in pairs of rows (few_rows_pair_row; the kernel: pairs_block).
constexpr int kPairGroup = 6;      // pairs of input rows per pass: 24 accumulators with four weight rows
constexpr int64_t kPairStep = 16;  // k per step, half a pair's piece

// Elements from a pair to the next: its pieces and 64 bytes more. At a multiple of 4 KB, the
// pieces a step reads of every pair of a pass would fall into one of L1's sets (as PaddedRows).
int64_t pair_stride(int64_t K) { return (K + kPairStep - 1) / kPairStep * 2 * kPairStep + 32; }

// Fetching ahead in X W: the thread's next chunk of columns, a row of it at every `every`-th step
// of k from `phase` on (the passes and tiles over this chunk share its rows).
struct RowsAhead {
  const char *next = nullptr;  // the next chunk's first row
  int64_t ld = 0, lines = 0;   // its row stride in bytes, cache lines per row
  int64_t every = 1, phase = 0;
};

// ---- AVX-512: 16 elements per step, every dtype widened exactly to float32 in registers ---------
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#define MOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MOE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

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

// Each weight row is a stream of its own, four per block and two threads: the hardware's
// prefetchers fall behind on so many, so each load asks for the bytes kAhead further on too.
// (One 2048 x 1024 weight against 16 rows, 2 cores of an AMD EPYC Zen 4: float32 0.68 -> 0.54 ms,
// bfloat16 0.30 -> 0.27; 1 KB ahead did no better.) A prefetch past the row's end never faults.
// Only a chunk's first pass asks (kRowsAhead): the later ones find its rows in L2, and their
// prefetches only took issue slots (a 2048 x 1024 weight from memory, 2 cores of an AMD EPYC Zen
// 4: bfloat16 against 8 rows 0.125-0.129 -> 0.115-0.116 ms, against 16 rows 0.198-0.205 ->
// 0.195-0.198; float32 against 12 rows 0.302-0.315 -> 0.290-0.291).
constexpr int64_t kAhead = 512;  // bytes
inline void prefetch_ahead(const void *row, int64_t byte) {
  _mm_prefetch(static_cast<const char *>(row) + byte + kAhead, _MM_HINT_T0);
}

// A thread's next chunk of weight rows, asked for into L2 while it computes this one. Without it,
// with more than six input rows, a chunk's first pass waits on memory and its later passes (from
// cache) leave memory idle, so the time is the sum of the two rather than the larger (one 2048 x
// 1024 weight against 16 rows, 2 cores of an AMD EPYC Zen 4: float32 0.72 -> 0.55 ms, bfloat16
// 0.39 -> 0.24 ms, and bfloat16 at 1 to 4 rows 0.24 -> 0.13 ms). Each block call takes `lines`
// cache lines per step of k from `next` on: rounded up, so with several passes it runs on past
// the next chunk (a split to the exact line measured slower: 0.13 -> 0.17 ms at 1 to 4 rows).
struct Ahead {
  const char *next = nullptr;
  int64_t lines = 0;
};

inline void prefetch_next(Ahead a, int64_t step) {
  for (int64_t i = 0; i < a.lines; ++i) _mm_prefetch(a.next + (step * a.lines + i) * 64, _MM_HINT_T1);
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

// reduce() of four vectors at once, each sum in reduce()'s order (so the same bits), into
// out[0..3]: the halves of two vectors added in one register, then quarters, then pairs.
MOE_AVX512 inline void reduce4(const __m512 *v, float *out) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
  // quarter r: lane i + lane i + 8, then + 4, of v[r]
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  const __m512 p = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));  // lanes (0 + 2, 1 + 3) of each quarter
  const __m512 t = _mm512_add_ps(p, _mm512_permute_ps(p, 0xB1));  // lane 0 of quarter r: v[r]'s sum
  const __m512 sums = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t);
  _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
}

// C[m, n + r] for r < R from the accumulators acc[r][m].
template <int M, int R>
MOE_AVX512 inline void store_sums(__m512 (&acc)[R][M], float *C, int64_t ldc, int64_t n) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    if constexpr (R == 4) {
      const __m512 v[4] = {acc[0][m], acc[1][m], acc[2][m], acc[3][m]};
      reduce4(v, C + m * ldc + n);
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) C[m * ldc + n + r] = reduce(acc[r][m]);
    }
  }
}

template <int D, int M, int R, bool kRowsAhead>
MOE_AVX512 inline void avx512_block(const void *const *x, const void *W, int64_t ldw, int64_t n, int64_t K, float *C,
                                    int64_t ldc, Ahead ahead) {
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1u);
  const void *w[R];
  for (int r = 0; r < R; ++r) w[r] = row<D>(W, n + r, ldw);
  // The accumulators live in registers only when these loops are unrolled, at -O2 as at -O3
  // (rolled, they go to the stack and the kernel runs at a third of the speed).
  __m512 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < full; k += 16) {
    prefetch_next(ahead, k / 16);
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (kRowsAhead) prefetch_ahead(w[r], k * static_cast<int64_t>(dtype_size(D)));
      wv[r] = load16<D>(w[r], k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 xv = load16<D>(x[m], k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (tail) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load_tail<D>(w[r], full, tail);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 xv = load_tail<D>(x[m], full, tail);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  store_sums<M, R>(acc, C, ldc, n);
}

// Four weight rows at a time against up to six input rows (24 accumulators, 4 weight pieces and
// an input piece: 29 of the 32 registers): each input piece loaded once serves four weight rows,
// each weight piece six input rows, and four streams keep more of memory's bandwidth busy.
// Each output's sum is the same (lane-wise over k, then reduce()) whatever the blocking.
template <int D, int M, bool kRowsAhead>
MOE_AVX512 void avx512_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
                            float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  const void *x[M];
  for (int m = 0; m < M; ++m) x[m] = row<D>(X, m, ldx);
  constexpr int R = kBlockRows;
  constexpr int64_t kStep = 16;
  // next_bytes spread evenly over the full blocks, whole cache lines per step of k.
  const int64_t blocks = (n1 - n0) / R, steps = (K + kStep - 1) / kStep;
  const int64_t lines = blocks > 0 ? ((next_bytes + 63) / 64 + blocks * steps - 1) / (blocks * steps) : 0;
  Ahead ahead{next, lines};
  const Ahead none{};
  int64_t n = n0;
  for (; n + R <= n1; n += R, ahead.next += lines * steps * 64)
    avx512_block<D, M, R, kRowsAhead>(x, W, ldw, n, K, C, ldc, ahead);
  for (; n < n1; ++n) avx512_block<D, M, 1, kRowsAhead>(x, W, ldw, n, K, C, ldc, none);
}

// bfloat16 on CPUs with AVX512-BF16, X in pairs of rows (few_rows_pair_row): each step of 16 k
// loads 16 elements of a weight row into both halves of a register and one piece of a pair, the
// pair's first row in lanes 0-7 and its second in lanes 8-15, so that VDPBF16PS (32 products, each
// two neighbours summed into a float32 lane, denormal inputs as zero) serves two input rows at
// once. An accumulator then holds two outputs of 8 lanes each, and the sums across lanes at the
// end cost a quarter of a one-row accumulator's 16 (a 1024 x 256 weight in L2, one core of an AMD
// EPYC Zen 4: 205-218 -> 220-227 GFLOP/s at 6 to 16 input rows; the layer's forward, d 1024, d_ff
// 2048, 8 experts, top-2, both cores, same-process A/B: 64 tokens 0.94-0.95 of the time, 128 tokens
// 0.95-0.96, 1 and 8 tokens within 0.97-1.03, where the weights' bytes bound it and an odd row's
// pair computes zeros). Lane j of a half sums the pairs
// (k, k + 1) with k = 16 s + 2 j in order of s; then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 +
// l7)).
// The sums of the halves of v[0..3]: lanes 0-3 the first rows' (v[r]'s in lane r), lanes 8-11 the
// second rows'. Each sum in the order above, whichever lane it is computed in.
MOE_AVX512 inline __m512 pair_sums(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // in each 128-bit lane: (l0 + l1, l2 + l3) of v0, then of v1
  const __m512 p = _mm512_add_ps(_mm512_shuffle_ps(v0, v1, 0x88), _mm512_shuffle_ps(v0, v1, 0xDD));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_ps(v2, v3, 0x88), _mm512_shuffle_ps(v2, v3, 0xDD));
  // in each 128-bit lane: the sums of its four lanes of v0, v1, v2, v3
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(p, q, 0x88), _mm512_shuffle_ps(p, q, 0xDD));
  return _mm512_add_ps(r, _mm512_shuffle_f32x4(r, r, 0xB1));  // 128-bit lanes 0 + 1 and 2 + 3
}

// One step of pairs_block: weight rows w at k (through `mask` where kMasked), pieces s of the pairs.
template <int G, int R, bool kMasked>
MOE_AVX512_BF16 inline void pairs_step(__m512 (&acc)[R][G], const uint16_t *const *w, int64_t k, __mmask16 mask,
                                       const uint16_t *xp, int64_t stride, int64_t s) {
  __m512i wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    // unmasked, the load broadcasts by itself; masked, it takes a shuffle more
    if constexpr (kMasked)
      wv[r] = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi16(mask, w[r] + k));
    else
      wv[r] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w[r] + k)));
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    const __m512i xv = _mm512_loadu_si512(xp + g * stride + s * 2 * kPairStep);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], (__m512bh)wv[r], (__m512bh)xv);
  }
}

// Outputs of R weight rows (n on) for the G pairs of a pass (rows input rows: the last pair's
// second row may be padding, not stored). xp: the pass's first pair, pair_stride(K) apart.
template <int G, int R, bool kRowsAhead>
MOE_AVX512_BF16 inline void pairs_block(const uint16_t *xp, int64_t rows, const void *W, int64_t ldw, int64_t n,
                                        int64_t K, float *C, int64_t ldc, Ahead ahead) {
  const int64_t steps = (K + kPairStep - 1) / kPairStep, stride = pair_stride(K);
  const uint16_t *w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const uint16_t *>(row<MOE_DTYPE_BF16>(W, n + r, ldw));
  __m512 acc[R][G];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  // Two steps a cache line of the weight rows, the first asking for the bytes ahead; a last step
  // reads the weight rows' remaining k through a mask.
  const int64_t full = K / kPairStep;
  int64_t s = 0;
  for (; s + 1 < full; s += 2) {
    prefetch_next(ahead, s / 2);
    if constexpr (kRowsAhead)
      for (int r = 0; r < R; ++r) prefetch_ahead(w[r], 2 * s * kPairStep);
    pairs_step<G, R, false>(acc, w, s * kPairStep, 0, xp, stride, s);
    pairs_step<G, R, false>(acc, w, (s + 1) * kPairStep, 0, xp, stride, s + 1);
  }
  if (s < full) {
    prefetch_next(ahead, s / 2);
    pairs_step<G, R, false>(acc, w, s * kPairStep, 0, xp, stride, s);
    ++s;
  }
  if (s < steps) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K % kPairStep)) - 1u);
    if (s % 2 == 0) prefetch_next(ahead, s / 2);
    pairs_step<G, R, true>(acc, w, s * kPairStep, tail, xp, stride, s);
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    __m512 sums;
    if constexpr (R == 4)
      sums = pair_sums(acc[0][g], acc[1][g], acc[2][g], acc[3][g]);
    else
      sums = pair_sums(acc[0][g], acc[0][g], acc[0][g], acc[0][g]);
    float *first = C + 2 * g * ldc + n, *second = first + ldc;
    const bool two = 2 * g + 1 < rows;
    if constexpr (R == 4) {
      _mm_storeu_ps(first, _mm512_castps512_ps128(sums));
      if (two) _mm_storeu_ps(second, _mm512_extractf32x4_ps(sums, 2));
    } else {
      *first = _mm512_cvtss_f32(sums);
      if (two) *second = _mm_cvtss_f32(_mm512_extractf32x4_ps(sums, 2));
    }
  }
}

// A pass of G pairs over weight rows [n0, n1): blocks of four rows, then one at a time.
template <int G, bool kRowsAhead>
MOE_AVX512_BF16 void pairs_rows(const uint16_t *xp, int64_t rows, const void *W, int64_t ldw, int64_t n0, int64_t n1,
                                int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  constexpr int R = kBlockRows;
  // next_bytes spread evenly over the full blocks, whole cache lines per fetching step.
  const int64_t blocks = (n1 - n0) / R, fetches = ((K + kPairStep - 1) / kPairStep + 1) / 2;
  const int64_t lines = blocks > 0 ? ((next_bytes + 63) / 64 + blocks * fetches - 1) / (blocks * fetches) : 0;
  Ahead ahead{next, lines};
  int64_t n = n0;
  for (; n + R <= n1; n += R, ahead.next += lines * fetches * 64)
    pairs_block<G, R, kRowsAhead>(xp, rows, W, ldw, n, K, C, ldc, ahead);
  for (; n < n1; ++n) pairs_block<G, 1, kRowsAhead>(xp, rows, W, ldw, n, K, C, ldc, Ahead{});
}

template <bool kRowsAhead>
void pairs_dispatch_rows(const uint16_t *xp, int64_t rows, const void *W, int64_t ldw, int64_t n0,
                         int64_t n1, int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  switch ((rows + 1) / 2) {
    case 1: return pairs_rows<1, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 2: return pairs_rows<2, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 3: return pairs_rows<3, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 4: return pairs_rows<4, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 5: return pairs_rows<5, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    default: return pairs_rows<kPairGroup, kRowsAhead>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
  }
}

// A pass over a chunk of weight rows; the first (rows_ahead) fetches each row ahead too.
void pairs_dispatch(const uint16_t *xp, int64_t rows, const void *W, int64_t ldw, int64_t n0,
                    int64_t n1, int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes,
                    bool rows_ahead) {
  if (rows_ahead)
    pairs_dispatch_rows<true>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
  else
    pairs_dispatch_rows<false>(xp, rows, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
}

template <int D, bool kRowsAhead>
void avx512_dispatch_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                          int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  switch (M) {
    case 1: return avx512_rows<D, 1, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 2: return avx512_rows<D, 2, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 3: return avx512_rows<D, 3, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 4: return avx512_rows<D, 4, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 5: return avx512_rows<D, 5, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    default: return avx512_rows<D, kGroup, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
  }
}

// A pass over a chunk of weight rows; the first (rows_ahead) fetches each row ahead too.
template <int D>
void avx512_dispatch(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                     int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes, bool rows_ahead) {
  if (rows_ahead)
    avx512_dispatch_rows<D, true>(X, ldx, W, ldw, M, n0, n1, K, C, ldc, next, next_bytes);
  else
    avx512_dispatch_rows<D, false>(X, ldx, W, ldw, M, n0, n1, K, C, ldc, next, next_bytes);
}

// ---- AVX2 + FMA (CPUs without AVX-512): avx512_block's 16 lanes as two registers of 8 -----------
// Lanes 0-7 in one register, 8-15 in the other, each lane the same fused sum over the same k, then
// reduce()'s order (lane i + lane i + 8 is the two registers added), so the same bits as the
// AVX-512 kernel and the portable loop. Sixteen registers hold 2 x R x M accumulators, R weight
// pieces and an input piece: four weight rows against one input row, two against two or three.
#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int D>
MOE_AVX2 inline __m256 load8(const void *p, int64_t k) {
  if constexpr (D == MOE_DTYPE_F32) {
    return _mm256_loadu_ps(static_cast<const float *>(p) + k);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + k));
    if constexpr (D == MOE_DTYPE_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

// reduce() of the 16 lanes lo (0-7) and hi (8-15).
MOE_AVX2 inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 a = _mm256_add_ps(lo, hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// The input rows' dtype where bfloat16 weights meet float32 input rows in even/odd order (the
// input rows widened by PaddedRows): each piece of 16 k holds its 8 even elements, then its 8 odd
// ones, and a weight piece splits into the same two halves with one AND and one shift (widening
// eight elements in order takes two operations). The registers then hold lanes 0, 2, .., 14 and
// 1, 3, .., 15, put back in order before the sum across lanes: the same sums, the same bits.
// Where a pass has kEvenOddRows input rows or more: with fewer, each weight piece serves too few
// rows to pay for the copy. (2 cores of an AMD EPYC Zen 3, a 2048 x 1024 bfloat16 weight against
// 16 rows, X in bfloat16 against X even/odd, same-process A/B: from L3 75-85 -> 98-107 GFLOP/s,
// from memory 77 -> 82-86; against 1 and 2 rows from memory 1.03-1.06x the time. The forward of
// 8, 16, 32 and 64 tokens, d 1024, d_ff 2048, 8 experts, top-2: 0.96, 0.89, 0.83, 0.81 of the
// time. float16, whose weights widen in one instruction (VCVTPH2PS), ran slower on copies.)
constexpr int kEvenOdd = -1;
constexpr int64_t kEvenOddRows = 3;

template <int D>
MOE_AVX2 inline __m256 load_half(const void *p, int64_t k, int h) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + k));
  return _mm256_castsi256_ps(h == 0 ? _mm256_slli_epi32(v, 16) : _mm256_and_si256(v, _mm256_set1_epi32(-65536)));
}

// Lanes of the even/odd order (lo: elements 0, 2, .., 14; hi: 1, 3, .., 15) back to 0-7 and 8-15.
MOE_AVX2 inline void even_odd_back(__m256 &lo, __m256 &hi) {
  const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
  lo = _mm256_permute2f128_ps(a, b, 0x20);
  hi = _mm256_permute2f128_ps(a, b, 0x31);
}

// K bfloat16 values as float32 in even/odd order, the last piece padded with zeros.
MOE_AVX2 void avx2_even_odd(float *dst, const uint16_t *src, int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm256_storeu_ps(dst + k, load_half<MOE_DTYPE_BF16>(src, k, 0));
    _mm256_storeu_ps(dst + k + 8, load_half<MOE_DTYPE_BF16>(src, k, 1));
  }
  if (k < K) {
    alignas(32) uint16_t t[16] = {};
    std::memcpy(t, src + k, static_cast<size_t>(K - k) * sizeof(uint16_t));
    _mm256_storeu_ps(dst + k, load_half<MOE_DTYPE_BF16>(t, 0, 0));
    _mm256_storeu_ps(dst + k + 8, load_half<MOE_DTYPE_BF16>(t, 0, 1));
  }
}

// One step of 16 k of avx2_block: weight rows w and input rows x at k, half by half.
template <int D, int DX, int M, int R, bool kRowsAhead>
MOE_AVX2 inline void avx2_step(__m256 (&acc)[2][R][M], const void *const *w, const void *const *x, int64_t k) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (kRowsAhead && h == 0) prefetch_ahead(w[r], k * static_cast<int64_t>(dtype_size(D)));
      if constexpr (DX == kEvenOdd)
        wv[r] = load_half<D>(w[r], k, h);
      else
        wv[r] = load8<D>(w[r], k + 8 * h);
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      __m256 xv = load8<DX == kEvenOdd ? MOE_DTYPE_F32 : DX>(x[m], k + 8 * h);
      // In a register: left to itself GCC folds the load into each of the R multiply-adds, and
      // the loads (R + M x R a half step, not R + M) then bind: float32, 12 input rows against
      // 48 weight rows of 1024 in cache, one core of an AMD EPYC Zen 3, 71 against 85 GFLOP/s
      // (rows on 64-byte boundaries), 46 against 70 (rows 16 bytes off them).
      asm("" : "+x"(xv));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[h][r][m] = _mm256_fmadd_ps(wv[r], xv, acc[h][r][m]);
    }
  }
}

template <int D, int DX, int M, int R, bool kRowsAhead>
MOE_AVX2 inline void avx2_block(const void *const *x, const void *W, int64_t ldw, int64_t n, int64_t K, float *C,
                                int64_t ldc, Ahead ahead) {
  const int64_t full = K / 16 * 16;
  const void *w[R];
  for (int r = 0; r < R; ++r) w[r] = row<D>(W, n + r, ldw);
  __m256 acc[2][R][M];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[h][r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < full; k += 16) {
    prefetch_next(ahead, k / 16);
    avx2_step<D, DX, M, R, kRowsAhead>(acc, w, x, k);
  }
  if (full < K) {  // the last k through copies padded with zeros (AVX2 has no masked 16-bit load)
    using E = std::conditional_t<D == MOE_DTYPE_F32, float, uint16_t>;
    using EX = std::conditional_t<DX == MOE_DTYPE_F32 || DX == kEvenOdd, float, uint16_t>;
    alignas(32) E tw[R][16] = {};
    alignas(32) EX tx[M][16] = {};
    const void *pw[R], *px[M];
    for (int r = 0; r < R; ++r)
      std::memcpy(tw[r], static_cast<const E *>(w[r]) + full, (K - full) * sizeof(E)), pw[r] = tw[r];
    for (int m = 0; m < M; ++m) {
      // Even/odd input rows have their last piece whole, padded with zeros.
      const int64_t n_x = DX == kEvenOdd ? 16 : K - full;
      std::memcpy(tx[m], static_cast<const EX *>(x[m]) + full, n_x * sizeof(EX)), px[m] = tx[m];
    }
    avx2_step<D, DX, M, R, false>(acc, pw, px, 0);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      __m256 lo = acc[0][r][m], hi = acc[1][r][m];
      if constexpr (DX == kEvenOdd) even_odd_back(lo, hi);
      C[m * ldc + n + r] = reduce16(lo, hi);
    }
}

template <int D, int DX, int M, int R, bool kRowsAhead>
MOE_AVX2 void avx2_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
                        float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  const void *x[M];
  for (int m = 0; m < M; ++m) x[m] = row<DX == kEvenOdd ? MOE_DTYPE_F32 : DX>(X, m, ldx);
  constexpr int64_t kStep = 16;
  // next_bytes spread evenly over the full blocks, whole cache lines per step of k (avx512_rows).
  const int64_t blocks = (n1 - n0) / R, steps = (K + kStep - 1) / kStep;
  const int64_t lines = blocks > 0 ? ((next_bytes + 63) / 64 + blocks * steps - 1) / (blocks * steps) : 0;
  Ahead ahead{next, lines};
  int64_t n = n0;
  for (; n + R <= n1; n += R, ahead.next += lines * steps * 64)
    avx2_block<D, DX, M, R, kRowsAhead>(x, W, ldw, n, K, C, ldc, ahead);
  for (; n < n1; ++n) avx2_block<D, DX, M, 1, kRowsAhead>(x, W, ldw, n, K, C, ldc, Ahead{});
}

constexpr int kAvx2Group = 3;  // input rows per pass

template <int D, int DX, bool kRowsAhead>
void avx2_dispatch_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                        int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes) {
  switch (M) {
    case 1: return avx2_rows<D, DX, 1, 4, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    case 2: return avx2_rows<D, DX, 2, 2, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
    default:
      return avx2_rows<D, DX, kAvx2Group, 2, kRowsAhead>(X, ldx, W, ldw, n0, n1, K, C, ldc, next, next_bytes);
  }
}

// A pass of up to kAvx2Group input rows over a chunk of weight rows; the first (rows_ahead)
// fetches each row ahead too.
template <int D, int DX = D>
void avx2_dispatch(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                   int64_t K, float *C, int64_t ldc, const char *next, int64_t next_bytes, bool rows_ahead) {
  if (rows_ahead)
    avx2_dispatch_rows<D, DX, true>(X, ldx, W, ldw, M, n0, n1, K, C, ldc, next, next_bytes);
  else
    avx2_dispatch_rows<D, DX, false>(X, ldx, W, ldw, M, n0, n1, K, C, ldc, next, next_bytes);
}

// ---- X W: weight rows along k, input rows broadcast -----------------------------------------------
// A tile of MR input rows by NV vectors of 16 columns: per k, NV weight pieces loaded once serve
// MR rows, each input value broadcast into NV multiply-adds (MR x NV accumulators, no sums across
// lanes). The last vector of a tile may be partial (mask `last`). Fetching ahead: RowsAhead.

// The fetching ahead of a tile: the next chunk's rows due by step `upto` of k, into L2.
struct RowsFetch {
  RowsAhead ahead;
  int64_t due;
  explicit RowsFetch(const RowsAhead &a, int64_t K) : ahead(a), due(a.next ? a.phase : K) {}
  void upto(int64_t k) {  // prefetches only: any x86-64 CPU
    for (; due <= k; due += ahead.every)
      for (int64_t i = 0; i < ahead.lines; ++i) _mm_prefetch(ahead.next + due * ahead.ld + i * 64, _MM_HINT_T1);
  }
};

// C (+)= the accumulators of a tile, the last vector through `last`.
template <int MR, int NV>
MOE_AVX512 inline void xw_store(__m512 (&acc)[MR][NV], float *C, int64_t ldc, int64_t n, bool accumulate,
                                __mmask16 last) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float *c = C + m * ldc + n + v * 16;
      const __mmask16 mask = v == NV - 1 ? last : 0xFFFF;
      const __m512 r = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), acc[m][v]) : acc[m][v];
      _mm512_mask_storeu_ps(c, mask, r);
    }
}

constexpr int64_t kXPiece = 256;  // k per piece of input rows widened on the stack

// MR input rows' piece [k0, k0 + len) in float32, broadcast from there by the X W tiles: float32
// rows in place, 16-bit ones widened exactly into the piece's own buffer.
template <int D, int MR>
struct InputPiece {
  float buf[D == MOE_DTYPE_F32 ? 1 : MR][D == MOE_DTYPE_F32 ? 1 : kXPiece];
  const float *rows[MR];
  InputPiece(const void *X, int64_t ldx, int64_t k0, int64_t len) {
    for (int m = 0; m < MR; ++m) {
      if constexpr (D == MOE_DTYPE_F32) {
        rows[m] = static_cast<const float *>(X) + m * ldx + k0;
      } else {
        widen(buf[m], static_cast<const unsigned char *>(X) + (m * ldx + k0) * dtype_size(D), D, len);
        rows[m] = buf[m];
      }
    }
  }
  InputPiece(const InputPiece &) = delete;
  InputPiece &operator=(const InputPiece &) = delete;
};

template <int D, int MR, int NV>
MOE_AVX512 void xw_tile(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n, int64_t K, float *C,
                        int64_t ldc, bool accumulate, __mmask16 last, RowsAhead ahead) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const size_t es = dtype_size(D);
  const unsigned char *w = static_cast<const unsigned char *>(W) + static_cast<size_t>(n) * es;
  const size_t wstride = static_cast<size_t>(ldw) * es;
  RowsFetch fetch(ahead, K);
  for (int64_t k0 = 0; k0 < K; k0 += kXPiece) {
    const int64_t len = std::min(kXPiece, K - k0);
    const InputPiece<D, MR> piece(X, ldx, k0, len);
    const float *const *xs = piece.rows;
    for (int64_t k = 0; k < len; ++k, w += wstride) {
      fetch.upto(k0 + k);
      __m512 wv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        wv[v] = v == NV - 1 && last != 0xFFFF ? load_tail<D>(w, v * 16, last) : load16<D>(w, v * 16);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_set1_ps(xs[m][k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wv[v], acc[m][v]);
      }
    }
  }
  xw_store<MR, NV>(acc, C, ldc, n, accumulate, last);
}

// bfloat16 on VDPBF16PS, pairs of k: weight rows k and k + 1 interleaved (lane i: W[k, n + i],
// W[k + 1, n + i]), against the input's pair X[m, k], X[m, k + 1] in every lane; an odd K's last
// k pairs with 0.
template <int MR, int NV>
MOE_AVX512_BF16 void xw_tile_dot(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n, int64_t K,
                                 float *C, int64_t ldc, bool accumulate, __mmask16 last, RowsAhead ahead) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const unsigned char *w = static_cast<const unsigned char *>(W) + static_cast<size_t>(n) * 2;
  const size_t wstride = static_cast<size_t>(ldw) * 2;
  RowsFetch fetch(ahead, K);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                         5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t k = 0; k < K; k += 2, w += 2 * wstride) {
    const bool odd = k + 1 == K;
    fetch.upto(k + 1);
    __m512i wv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : 0xFFFF;
      const __m256i a = _mm256_maskz_loadu_epi16(mask, w + v * 32);
      const __m256i b = odd ? _mm256_setzero_si256() : _mm256_maskz_loadu_epi16(mask, w + wstride + v * 32);
      wv[v] = _mm512_permutexvar_epi16(pairs, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const uint16_t *xm = static_cast<const uint16_t *>(X) + m * ldx + k;
      const uint32_t pair = odd ? xm[0] : static_cast<uint32_t>(xm[0]) | static_cast<uint32_t>(xm[1]) << 16;
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)wv[v], (__m512bh)xv);
    }
  }
  xw_store<MR, NV>(acc, C, ldc, n, accumulate, last);
}

// Columns [n0, n1) of MR rows: tiles of 64 columns, then of 32 and 16, the last one partial.
template <int D, int MR, int NV>
MOE_AVX512 inline void xw_any_tile(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n, int64_t K,
                                   float *C, int64_t ldc, bool accumulate, __mmask16 last, RowsAhead ahead) {
  if constexpr (D == kBf16Dot)
    xw_tile_dot<MR, NV>(X, ldx, W, ldw, n, K, C, ldc, accumulate, last, ahead);
  else
    xw_tile<D, MR, NV>(X, ldx, W, ldw, n, K, C, ldc, accumulate, last, ahead);
}

template <int D, int MR>
MOE_AVX512 void xw_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
                        float *C, int64_t ldc, bool accumulate, RowsAhead ahead, int64_t tile0) {
  int64_t n = n0, t = tile0;
  auto next = [&] {
    RowsAhead a = ahead;
    a.phase = (ahead.phase + t++) % ahead.every;
    return a;
  };
  for (; n + 64 <= n1; n += 64) xw_any_tile<D, MR, 4>(X, ldx, W, ldw, n, K, C, ldc, accumulate, 0xFFFF, next());
  for (; n + 32 <= n1; n += 32) xw_any_tile<D, MR, 2>(X, ldx, W, ldw, n, K, C, ldc, accumulate, 0xFFFF, next());
  for (; n < n1; n += 16) {
    const __mmask16 last = n + 16 <= n1 ? 0xFFFF : static_cast<__mmask16>((1u << (n1 - n)) - 1u);
    xw_any_tile<D, MR, 1>(X, ldx, W, ldw, n, K, C, ldc, accumulate, last, next());
  }
}

template <int D>
void xw_dispatch(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1, int64_t K,
                 float *C, int64_t ldc, bool accumulate, RowsAhead ahead, int64_t tile0) {
  switch (M) {
    case 1: return xw_rows<D, 1>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 2: return xw_rows<D, 2>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 3: return xw_rows<D, 3>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 4: return xw_rows<D, 4>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 5: return xw_rows<D, 5>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    default: return xw_rows<D, kGroup>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
  }
}

// ---- AVX2 + FMA: X W in tiles of MR input rows by 16 columns (two registers of 8) ---------------
// xw_tile's order (k in order, one fused multiply-add each), so the same bits. Twelve accumulators,
// two weight pieces and a broadcast input value fill the sixteen registers at MR = 6. bfloat16
// weights split as avx2_step's (one AND and one shift for 16 columns): the registers hold the even
// and the odd columns, put back in order at the store.
template <int D>
MOE_AVX2 inline void avx2_xw_load(const unsigned char *w, __m256 &lo, __m256 &hi) {
  if constexpr (D == MOE_DTYPE_BF16) {
    lo = load_half<D>(w, 0, 0);
    hi = load_half<D>(w, 0, 1);
  } else {
    lo = load8<D>(w, 0);
    hi = load8<D>(w, 8);
  }
}

// A tile of NV registers of columns (2: 16 columns, the last tile partial where not kFull; 4: 32
// full columns, a whole cache line of 16-bit weights, for one or two input rows: the registers
// allow it there, and each line is then read once rather than by two tiles in turn).
template <int D, int MR, int NV, bool kFull>
MOE_AVX2 void avx2_xw_tile(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n, int64_t width, int64_t K,
                           float *C, int64_t ldc, bool accumulate, RowsAhead ahead) {
  static_assert(NV == 2 || (NV == 4 && kFull));
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const size_t es = dtype_size(D);
  const unsigned char *w = static_cast<const unsigned char *>(W) + static_cast<size_t>(n) * es;
  const size_t wstride = static_cast<size_t>(ldw) * es;
  RowsFetch fetch(ahead, K);
  for (int64_t k0 = 0; k0 < K; k0 += kXPiece) {
    const int64_t len = std::min(kXPiece, K - k0);
    const InputPiece<D, MR> piece(X, ldx, k0, len);
    const float *const *xs = piece.rows;
    for (int64_t k = 0; k < len; ++k, w += wstride) {
      fetch.upto(k0 + k);
      __m256 wv[NV];
      if constexpr (kFull) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; v += 2) avx2_xw_load<D>(w + v * 8 * es, wv[v], wv[v + 1]);
      } else {  // the last columns through a copy padded with zeros
        alignas(32) unsigned char t[64] = {};
        std::memcpy(t, w, static_cast<size_t>(width) * es);
        avx2_xw_load<D>(t, wv[0], wv[1]);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_broadcast_ss(xs[m] + k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xv, wv[v], acc[m][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; v += 2) {
      __m256 lo = acc[m][v], hi = acc[m][v + 1];
      if constexpr (D == MOE_DTYPE_BF16) even_odd_back(lo, hi);  // even and odd columns back in order
      float *c = C + m * ldc + n + v * 8;
      if constexpr (kFull) {
        if (accumulate) lo = _mm256_add_ps(_mm256_loadu_ps(c), lo), hi = _mm256_add_ps(_mm256_loadu_ps(c + 8), hi);
        _mm256_storeu_ps(c, lo);
        _mm256_storeu_ps(c + 8, hi);
      } else {
        alignas(32) float r[16];
        _mm256_store_ps(r, lo);
        _mm256_store_ps(r + 8, hi);
        for (int64_t j = 0; j < width; ++j) c[j] = accumulate ? c[j] + r[j] : r[j];
      }
    }
}

// More input rows than one pass takes (kGroup), in pieces of kStripK rows of W: each piece's
// columns copied, row by row, into strips of 16 columns (one per tile) that every pass then
// reads. In place, a tile's rows lie ldw elements apart, a multiple of 4 KB in the layer (a
// weight's rows), and fall into so few of L1's and L2's sets that the later passes found them
// evicted and read them again; and a tile walking down all K rows read memory 64 bytes from each
// row. The passes' accumulators stay in memory between pieces (xw_tile's sums, k in order: the
// same bits). Columns kStripCols at a time, the unit of work: 512 left one thread waiting on the
// other at the end of a product of 1024 columns. (2 cores of an AMD EPYC Zen 3, float32 training
// step, d 1024, d_ff 2048, 8 experts, top-2, dY W2, dH W1 and dG W3 on few_rows_xw up to 48 rows
// against oneDNN: 64, 96, 128 tokens 0.93, 0.92, 0.96 of the time; with 512 columns, 1.10 at 64.)
constexpr int64_t kStripRows = 64;   // input rows, at most
constexpr int64_t kStripCols = 128;  // columns a sweep over k
constexpr int64_t kStripK = 32;      // k per piece: with the next piece fetched, 8 lines per L2 set

// MR input rows' 16 accumulators (acc[m], kept in the registers' order) over k in [k0, k0 + len),
// the columns from the strip (16 elements a k, as stored).
template <int D, int MR>
MOE_AVX2 void avx2_xw_strip_pass(const void *X, int64_t ldx, int64_t k0, int64_t len, const unsigned char *strip,
                                 float *acc_mem, int64_t lda) {
  constexpr size_t es = D == MOE_DTYPE_F32 ? 4 : 2;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc_mem + m * lda);
    acc[m][1] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc_mem + m * lda + 8);
  }
  const InputPiece<D, MR> piece(X, ldx, k0, len);
  for (int64_t k = 0; k < len; ++k) {
    __m256 lo, hi;
    avx2_xw_load<D>(strip + k * 16 * es, lo, hi);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(piece.rows[m] + k);
      acc[m][0] = _mm256_fmadd_ps(xv, lo, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xv, hi, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_store_ps(acc_mem + m * lda, acc[m][0]);
    _mm256_store_ps(acc_mem + m * lda + 8, acc[m][1]);
  }
}

// C (+)= X W over columns [n0, n1) for M input rows (kGroup < M <= kStripRows), in passes split
// evenly as xw_cols'.
template <int D>
MOE_AVX2 void avx2_xw_strips(const void *X, int64_t ldx, int64_t M, const void *W, int64_t ldw, int64_t n0,
                             int64_t n1, int64_t K, float *C, int64_t ldc, bool accumulate) {
  constexpr int64_t es = D == MOE_DTYPE_F32 ? 4 : 2;
  alignas(64) unsigned char pack[kStripK * kStripCols * es];  // a piece's strips, tile after tile
  alignas(32) float acc[kStripRows * kStripCols];
  const int64_t passes = (M + kGroup - 1) / kGroup, row = ldw * es, cols = kStripCols;
  for (int64_t na = n0; na < n1; na += cols) {
    const int64_t nb = std::min(n1, na + cols), tiles = (nb - na + 15) / 16;
    for (int64_t k0 = 0; k0 < K; k0 += kStripK) {
      const int64_t len = std::min(kStripK, K - k0);
      // Each row's columns read in one run (the next piece's rows asked for meanwhile).
      for (int64_t k = 0; k < len; ++k) {
        const unsigned char *w = static_cast<const unsigned char *>(W) + (k0 + k) * row + na * es;
        for (int64_t b = 0; b < (nb - na) * es; b += 64)
          _mm_prefetch(reinterpret_cast<const char *>(w + kStripK * row + b), _MM_HINT_T1);
        for (int64_t t = 0; t < tiles; ++t) {
          unsigned char *to = pack + (t * len + k) * 16 * es;
          const int64_t width = std::min<int64_t>(16, nb - na - 16 * t);
          if (width == 16) {
            _mm256_store_si256(reinterpret_cast<__m256i *>(to),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + t * 16 * es)));
            if constexpr (es == 4)
              _mm256_store_si256(reinterpret_cast<__m256i *>(to + 32),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + t * 16 * es + 32)));
          } else {  // the last columns, padded with zeros
            std::memset(to, 0, 16 * es);
            std::memcpy(to, w + t * 16 * es, static_cast<size_t>(width * es));
          }
        }
      }
      for (int64_t n = na; n < nb; n += 16) {
        const unsigned char *strip = pack + (n - na) / 16 * len * 16 * es;
        for (int64_t p = 0; p < passes; ++p) {
          const int64_t m0 = M * p / passes, m = M * (p + 1) / passes - m0;
          const void *x = static_cast<const unsigned char *>(X) + m0 * ldx * es;
          float *a = acc + m0 * cols + (n - na);
          switch (m) {
            case 1: avx2_xw_strip_pass<D, 1>(x, ldx, k0, len, strip, a, cols); break;
            case 2: avx2_xw_strip_pass<D, 2>(x, ldx, k0, len, strip, a, cols); break;
            case 3: avx2_xw_strip_pass<D, 3>(x, ldx, k0, len, strip, a, cols); break;
            case 4: avx2_xw_strip_pass<D, 4>(x, ldx, k0, len, strip, a, cols); break;
            case 5: avx2_xw_strip_pass<D, 5>(x, ldx, k0, len, strip, a, cols); break;
            default: avx2_xw_strip_pass<D, kGroup>(x, ldx, k0, len, strip, a, cols); break;
          }
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = na; n < nb; n += 16) {
        const float *a = acc + m * cols + (n - na);
        __m256 lo = _mm256_load_ps(a), hi = _mm256_load_ps(a + 8);  // K > 0 (few_rows_xw)
        if constexpr (D == MOE_DTYPE_BF16) even_odd_back(lo, hi);  // even and odd columns back in order
        alignas(32) float r[16];
        _mm256_store_ps(r, lo);
        _mm256_store_ps(r + 8, hi);
        float *c = C + m * ldc + n;
        for (int64_t j = 0, width = std::min<int64_t>(16, nb - n); j < width; ++j) c[j] = accumulate ? c[j] + r[j] : r[j];
      }
  }
}

// Tiles of avx2_xw_rows over `width` columns for MR input rows.
int64_t avx2_xw_tiles(int64_t width, int64_t MR) {
  return MR <= 2 ? width / 32 + (width % 32 + 15) / 16 : (width + 15) / 16;
}

template <int D, int MR>
MOE_AVX2 void avx2_xw_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t n0, int64_t n1, int64_t K,
                           float *C, int64_t ldc, bool accumulate, RowsAhead ahead, int64_t tile0) {
  int64_t t = tile0, n = n0;
  auto next = [&] {
    RowsAhead a = ahead;
    a.phase = (ahead.phase + t++) % ahead.every;
    return a;
  };
  if constexpr (MR <= 2)
    for (; n + 32 <= n1; n += 32) avx2_xw_tile<D, MR, 4, true>(X, ldx, W, ldw, n, 32, K, C, ldc, accumulate, next());
  for (; n < n1; n += 16) {
    if (n + 16 <= n1)
      avx2_xw_tile<D, MR, 2, true>(X, ldx, W, ldw, n, 16, K, C, ldc, accumulate, next());
    else
      avx2_xw_tile<D, MR, 2, false>(X, ldx, W, ldw, n, n1 - n, K, C, ldc, accumulate, next());
  }
}

template <int D>
void avx2_xw_dispatch(const void *X, int64_t ldx, const void *W, int64_t ldw, int64_t M, int64_t n0, int64_t n1,
                      int64_t K, float *C, int64_t ldc, bool accumulate, RowsAhead ahead, int64_t tile0) {
  switch (M) {
    case 1: return avx2_xw_rows<D, 1>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 2: return avx2_xw_rows<D, 2>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 3: return avx2_xw_rows<D, 3>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 4: return avx2_xw_rows<D, 4>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    case 5: return avx2_xw_rows<D, 5>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
    default: return avx2_xw_rows<D, kGroup>(X, ldx, W, ldw, n0, n1, K, C, ldc, accumulate, ahead, tile0);
  }
}

// ---- AVX2 + FMA: G += A^T B in tiles of R gradient rows by 16 columns (two registers) ----------
// grad_tile's order (m in order, one fused multiply-add each, the sum added to G once and rounded
// once to a 16-bit G, in registers: cpu/convert_x8.h), so the same bits as the portable loop.
template <int R>
MOE_AVX2 void avx2_grad_tile(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg,
                             int dtype, int64_t j, int64_t k0, int64_t width, Ahead ahead) {
  prefetch_next(ahead, 0);
  __m256 acc[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const bool full = width == 16;
  alignas(32) float tb[16] = {};
  for (int64_t m = 0; m < M; ++m) {
    const float *b = B + m * ldb + k0;
    if (!full) std::memcpy(tb, b, static_cast<size_t>(width) * sizeof(float)), b = tb;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(A + m * lda + j + r);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const size_t es = dtype_size(dtype);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    unsigned char *g = static_cast<unsigned char *>(G) + (static_cast<size_t>((j + r) * ldg + k0)) * es;
    alignas(32) unsigned char tg[64] = {};
    unsigned char *p = full ? g : tg;
    if (!full) std::memcpy(tg, g, static_cast<size_t>(width) * es);
    if (dtype == MOE_DTYPE_F32) {
      float *f = reinterpret_cast<float *>(p);
      _mm256_storeu_ps(f, _mm256_add_ps(_mm256_loadu_ps(f), acc[r][0]));
      _mm256_storeu_ps(f + 8, _mm256_add_ps(_mm256_loadu_ps(f + 8), acc[r][1]));
    } else {
      x8::narrow(dtype, p, _mm256_add_ps(x8::widen(dtype, p), acc[r][0]));
      x8::narrow(dtype, p + 16, _mm256_add_ps(x8::widen(dtype, p + 16), acc[r][1]));
    }
    if (!full) std::memcpy(g, tg, static_cast<size_t>(width) * es);
  }
}

// Rows [j0, j1) of G (blocks of 4, then single rows), 16 columns a tile, the last partial;
// `next_bytes` from `next` fetched ahead, spread over the tiles.
MOE_AVX2 void avx2_grad_rows(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg,
                             int dtype, int64_t j0, int64_t j1, int64_t K, const char *next, int64_t next_bytes) {
  const int64_t per_row = (K + 15) / 16, tiles = per_row * ((j1 - j0) / 4 + (j1 - j0) % 4);
  Ahead ahead{next, tiles > 0 ? ((next_bytes + 63) / 64 + tiles - 1) / tiles : 0};
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4)
    for (int64_t k = 0; k < K; k += 16, ahead.next += ahead.lines * 64)
      avx2_grad_tile<4>(A, lda, B, ldb, M, G, ldg, dtype, j, k, std::min<int64_t>(16, K - k), ahead);
  for (; j < j1; ++j)
    for (int64_t k = 0; k < K; k += 16, ahead.next += ahead.lines * 64)
      avx2_grad_tile<1>(A, lda, B, ldb, M, G, ldg, dtype, j, k, std::min<int64_t>(16, K - k), ahead);
}

// The lanes of a tile's last vector of 16 columns, `width` columns in all.
inline __mmask16 last_lanes(int64_t width) {
  return width % 16 == 0 ? 0xFFFF : static_cast<__mmask16>((1u << (width % 16)) - 1u);
}

// ---- G += A^T B: gradient rows R at a time, 16-column vectors V at a time --------------------------
// Per input row m, V pieces of B loaded once serve R gradient rows, each A value broadcast into V
// multiply-adds. The sums are added to G here for float32; 16-bit G goes through widen/narrow (the
// library's rounding, so the same bits as the portable loop). The last vector may be partial
// (mask `last`). Each call fetches `ahead.lines` cache lines from `ahead.next` on into L2.
template <int R, int V>
MOE_AVX512 void grad_tile(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg,
                          int dtype, int64_t j, int64_t k0, int64_t width, Ahead ahead) {
  prefetch_next(ahead, 0);
  const __mmask16 last = last_lanes(width);
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    const float *b = B + m * ldb + k0;
    __m512 bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, b + v * 16) : _mm512_loadu_ps(b + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(A[m * lda + j + r]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  if (dtype == MOE_DTYPE_F32) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        float *g = static_cast<float *>(G) + (j + r) * ldg + k0 + v * 16;
        const __mmask16 mask = v == V - 1 ? last : 0xFFFF;
        _mm512_mask_storeu_ps(g, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, g), acc[r][v]));
      }
    return;
  }
  // The sums leave the registers by constant indices first: a loop over r around the calls below
  // would index acc at run time and put it on the stack for the whole kernel (a quarter the speed).
  float sums[R][V * 16], buf[V * 16];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(sums[r] + v * 16, acc[r][v]);
  for (int r = 0; r < R; ++r) {
    void *g = elem_at(G, dtype, (j + r) * ldg + k0);
    widen(buf, g, dtype, width);
    for (int64_t i = 0; i < width; ++i) buf[i] += sums[r][i];
    narrow(g, dtype, buf, width);
  }
}

// v rounded to bfloat16 (to nearest even; NaNs kept quiet), 16 lanes: core/half.h's bits.
MOE_AVX512 inline __m256i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

// bfloat16 on VDPBF16PS, pairs of input rows (2p, 2p + 1): Bp[p][k] holds B's two rows at k
// (the lower half row 2p), Ap[j][p] A's two rows at j; a pair past M is 0. P pairs. The sums are
// added to G (bfloat16) in float32 and rounded once, in registers.
template <int R, int V>
MOE_AVX512_BF16 void grad_tile_dot(const uint32_t *Ap, const uint32_t *Bp, int64_t P, int64_t K, uint16_t *G,
                                   int64_t ldg, int64_t j, int64_t k0, int64_t width, Ahead ahead) {
  prefetch_next(ahead, 0);
  const __mmask16 last = last_lanes(width);
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const uint32_t *b = Bp + p * K + k0;
    __m512i bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_epi32(v == V - 1 ? last : 0xFFFF, b + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(Ap[r * P + p]));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)bv[v], (__m512bh)av);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      uint16_t *g = G + (j + r) * ldg + k0 + v * 16;
      const __mmask16 mask = v == V - 1 ? last : 0xFFFF;
      const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, g));
      const __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      _mm256_mask_storeu_epi16(g, mask, round_bf16(_mm512_add_ps(old, acc[r][v])));
    }
}

// The tiles of gradient rows [j0, j1) (whole blocks of 4, then single rows) over all K columns:
// 64, 32 and 16 columns, the last partial; `next_bytes` from `next` fetched ahead, spread over the
// tiles. tile(R, V, j, k, width, ahead) computes one, R and V as integral constants.
template <class Tile>
MOE_AVX512 inline void grad_tiles(int64_t j0, int64_t j1, int64_t K, const char *next, int64_t next_bytes, Tile &&tile) {
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  const int64_t per_row = K / 64 + (K % 64) / 32 + (K % 32 + 15) / 16;
  const int64_t tiles = per_row * ((j1 - j0) / 4 + (j1 - j0) % 4);
  Ahead ahead{next, tiles > 0 ? ((next_bytes + 63) / 64 + tiles - 1) / tiles : 0};
  auto row_tiles = [&](auto block, int64_t j) {
    int64_t k = 0;
    for (; k + 64 <= K; k += 64, ahead.next += ahead.lines * 64) tile(block, Four{}, j, k, 64, ahead);
    for (; k + 32 <= K; k += 32, ahead.next += ahead.lines * 64) tile(block, Two{}, j, k, 32, ahead);
    for (; k < K; k += 16, ahead.next += ahead.lines * 64) tile(block, One{}, j, k, std::min<int64_t>(16, K - k), ahead);
  };
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) row_tiles(Four{}, j);
  for (; j < j1; ++j) row_tiles(One{}, j);
}

// Rows [j0, j1) of few_rows_grad_bf16's gradient; Ap holds these rows' pairs (Ap[j - j0][p]).
void grad_rows_dot(const uint32_t *Ap, const uint32_t *Bp, int64_t P, uint16_t *G, int64_t ldg, int64_t j0,
                   int64_t j1, int64_t K, const char *next, int64_t next_bytes) {
  grad_tiles(j0, j1, K, next, next_bytes, [&](auto block, auto vectors, int64_t j, int64_t k, int64_t width, Ahead a) {
    grad_tile_dot<decltype(block)::value, decltype(vectors)::value>(Ap + (j - j0) * P, Bp, P, K, G, ldg, j, k, width, a);
  });
}

// Rows [j0, j1) of few_rows_grad's gradient.
void grad_rows(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg, int dtype,
               int64_t j0, int64_t j1, int64_t K, const char *next, int64_t next_bytes) {
  grad_tiles(j0, j1, K, next, next_bytes, [&](auto block, auto vectors, int64_t j, int64_t k, int64_t width, Ahead a) {
    grad_tile<decltype(block)::value, decltype(vectors)::value>(A, lda, B, ldb, M, G, ldg, dtype, j, k, width, a);
  });
}

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}
bool have_avx512_bf16() {
  static const bool yes = have_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}
// AVX2 with FMA and F16C (every CPU with AVX2 has F16C; checked all the same, through CPUID:
// clang's __builtin_cpu_supports does not know "f16c").
bool have_avx2() { return x8::supported() && __builtin_cpu_supports("fma"); }
#else
bool have_avx512() { return false; }
bool have_avx512_bf16() { return false; }
template <int D>
void xw_dispatch(const void *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *, int64_t,
                 bool, RowsAhead, int64_t) {}
void grad_rows(const float *, int64_t, const float *, int64_t, int64_t, void *, int64_t, int, int64_t, int64_t, int64_t,
               const char *, int64_t) {}
void grad_rows_dot(const uint32_t *, const uint32_t *, int64_t, uint16_t *, int64_t, int64_t, int64_t, int64_t,
                   const char *, int64_t) {}
template <int D>
void avx512_dispatch(const void *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *,
                     int64_t, const char *, int64_t, bool) {}
void pairs_dispatch(const uint16_t *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, float *, int64_t,
                    const char *, int64_t, bool) {}
constexpr int kAvx2Group = 3;
constexpr int kEvenOdd = -1;
constexpr int64_t kEvenOddRows = 3;
void avx2_even_odd(float *, const uint16_t *, int64_t) {}
template <int D>
void avx2_xw_dispatch(const void *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *,
                      int64_t, bool, RowsAhead, int64_t) {}
void avx2_grad_rows(const float *, int64_t, const float *, int64_t, int64_t, void *, int64_t, int, int64_t, int64_t,
                    int64_t, const char *, int64_t) {}
int64_t avx2_xw_tiles(int64_t, int64_t) { return 1; }
constexpr int64_t kStripRows = 0;
constexpr int64_t kStripCols = 16;
template <int D>
void avx2_xw_strips(const void *, int64_t, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, float *, int64_t,
                    bool) {}
template <int D, int DX = D>
void avx2_dispatch(const void *, int64_t, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, float *, int64_t,
                   const char *, int64_t, bool) {}
bool have_avx2() { return false; }
#endif

// ---- any CPU: float32 pieces, the same sums in 16 lanes as avx512_block, so both give the same bits
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

// Weight rows per chunk, the unit of work: at most kRowsPerChunk rows and chunk_bytes(), whole blocks.
// In columns, whole tiles of 12, 6 and 4 rows (few_rows_columns.cpp): multiples of 12, up to 60.
int64_t chunk_rows(int dtype, int64_t ldw, bool columns = false) {
  const int64_t row_bytes = ldw * static_cast<int64_t>(dtype_size(dtype)), block = columns ? 12 : kBlockRows;
  return std::clamp(chunk_bytes() / std::max<int64_t>(row_bytes, 1) / block * block, block,
                    kRowsPerChunk / block * block);
}

// Bytes to fetch ahead: n bytes from p on (none when n is 0).
struct Bytes {
  const void *p = nullptr;
  int64_t n = 0;
};

// Weight rows [begin, end); empty when begin >= end.
struct RowRange {
  int64_t begin = 0, end = 0;
};

Bytes bytes_of_rows(const void *W, int64_t ldw, int dtype, RowRange r) {
  if (r.begin >= r.end) return {};
  const int64_t bytes = ldw * static_cast<int64_t>(dtype_size(dtype));
  return {static_cast<const char *>(W) + r.begin * bytes, (r.end - r.begin) * bytes};
}

// A pass's input rows, copied where their row stride is a multiple of 4 KB and they are more than
// four. The kernel reads, at each step of k, the same offset of every input row and of four
// weight rows; at such strides all of them fall into one of L1's 64 sets, and more than its 8
// lines evict each other. Copied with a stride of 64 bytes more, the input rows spread over as
// many sets. (One 1024 x 2048 bfloat16 weight from cache against 16 rows, 2 cores of an AMD EPYC
// Zen 4: 238-250 -> 283-284 GFLOP/s; float32 2048 x 1024, 115-131 -> 142-157. The forward of 64
// tokens, d 1024, d_ff 2048, eight A/B runs: float32 0.94-1.04 of the time, median 0.97;
// bfloat16, whose W2 product alone has such strides, 0.94-1.02, median 0.98. Copying at a stride
// of 2 KB too, where the rows fall into two sets, made bfloat16 slower.) Up to kPadBytes, on
// the stack.
class PaddedRows {
 public:
  static constexpr int64_t kPadBytes = int64_t{64} << 10;
  // Rows [m0, m0 + m) of X (row stride ldx, K elements of dtype), copied where worth it.
  // even_odd: bfloat16 rows copied in float32 in avx2_step's even/odd order where they fit (the
  // last piece padded with zeros), at a stride of 16 elements more than that.
  PaddedRows(const void *X, int64_t ldx, int dtype, int64_t m0, int64_t m, int64_t K, bool even_odd = false) {
    const int64_t es = static_cast<int64_t>(dtype_size(dtype)), row = K * es, ld = row + 64;
    p_ = static_cast<const char *>(X) + m0 * ldx * es;
    ld_ = ldx;
    const int64_t padded = (K + 15) / 16 * 16;
    if (even_odd && dtype == MOE_DTYPE_BF16 && m * (padded + 16) * 4 <= kPadBytes) {
      for (int64_t i = 0; i < m; ++i)
        avx2_even_odd(reinterpret_cast<float *>(buf_) + i * (padded + 16),
                      reinterpret_cast<const uint16_t *>(static_cast<const char *>(p_) + i * ldx * es), K);
      p_ = buf_;
      ld_ = padded + 16;
      even_odd_ = true;
      return;
    }
    if (few_rows_input_ld(ldx, dtype, m) == ldx || m * ld > kPadBytes) return;
    for (int64_t i = 0; i < m; ++i) std::memcpy(buf_ + i * ld, static_cast<const char *>(p_) + i * ldx * es, row);
    p_ = buf_;
    ld_ = ld / es;
  }
  const void *rows() const { return p_; }
  int64_t ld() const { return ld_; }  // in elements: float32 ones where even_odd()
  bool even_odd() const { return even_odd_; }

 private:
  alignas(64) char buf_[kPadBytes];
  const void *p_;
  int64_t ld_;
  bool even_odd_ = false;
};

// C's columns r (weight rows r) on the calling thread, the bytes `ahead` (its next chunk) fetched
// into L2 meanwhile.
void xwt_rows(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, RowRange r, int64_t K,
              float *C, int64_t ldc, Bytes ahead, FewRowsIsa isa) {
  const char *next = static_cast<const char *>(ahead.p);
  if (few_rows_paired(dtype, isa)) {  // X in pairs: kPairGroup pairs a pass, split evenly as below
    const int64_t pairs = (M + 1) / 2, passes = (pairs + kPairGroup - 1) / kPairGroup;
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t g0 = pairs * p / passes, g1 = pairs * (p + 1) / passes;
      const int64_t share = (ahead.n + passes - 1) / passes;
      pairs_dispatch(static_cast<const uint16_t *>(X) + g0 * pair_stride(K), std::min(M, 2 * g1) - 2 * g0, W, ldw,
                     r.begin, r.end, K, C + 2 * g0 * ldc, ldc, next + p * share, share, p == 0);
    }
    return;
  }
  const bool avx512 = isa == FewRowsIsa::avx512, avx2 = isa == FewRowsIsa::avx2;
  // kGroup input rows at a time (kAvx2Group on AVX2: the accumulators a pass keeps in registers);
  // the chunk of weight rows stays in cache between passes, so memory sees it once. The rows
  // split evenly over the passes (16 as 6 + 5 + 5, not 6 + 6 + 4): a pass of few rows does few
  // products per weight load. The passes share the fetching ahead.
  const int64_t group = avx2 ? kAvx2Group : kGroup, passes = (M + group - 1) / group;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t m0 = M * p / passes, m = M * (p + 1) / passes - m0;
    const PaddedRows rows(X, ldx, dtype, m0, m, K, avx2 && m >= kEvenOddRows);
    const void *Xg = rows.rows();
    const int64_t ldg = rows.ld();
    float *Cg = C + m0 * ldc;
    const int64_t share = (ahead.n + passes - 1) / passes;
    const char *pf = next + p * share;
    if (avx2) {
      if (rows.even_odd())
        avx2_dispatch<MOE_DTYPE_BF16, kEvenOdd>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
      else if (dtype == MOE_DTYPE_BF16)
        avx2_dispatch<MOE_DTYPE_BF16>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
      else if (dtype == MOE_DTYPE_F16)
        avx2_dispatch<MOE_DTYPE_F16>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
      else
        avx2_dispatch<MOE_DTYPE_F32>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
    } else if (!avx512) {
      generic_rows(Xg, ldg, W, ldw, dtype, m, r.begin, r.end, K, Cg, ldc);
    } else if (dtype == MOE_DTYPE_BF16) {
      avx512_dispatch<MOE_DTYPE_BF16>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
    } else if (dtype == MOE_DTYPE_F16) {
      avx512_dispatch<MOE_DTYPE_F16>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
    } else {
      avx512_dispatch<MOE_DTYPE_F32>(Xg, ldg, W, ldw, m, r.begin, r.end, K, Cg, ldc, pf, share, p == 0);
    }
  }
}

// Chunks [0, chunks) handed to the threads of a parallel region first come first served: a thread
// slowed by others on its core takes fewer (on a shared machine a static split left one thread
// waiting at the end of every product: forward of 64 tokens, bfloat16, 2 cores of an AMD EPYC
// Zen 4, 6.1 -> 5.65 ms). Each thread claims its next chunk before it computes the one in hand,
// so that it can fetch that one ahead: f(c, after) computes chunk c, after being the thread's
// next (none when >= chunks).
//
// A claim takes a run of up to kRunChunks consecutive chunks, fewer as the chunks left run out
// (at most a quarter of them per thread, as OpenMP's guided schedule), so that the threads still
// finish together. Within a run the bytes a thread fetches ahead follow the ones in hand, and
// memory sees two long streams rather than the threads' chunks interleaved. (A plain read of 96
// MB in 128 KB chunks claimed one at a time ran at 0.87-0.93 of one over each thread's half, in 1
// MB chunks at 0.98-1.07, while memory ran at 53-61 GB/s, 2 cores of an AMD EPYC Zen 4. There,
// same process, alternated: the kernel against 2 to 6 bfloat16 rows 0.92-0.98 of the time; the
// forward of 8 tokens, d 1024, d_ff 2048, bfloat16 0.94-0.98, float32 0.96; of 64 tokens,
// bfloat16, 0.91. At ~33 GB/s both within 0.98-1.02, and the training steps of 8 and 64 tokens
// within 0.97-1.01.)
constexpr int64_t kRunChunks = 8;

template <class F>
void claim_chunks(std::atomic<int64_t> &counter, int64_t chunks, F &&f) {
  const int64_t threads = omp_get_num_threads();
  int64_t end = 0;
  const auto claim = [&] {
    const int64_t left = chunks - counter.load(std::memory_order_relaxed);
    const int64_t run = std::clamp(left / (4 * threads), int64_t{1}, kRunChunks);
    const int64_t c = counter.fetch_add(run, std::memory_order_relaxed);
    end = std::min(c + run, chunks);
    return c;
  };
  int64_t c = claim();
  while (c < chunks) {
    const int64_t after = c + 1 < end ? c + 1 : claim();
    f(c, after);
    c = after;
  }
}

// The chunks of a batch's products in order, walked forward by one thread: the chunks a thread
// claims only increase, so each thread passes over the list of products once.
class Cursor {
 public:
  Cursor(const XwtProduct *p, int64_t count, int dtype) : p_(p), count_(count), dtype_(dtype) {}
  // The product holding chunk c (>= every c asked before) and its weight rows; null past the last.
  const XwtProduct *find(int64_t c, RowRange *rows) {
    for (; i_ < count_; first_ += chunks_of(i_), ++i_) {
      const int64_t n = chunks_of(i_);
      if (c < first_ + n) {
        const int64_t r = chunk_rows(dtype_, p_[i_].ldw, p_[i_].columns), begin = (c - first_) * r;
        *rows = {begin, std::min(p_[i_].N, begin + r)};
        return &p_[i_];
      }
    }
    return nullptr;
  }
  int64_t chunks_of(int64_t i) const {
    const XwtProduct &q = p_[i];
    if (q.M <= 0 || q.N <= 0) return 0;
    const int64_t r = chunk_rows(dtype_, q.ldw, q.columns);
    return (q.N + r - 1) / r;
  }

 private:
  const XwtProduct *p_;
  int64_t count_;
  int dtype_;
  int64_t i_ = 0, first_ = 0;  // product i_ starts at chunk first_
};

// ---- any CPU: C (+)= X W in the AVX-512 tiles' order (k in order, one fused multiply-add each)
void generic_xw(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t n0, int64_t n1,
                int64_t K, float *C, int64_t ldc, bool accumulate) {
  constexpr int64_t kPiece = 256;
  float acc[kPiece], wf[kPiece];
  for (int64_t n = n0; n < n1; n += kPiece) {
    const int64_t len = std::min(kPiece, n1 - n);
    for (int64_t m = 0; m < M; ++m) {
      std::fill(acc, acc + len, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        widen(wf, elem_at(W, dtype, k * ldw + n), dtype, len);
        float x;
        widen(&x, elem_at(X, dtype, m * ldx + k), dtype, 1);
        for (int64_t j = 0; j < len; ++j) acc[j] = std::fma(x, wf[j], acc[j]);
      }
      float *c = C + m * ldc + n;
      for (int64_t j = 0; j < len; ++j) c[j] = accumulate ? c[j] + acc[j] : acc[j];
    }
  }
}

// Columns per chunk of X W: at most chunk_bytes() of the K rows' pieces, whole 16-column vectors
// (at least one), at most 256 columns.
int64_t xw_chunk_cols(int dtype, int64_t K) {
  const int64_t row_bytes = 16 * static_cast<int64_t>(dtype_size(dtype));  // one vector's piece of a row
  return std::clamp(chunk_bytes() / std::max<int64_t>(K * row_bytes, 1), int64_t{1}, int64_t{16}) * 16;
}

// Columns r of C on the calling thread, MR rows a pass (evenly split, as xwt_rows), the columns
// `next` (the thread's next chunk) fetched into L2 meanwhile, a row of them at a time.
void xw_cols(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, RowRange r, int64_t K,
             float *C, int64_t ldc, bool accumulate, RowRange next, FewRowsIsa isa) {
  const int64_t passes = (M + kGroup - 1) / kGroup;
  const bool avx2 = isa == FewRowsIsa::avx2;
  if (isa == FewRowsIsa::portable) {
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t m0 = M * p / passes, m = M * (p + 1) / passes - m0;
      generic_xw(elem_at(X, dtype, m0 * ldx), ldx, W, ldw, dtype, m, r.begin, r.end, K, C + m0 * ldc, ldc, accumulate);
    }
    return;
  }
  if (avx2 && passes > 1 && M <= kStripRows) {
    if (dtype == MOE_DTYPE_BF16)
      avx2_xw_strips<MOE_DTYPE_BF16>(X, ldx, M, W, ldw, r.begin, r.end, K, C, ldc, accumulate);
    else if (dtype == MOE_DTYPE_F16)
      avx2_xw_strips<MOE_DTYPE_F16>(X, ldx, M, W, ldw, r.begin, r.end, K, C, ldc, accumulate);
    else
      avx2_xw_strips<MOE_DTYPE_F32>(X, ldx, M, W, ldw, r.begin, r.end, K, C, ldc, accumulate);
    return;
  }
  const int64_t es = static_cast<int64_t>(dtype_size(dtype)), width = r.end - r.begin;
  const int64_t tiles =
      avx2 ? avx2_xw_tiles(width, M / passes) : width / 64 + (width % 64) / 32 + (width % 32 + 15) / 16;
  RowsAhead ahead;
  if (next.begin < next.end) {
    ahead.next = static_cast<const char *>(W) + next.begin * es;
    ahead.ld = ldw * es;
    ahead.lines = ((next.end - next.begin) * es + 63) / 64;
    ahead.every = passes * tiles;
  }
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t m0 = M * p / passes, m = M * (p + 1) / passes - m0;
    const void *Xg = elem_at(X, dtype, m0 * ldx);
    float *Cg = C + m0 * ldc;
    ahead.phase = 0;
    const int64_t tile0 = p * tiles;
    if (avx2 && dtype == MOE_DTYPE_BF16)
      avx2_xw_dispatch<MOE_DTYPE_BF16>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else if (avx2 && dtype == MOE_DTYPE_F16)
      avx2_xw_dispatch<MOE_DTYPE_F16>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else if (avx2)
      avx2_xw_dispatch<MOE_DTYPE_F32>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else if (dtype == MOE_DTYPE_BF16 && have_avx512_bf16())
      xw_dispatch<kBf16Dot>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else if (dtype == MOE_DTYPE_BF16)
      xw_dispatch<MOE_DTYPE_BF16>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else if (dtype == MOE_DTYPE_F16)
      xw_dispatch<MOE_DTYPE_F16>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
    else
      xw_dispatch<MOE_DTYPE_F32>(Xg, ldx, W, ldw, m, r.begin, r.end, K, Cg, ldc, accumulate, ahead, tile0);
  }
}

// ---- any CPU: G += A^T B in grad_tile's order
void generic_grad(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg, int dtype,
                  int64_t j0, int64_t j1, int64_t K) {
  constexpr int64_t kPiece = 256;
  float acc[kPiece], buf[kPiece];
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t k = 0; k < K; k += kPiece) {
      const int64_t len = std::min(kPiece, K - k);
      std::fill(acc, acc + len, 0.0f);
      for (int64_t m = 0; m < M; ++m) {
        const float a = A[m * lda + j], *b = B + m * ldb + k;
        for (int64_t i = 0; i < len; ++i) acc[i] = std::fma(a, b[i], acc[i]);
      }
      void *g = elem_at(G, dtype, j * ldg + k);
      widen(buf, g, dtype, len);
      for (int64_t i = 0; i < len; ++i) buf[i] += acc[i];
      narrow(g, dtype, buf, len);
    }
}

// Refuses a level the CPU lacks, before any work.
void check_isa(FewRowsIsa isa) {
  if (isa > few_rows_best_isa())
    throw std::invalid_argument("few_rows: instruction set " + std::to_string(static_cast<int>(isa)) +
                                " asked for, this CPU has up to " +
                                std::to_string(static_cast<int>(few_rows_best_isa())));
}

}  // namespace

FewRowsIsa few_rows_best_isa() {
  static const FewRowsIsa best = have_avx512() ? FewRowsIsa::avx512
                                 : have_avx2() ? FewRowsIsa::avx2
                                               : FewRowsIsa::portable;
  return best;
}

int64_t few_rows_input_ld(int64_t ld, int dtype, int64_t M) {
  const int64_t es = static_cast<int64_t>(dtype_size(dtype));
  // Four input rows and four weight rows fit the 8 ways of a set. (Measured on the AVX-512
  // kernels only: without, rows are read in pieces of their own.)
  return have_avx512() && M > 8 - kBlockRows && (ld * es) % 4096 == 0 ? ld + 64 / es : ld;
}

XwtBatch::XwtBatch(const XwtProduct *products, int64_t count, int dtype, FewRowsIsa isa)
    : p_(products), count_(count), dtype_(dtype), isa_(isa) {
  check_isa(isa);
  const Cursor c(products, count, dtype);
  for (int64_t i = 0; i < count; ++i) {
    if (!products[i].columns && products[i].paired != few_rows_paired(dtype, isa) && c.chunks_of(i) > 0)
      throw std::logic_error("XwtBatch: a product's X is not in the layout its dtype is read in (few_rows_paired)");
    if (products[i].columns && products[i].M2 > 0 && few_rows_paired(dtype, isa) && c.chunks_of(i) > 0)
      throw std::logic_error("XwtBatch: rows past the columns (M2) where the dtype is read in pairs");
    chunks_ += c.chunks_of(i);
  }
}

void XwtBatch::drain() {
  Cursor cursor(p_, count_, dtype_);
  claim_chunks(next_, chunks_, [&](int64_t c, int64_t after) {
    RowRange r, rn;
    const XwtProduct *p = cursor.find(c, &r), *q = cursor.find(after, &rn);
    const Bytes next = q ? bytes_of_rows(q->W, q->ldw, dtype_, rn) : Bytes{};
    if (p->columns) {
      columns_rows(static_cast<const float *>(p->X), p->ldx, p->M, p->W, p->ldw, dtype_, r.begin, r.end, p->K, p->C,
                   p->ldc, static_cast<const char *>(next.p), next.n, isa_ != FewRowsIsa::portable);
      if (p->M2 > 0)
        xwt_rows(p->X2, p->ldx2, p->W, p->ldw, dtype_, p->M2, r, p->K, p->C + p->M * p->ldc, p->ldc, Bytes{}, isa_);
    } else
      xwt_rows(p->X, p->ldx, p->W, p->ldw, dtype_, p->M, r, p->K, p->C, p->ldc, next, isa_);
  });
}

bool few_rows_paired(int dtype, FewRowsIsa isa) {
  return dtype == MOE_DTYPE_BF16 && isa == FewRowsIsa::avx512 && have_avx512_bf16();
}

int64_t few_rows_pairs_size(int64_t M, int64_t K) { return (M + 1) / 2 * pair_stride(K); }

void few_rows_pair_row(const void *src, int64_t K, int64_t M, int64_t i, void *pairs) {
  const int64_t steps = (K + kPairStep - 1) / kPairStep;
  const uint16_t *from = static_cast<const uint16_t *>(src);
  uint16_t *to = static_cast<uint16_t *>(pairs) + i / 2 * pair_stride(K) + i % 2 * kPairStep;
  const bool pad = i == M - 1 && M % 2 == 1;  // the last row of an odd M pairs with zeros
  for (int64_t s = 0; s < steps; ++s, to += 2 * kPairStep) {
    const int64_t k = s * kPairStep, n = std::min(kPairStep, K - k);
    std::memcpy(to, from + k, static_cast<size_t>(n) * sizeof(uint16_t));
    std::fill(to + n, to + kPairStep, uint16_t{0});
    if (pad) std::fill(to + kPairStep, to + 2 * kPairStep, uint16_t{0});
  }
}

int64_t few_rows_columns_ld(int64_t M) { return (M + 7) / 8 * 8; }

int64_t few_rows_columns_size(int64_t M, int64_t K) { return K * few_rows_columns_ld(M); }

void few_rows_column(const void *src, int dtype, int64_t K, int64_t M, int64_t i, float *columns) {
  const int64_t ld = few_rows_columns_ld(M);
  constexpr int64_t kPiece = 256;
  float buf[kPiece];
  for (int64_t k0 = 0; k0 < K; k0 += kPiece) {
    const int64_t len = std::min(kPiece, K - k0);
    widen(buf, elem_at(src, dtype, k0), dtype, len);
    for (int64_t k = 0; k < len; ++k) columns[(k0 + k) * ld + i] = buf[k];
  }
  if (i == M - 1)
    for (int64_t k = 0; k < K; ++k) std::fill(columns + k * ld + M, columns + (k + 1) * ld, 0.0f);
}

void few_rows_xwt(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t N, int64_t K,
                  float *C, int64_t ldc, FewRowsIsa isa) {
  check_isa(isa);
  std::vector<uint16_t> pairs;
  if (few_rows_paired(dtype, isa) && M > 0) {
    pairs.resize(static_cast<size_t>(few_rows_pairs_size(M, K)));
    for (int64_t i = 0; i < M; ++i) few_rows_pair_row(elem_at(X, dtype, i * ldx), K, M, i, pairs.data());
  }
  const XwtProduct p{pairs.empty() ? X : pairs.data(), ldx, W, ldw, M, N, K, C, ldc, !pairs.empty()};
  XwtBatch batch(&p, 1, dtype, isa);
#pragma omp parallel if (batch.chunks() > 1 && N * K >= (int64_t{1} << 16))
  batch.drain();
}

void few_rows_xw(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t N, int64_t K,
                 float *C, int64_t ldc, bool accumulate, FewRowsIsa isa) {
  check_isa(isa);
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // empty sums
    for (int64_t m = 0; m < M; ++m)
      if (!accumulate) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  // (more than one pass on AVX2: avx2_xw_strips' columns)
  const bool strips = isa == FewRowsIsa::avx2 && M > kGroup && M <= kStripRows;
  const int64_t cols = strips ? kStripCols : xw_chunk_cols(dtype, K), chunks = (N + cols - 1) / cols;
  std::atomic<int64_t> claimed{0};
  auto range = [&](int64_t c) { return c < chunks ? RowRange{c * cols, std::min(N, (c + 1) * cols)} : RowRange{}; };
#pragma omp parallel if (chunks > 1 && N * K >= (int64_t{1} << 16))
  claim_chunks(claimed, chunks, [&](int64_t c, int64_t after) {
    xw_cols(X, ldx, W, ldw, dtype, M, range(c), K, C, ldc, accumulate, range(after), isa);
  });
}

void few_rows_grad(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg, int dtype,
                   int64_t N, int64_t K, FewRowsIsa isa) {
  const GradProduct p{A, lda, B, ldb, M, G, ldg, N, K};
  few_rows_grads(&p, 1, dtype, isa);
}

void few_rows_grads(const GradProduct *products, int64_t count, int dtype, FewRowsIsa isa) {
  check_isa(isa);
  auto chunks_of = [&](const GradProduct &q) {
    if (q.M <= 0 || q.N <= 0 || q.K <= 0) return int64_t{0};
    const int64_t rows = chunk_rows(dtype, q.ldg);
    return (q.N + rows - 1) / rows;
  };
  // Chunk c of the stream: the gradient holding it and its rows (none past the last chunk).
  struct Piece {
    const GradProduct *q = nullptr;
    RowRange r;
  };
  auto piece = [&](int64_t c) {
    for (int64_t i = 0; i < count; ++i) {
      const GradProduct &q = products[i];
      const int64_t n = chunks_of(q), rows = chunk_rows(dtype, q.ldg);
      if (c < n) return Piece{&q, RowRange{c * rows, std::min(q.N, (c + 1) * rows)}};
      c -= n;
    }
    return Piece{};
  };
  int64_t chunks = 0, work = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = chunks_of(products[i]);
    chunks += n;
    work += n > 0 ? products[i].N * products[i].K : 0;
  }
  const bool avx512 = isa == FewRowsIsa::avx512, avx2 = isa == FewRowsIsa::avx2;
  std::atomic<int64_t> claimed{0};
#pragma omp parallel if (chunks > 1 && work >= (int64_t{1} << 16))
  claim_chunks(claimed, chunks, [&](int64_t c, int64_t after) {
    const Piece now = piece(c), next = piece(after);
    const GradProduct &q = *now.q;
    const Bytes ahead = next.q ? bytes_of_rows(next.q->G, next.q->ldg, dtype, next.r) : Bytes{};
    if (avx512)
      grad_rows(q.A, q.lda, q.B, q.ldb, q.M, q.G, q.ldg, dtype, now.r.begin, now.r.end, q.K,
                static_cast<const char *>(ahead.p), ahead.n);
    else if (avx2)
      avx2_grad_rows(q.A, q.lda, q.B, q.ldb, q.M, q.G, q.ldg, dtype, now.r.begin, now.r.end, q.K,
                     static_cast<const char *>(ahead.p), ahead.n);
    else
      generic_grad(q.A, q.lda, q.B, q.ldb, q.M, q.G, q.ldg, dtype, now.r.begin, now.r.end, q.K);
  });
}

int64_t few_rows_grad_bf16_scratch(int64_t M, int64_t N, int64_t K) { return (M + 1) / 2 * (N + K); }

void few_rows_grad_bf16(const void *A, int64_t lda, const void *B, int64_t ldb, int64_t M, void *G, int64_t ldg,
                        int64_t N, int64_t K, uint32_t *scratch) {
  if (!have_avx512_bf16()) throw std::logic_error("few_rows_grad_bf16 needs AVX512-BF16");
  if (M <= 0 || N <= 0 || K <= 0) return;
  const int64_t P = (M + 1) / 2, rows = chunk_rows(MOE_DTYPE_BF16, ldg), chunks = (N + rows - 1) / rows;
  uint32_t *Bp = scratch, *Ap = scratch + P * K;
  const uint16_t *a = static_cast<const uint16_t *>(A), *b = static_cast<const uint16_t *>(B);
  auto pair = [](const uint16_t *lo, const uint16_t *hi) { return uint32_t{*lo} | (hi ? uint32_t{*hi} << 16 : 0u); };
  std::atomic<int64_t> claimed{0};
  auto range = [&](int64_t c) { return c < chunks ? RowRange{c * rows, std::min(N, (c + 1) * rows)} : RowRange{}; };
#pragma omp parallel if (chunks > 1 && N * K >= (int64_t{1} << 16))
  {
    // B's rows in pairs, shared by every chunk; each chunk pairs its own rows of A.
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const uint16_t *lo = b + 2 * p * ldb, *hi = 2 * p + 1 < M ? lo + ldb : nullptr;
      for (int64_t k = 0; k < K; ++k) Bp[p * K + k] = pair(lo + k, hi ? hi + k : nullptr);
    }
    claim_chunks(claimed, chunks, [&](int64_t c, int64_t after) {
      const RowRange r = range(c);
      for (int64_t j = r.begin; j < r.end; ++j)
        for (int64_t p = 0; p < P; ++p) {
          const uint16_t *lo = a + 2 * p * lda + j;
          Ap[j * P + p] = pair(lo, 2 * p + 1 < M ? lo + lda : nullptr);
        }
      const Bytes next = bytes_of_rows(G, ldg, MOE_DTYPE_BF16, range(after));
      grad_rows_dot(Ap + r.begin * P, Bp, P, static_cast<uint16_t *>(G), ldg, r.begin, r.end, K,
                    static_cast<const char *>(next.p), next.n);
    });
  }
}

}  // namespace moe::cpu
