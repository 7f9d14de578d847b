// The experts' bfloat16 products on AMX tiles (cpu/amx_gemm.h).
//
// A tile multiply (TDPBF16PS: a 16 x 16 float32 tile += 16 x 32 bfloat16 times 32 x 16) takes 16
// cycles and needs 2 KB of operands; with four accumulator tiles in a 2 x 2 block, 2 KB of new
// operands per 64 cycles. The 2 x 2 block runs at the multiply rate (3.5 TFLOP/s a core) only
// with both operands in L1, at 1.6-2.0 with one streamed from L2, and far below with an operand
// read from a strided matrix (each tile row a cache line; 32 rows of a 2 KB stride fall into two
// of L1's sets). So, for 2 MB of L2 per core:
//  - op(A) is copied once per call into whole tiles (32 rows a block, k in steps of 32: two 1 KB
//    tiles), shared by the threads; rows past M and k past K as zeros. Stored transposed (a
//    weight gradient's dH^T), its rows are paired (k, k + 1) and transposed as below;
//  - each thread takes a run of C's columns and, kPairs pairs of 16 at a time (256 columns),
//    copies them into the tile layout of pairs of k: a weight as stored, [N, K], by transposing
//    16 x 16 blocks of 32-bit pairs in registers; a matrix [K, N] by pairing rows k and k + 1,
//    a row's 256 columns at a time (its lines read once, in order).
//    0.5 MB for K 1024, read from L2 by every block of A's rows;
//  - for each block of 32 rows of A and each kChunk of K, the A tiles (16 KB) stay in L1 for the
//    kPairs column pairs; the partial sums go to a float32 buffer of 32 rows (row stride off a
//    multiple of 4 KB), which the last chunk's rows leave in C (stored, or added to what is
//    there, rounded once by narrow()).
// Measured on 2 cores of a Xeon with AMX (AVX512-BF16, AMX-BF16; 2 MB L2 a core) against oneDNN
// 2.6's matmul on the same operands (what the layer ran before), alone: the forward's X W^T
// (bfloat16 out), N 2048 K 1024 at 512, 768, 1000, 1024, 2048 rows 1.06, 1.05, 1.07, 1.11, 1.15x
// its speed, N 1024 K 2048 1.09, 1.17, 1.27, 1.23, 1.22x, at 128 and 256 rows 0.90-1.13x; the
// backward's X W (B [K, N], N 2048 K 1024, bfloat16 out, 24 weights in turn) at 32, 128, 256,
// 512, 1024 rows 0.23-0.27, 0.48-0.49, 0.68-0.73, 1.16-1.20, 2.24-2.36 ms against oneDNN's
// 0.33-0.39, 0.61-0.62, 0.82-0.86, 1.51-1.54, 2.96-3.05; the weight gradients (A^T B added to
// bfloat16, rows as K) as below; where each starts to pay: gemm.cpp. In the layer's sequence
// (eight experts of 1024 rows: W1, W3, activation, W2) the W2 products 2.37-2.45 ms against
// 3.27-3.46, W1 and W3 2.35-2.5 against 2.5-2.8. Other blockings tried: 128 or 512 columns, K
// chunks of 512 or all of K, software prefetch of the next tiles into L1 or L2, or of the next
// columns of B [K, N]: all slower or no faster. What did pay: C's rows fetched ahead where they
// are added to. A weight gradient (N 1024, M 2048, bfloat16 added to, 16 of them in turn) at K
// (the expert's rows) 128, 256, 512, 1024: 0.69-1.04, 0.87-0.96, 1.38-1.42, 2.58-2.63 ms, against
// 1.19-1.31, 1.42-1.51, 1.96-1.99, 3.03-3.27 without and oneDNN's 0.83-0.88, 1.06-1.07, 1.66-1.71,
// 3.69-4.12 (where stored, not added to, fetching C ahead changed nothing). A W X^T form for fewer rows (the weight the left
// operand, its rows copied 32 at a time with no transposition, X paired once per call, the sums
// transposed into C's rows; the next weight rows fetched into L2): alone at 128 rows (N 2048, K
// 1024) 0.35-0.39 ms against oneDNN's W X^T 0.29-0.36, in the layer no faster at 512 tokens
// (forward 12.3 ms against 12.4, medians of five alternated runs): not kept. At 128 rows both
// forms stream one operand from L2 through 2 x 2 blocks of tiles, which binds.
#include "cpu/amx_gemm.h"

#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/convert.h"
#include "cpu/gcc12_avx512.h"
#include "moe/moe.h"

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOE_AMX_BUILD 1
#endif

namespace moe::cpu {
namespace {

constexpr int64_t kPairs = 8;     // pairs of 16-column tiles per block of C's columns
constexpr int64_t kChunk = 256;   // k per pass over a block's column pairs
constexpr int64_t kSumLd = kPairs * 32 * 4 + 64;  // bytes per row of the float32 partial sums

size_t round64(size_t n) { return (n + 63) / 64 * 64; }
int64_t k_steps(int64_t K) { return (K + 31) / 32; }  // steps of 32 in k, the last padded with zeros
int64_t padded_k(int64_t K) { return k_steps(K) * 32; }
size_t left_bytes(int64_t M, int64_t K) { return round64(static_cast<size_t>((M + 31) / 32 * 32 * padded_k(K)) * 2); }
size_t right_bytes(int64_t K) { return round64(static_cast<size_t>(kPairs * 32 * padded_k(K)) * 2); }
size_t sum_bytes() { return round64(32 * kSumLd); }

#ifdef MOE_AMX_BUILD
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

#define MOE_AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl")))

// Mask of the first n of 32 (or 16) lanes.
inline uint32_t first32(int64_t n) { return n >= 32 ? ~0u : n <= 0 ? 0u : (1u << n) - 1; }
inline uint16_t first16(int64_t n) { return static_cast<uint16_t>(first32(std::min<int64_t>(n, 16))); }

// 16 rows of 32 bfloat16 (src, row stride ld elements; lanes past `valid` read as zeros), as 16
// pairs each, into their transpose at dst (16 x 32 contiguous): row p of dst holds pair p of each
// of the 16 rows, the layout TDPBF16PS wants of its right operand.
MOE_AVX512_BW void transpose_pairs(const uint16_t *src, int64_t ld, int64_t valid, uint16_t *dst) {
  __m512i r[16], t[16];
  const __mmask32 m = first32(valid);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi16(m, src + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4g + j], 128-bit lane l: rows 4g..4g+3 at pair 4l + j.
  for (int g = 0; g < 4; ++g) {
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    // Lanes 0 and 2 (pairs j, 8 + j), then 1 and 3 (4 + j, 12 + j), of rows 0-7 and of rows 8-15.
    const __m512i lo02 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    const __m512i hi02 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i lo13 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
    const __m512i hi13 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_si512(dst + j * 32, _mm512_shuffle_i32x4(lo02, hi02, 0x88));
    _mm512_storeu_si512(dst + (4 + j) * 32, _mm512_shuffle_i32x4(lo13, hi13, 0x88));
    _mm512_storeu_si512(dst + (8 + j) * 32, _mm512_shuffle_i32x4(lo02, hi02, 0xDD));
    _mm512_storeu_si512(dst + (12 + j) * 32, _mm512_shuffle_i32x4(lo13, hi13, 0xDD));
  }
}

// 16 pairs (a[j], b[j]) as 32-bit lanes, lanes past `valid` zero; a null row reads as zeros.
MOE_AVX512_BW __m512i pair_rows(const uint16_t *a, const uint16_t *b, int64_t valid) {
  const __mmask16 m = first16(valid);
  const __m512i lo = a ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a)) : _mm512_setzero_si512();
  const __m512i hi = b ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b)) : _mm512_setzero_si512();
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// Rows [32 ib, 32 ib + 32) of op(A) into the left operand's tiles at ap: for each step of 32 in
// k, two tiles of 16 rows x 32 k; rows past M and k past K as zeros. A stored [M, K] is copied a
// row piece at a time; stored [K, M] (trans), its rows are paired (k, k + 1) for 16 columns and
// the 16 x 16 pairs transposed.
MOE_AVX512_BW void pack_left(const uint16_t *A, int64_t lda, bool trans, int64_t M, int64_t K, int64_t ib,
                             uint16_t *ap) {
  const int64_t steps = k_steps(K);
  if (!trans) {
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t row = ib * 32 + r;
      uint16_t *dst = ap + (r / 16) * 512 + (r % 16) * 32;
      for (int64_t s = 0; s < steps; ++s, dst += 1024) {
        const __mmask32 m = row < M ? first32(K - s * 32) : 0;
        _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi16(m, A + (row < M ? row * lda + s * 32 : 0)));
      }
    }
    return;
  }
  alignas(64) uint16_t paired[16 * 32];
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t i0 = ib * 32 + half * 16, cols = M - i0;
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t k = s * 32 + 2 * p;
        const uint16_t *a = k < K && cols > 0 ? A + k * lda + i0 : nullptr;
        const uint16_t *b = k + 1 < K && cols > 0 ? A + (k + 1) * lda + i0 : nullptr;
        _mm512_store_si512(paired + p * 32, pair_rows(a, b, cols));
      }
      transpose_pairs(paired, 32, 32, ap + (s * 2 + half) * 512);
    }
}

// Columns [32 q0, 32 q0 + 32 pairs) of op(B) into the right operand's tiles at bp: for each pair
// of 16-column tiles and each step of 32 in k, tiles of 16 pairs (k, k + 1) x 16 columns; k past K
// as zeros. B stored [N, K] (trans, a weight as stored): 16 x 16 pairs transposed; stored [K, N]:
// rows k and k + 1 read once each, 32 columns at a time, and interleaved into a row of each tile
// of the pair. (Read 16 columns at a time, a tile after the other, each row's lines were read
// twice, a row stride apart: X W at 128 rows (N 2048, K 1024) took 0.88-0.94 ms, not 0.48-0.49.)
MOE_AVX512_BW void pack_right(const uint16_t *B, int64_t ldb, bool trans, int64_t K, int64_t q0, int64_t pairs,
                              uint16_t *bp) {
  const int64_t steps = k_steps(K);
  if (trans) {
    for (int64_t q = 0; q < pairs; ++q)
      for (int64_t half = 0; half < 2; ++half)
        for (int64_t s = 0; s < steps; ++s)
          transpose_pairs(B + ((q0 + q) * 32 + half * 16) * ldb + s * 32, ldb, K - s * 32,
                          bp + ((q * steps + s) * 2 + half) * 512);
    return;
  }
  // Lane 2i of a tile row takes lane i of row k, lane 2i + 1 lane i of row k + 1 (32 + i).
  alignas(64) static const uint16_t first[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(first), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t k = s * 32 + 2 * p;
      const uint16_t *a = k < K ? B + k * ldb + q0 * 32 : nullptr;
      const uint16_t *b = k + 1 < K ? B + (k + 1) * ldb + q0 * 32 : nullptr;
      for (int64_t q = 0; q < pairs; ++q) {
        const __m512i x = a ? _mm512_loadu_si512(a + q * 32) : _mm512_setzero_si512();
        const __m512i y = b ? _mm512_loadu_si512(b + q * 32) : _mm512_setzero_si512();
        uint16_t *dst = bp + (q * steps + s) * 1024 + p * 32;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x, lo, y));
        _mm512_storeu_si512(dst + 512, _mm512_permutex2var_epi16(x, hi, y));
      }
    }
}

// Row r of the partial sums v (cols of them) into C's row at c: stored, or added to what is there
// (float32, or widened, added and rounded once).
void store_row(const float *v, int64_t cols, void *c, int cdt, bool accumulate) {
  if (cdt == MOE_DTYPE_F32) {
    float *d = static_cast<float *>(c);
    if (!accumulate) {
      std::memcpy(d, v, cols * sizeof(float));
      return;
    }
    for (int64_t j = 0; j < cols; ++j) d[j] += v[j];
    return;
  }
  if (!accumulate) {
    narrow(c, cdt, v, cols);
    return;
  }
  float sum[kPairs * 32];
  widen(sum, c, cdt, cols);
  for (int64_t j = 0; j < cols; ++j) sum[j] += v[j];
  narrow(c, cdt, sum, cols);
}

struct Job {
  int64_t M, K;
  const uint16_t *B;
  int64_t ldb;
  bool b_trans;
  void *C;
  int cdt;
  int64_t ldc;
  bool accumulate;
};

// The calling thread's column pairs [p0, p1) of C (pair p: columns 32p..32p+31), from the left
// operand's tiles at ap; bp and sums its own memory.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) void columns(const Job &j, const uint16_t *ap,
                                                                                     int64_t p0, int64_t p1,
                                                                                     uint16_t *bp,
                                                                                     unsigned char *sums) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.bytes_per_row[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int64_t steps = k_steps(j.K), kp = padded_k(j.K), blocks = (j.M + 31) / 32;
  const size_t es = j.cdt == MOE_DTYPE_F32 ? 4 : 2;
  for (int64_t b0 = p0; b0 < p1; b0 += kPairs) {
    const int64_t pairs = std::min(kPairs, p1 - b0);
    pack_right(j.B, j.ldb, j.b_trans, j.K, b0, pairs, bp);
    // Added to, C is read: the next block's 32 row pieces (512 bytes each for 256 bfloat16
    // columns, a row stride apart) are fetched into L2 a few lines per step of k while this block
    // computes. The hardware prefetchers leave such short runs to be read at memory latency in
    // store_row, which took most of a weight gradient of 128 rows (figures at the top).
    const int64_t c_lines = j.accumulate ? (pairs * 32 * static_cast<int64_t>(es) + 63) / 64 : 0;
    const int64_t per_step = (32 * c_lines + pairs * steps - 1) / (pairs * steps);
    const char *c_base = static_cast<const char *>(j.C) + b0 * 32 * es;
    for (int64_t ib = 0; ib < blocks; ++ib) {
      const uint16_t *xa = ap + ib * steps * 1024;
      const int64_t next_rows = c_lines ? std::min<int64_t>(32, j.M - (ib + 1) * 32) : 0;
      const char *next = next_rows > 0 ? c_base + (ib + 1) * 32 * j.ldc * es : nullptr;
      int64_t pf_row = 0, pf_line = 0;
      for (int64_t k0 = 0; k0 < kp; k0 += kChunk) {
        const int64_t k1 = std::min(kp, k0 + kChunk);
        for (int64_t q = 0; q < pairs; ++q) {
          unsigned char *c = sums + q * 128;
          if (k0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, c, kSumLd);
            _tile_loadd(1, c + 64, kSumLd);
            _tile_loadd(2, c + 16 * kSumLd, kSumLd);
            _tile_loadd(3, c + 16 * kSumLd + 64, kSumLd);
          }
          const uint16_t *wb = bp + q * steps * 1024;
          for (int64_t k = k0; k < k1; k += 32) {
            const uint16_t *a = xa + (k / 32) * 1024, *b = wb + (k / 32) * 1024;
            _tile_loadd(4, a, 64);
            _tile_loadd(6, b, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, a + 512, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            for (int64_t i = 0; next && i < per_step && pf_row < next_rows; ++i) {
              _mm_prefetch(next + pf_row * j.ldc * es + pf_line * 64, _MM_HINT_T1);
              if (++pf_line == c_lines) pf_line = 0, ++pf_row;
            }
          }
          _tile_stored(0, c, kSumLd);
          _tile_stored(1, c + 64, kSumLd);
          _tile_stored(2, c + 16 * kSumLd, kSumLd);
          _tile_stored(3, c + 16 * kSumLd + 64, kSumLd);
        }
      }
      const int64_t rows = std::min<int64_t>(32, j.M - ib * 32);
      for (int64_t r = 0; r < rows; ++r)
        store_row(reinterpret_cast<const float *>(sums + r * kSumLd), pairs * 32,
                  static_cast<unsigned char *>(j.C) + ((ib * 32 + r) * j.ldc + b0 * 32) * es, j.cdt, j.accumulate);
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_gemm_available() {
#ifdef MOE_AMX_BUILD
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    if (!amx_bf16 || !amx_tile || dnnl_get_effective_cpu_isa() != dnnl_cpu_isa_avx512_core_amx) return false;
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first tile load faults.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return yes;
#else
  return false;
#endif
}

bool amx_gemm_fits(int64_t N, int64_t K) { return N > 0 && K > 0 && N % 32 == 0; }

size_t amx_gemm_work_bytes(int64_t M, int64_t N, int64_t K, int threads) {
  return 64 + left_bytes(M, K) + static_cast<size_t>(std::max(threads, 1)) * (right_bytes(K) + sum_bytes());
}

void amx_gemm(int64_t M, int64_t N, int64_t K, const void *A, int64_t lda, bool a_trans, const void *B, int64_t ldb,
              bool b_trans, void *C, int cdt, int64_t ldc, bool accumulate, unsigned char *work) {
#ifdef MOE_AMX_BUILD
  if (M <= 0) return;
  unsigned char *base = work + (64 - reinterpret_cast<uintptr_t>(work) % 64) % 64;
  uint16_t *ap = reinterpret_cast<uint16_t *>(base);
  unsigned char *per_thread = base + left_bytes(M, K);
  const int64_t blocks = (M + 31) / 32, steps = k_steps(K), pairs = N / 32;
  const auto *a = static_cast<const uint16_t *>(A);
  const Job job{M, K, static_cast<const uint16_t *>(B), ldb, b_trans, C, cdt, ldc, accumulate};
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t ib = 0; ib < blocks; ++ib) pack_left(a, lda, a_trans, M, K, ib, ap + ib * steps * 1024);
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    unsigned char *mine = per_thread + static_cast<size_t>(t) * (right_bytes(K) + sum_bytes());
    const int64_t p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
    if (p1 > p0) columns(job, ap, p0, p1, reinterpret_cast<uint16_t *>(mine), mine + right_bytes(K));
  }
#endif
}

}  // namespace moe::cpu
