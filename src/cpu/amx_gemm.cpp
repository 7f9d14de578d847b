// The forward's X W^T on AMX tiles (cpu/amx_gemm.h).
//
// A tile multiply (TDPBF16PS: a 16 x 16 float32 tile += 16 x 32 bfloat16 times 32 x 16) takes 16
// cycles and needs 2 KB of operands; with four accumulator tiles in a 2 x 2 block, 2 KB of new
// operands per 64 cycles. The 2 x 2 block runs at the multiply rate (3.5 TFLOP/s a core) only
// with both operands in L1, at 1.6-2.0 with one streamed from L2, and far below with an operand
// read from a strided matrix (each tile row a cache line; 32 rows of a 2 KB stride fall into two
// of L1's sets). So, for 2 MB of L2 per core:
//  - X is copied once per call into whole tiles (32 rows a block, K in steps of 32: two 1 KB
//    tiles), shared by the threads; rows past M as zeros;
//  - each thread takes a run of W's rows (C's columns) and, kPairs pairs of 16 at a time (256
//    columns), copies them into the tile layout of pairs of k (each 16 x 16 block of 32-bit pairs
//    transposed in registers): 0.5 MB for K 1024, read from L2 by every block of X's rows;
//  - for each block of 32 rows of X and each kChunk of K, the X tiles (16 KB) stay in L1 for the
//    kPairs column pairs; the partial sums go to a float32 buffer of 32 rows (row stride off a
//    multiple of 4 KB), which the last chunk's rows leave as C's (copied, or rounded by narrow()).
// Measured on 2 cores of a Xeon with AMX (AVX512-BF16, AMX-BF16; 2 MB L2 a core), bfloat16 out,
// against oneDNN 2.6's matmul with the weight as stored (what the layer ran before), alone: N 2048
// K 1024 at 512, 768, 1000, 1024, 2048 rows 1.06, 1.05, 1.07, 1.11, 1.15x faster; N 1024 K 2048
// 1.09, 1.17, 1.27, 1.23, 1.22x; at 128 and 256 rows 0.90-1.13x. In the layer's sequence (eight
// experts of 1024 rows: W1, W3, activation, W2) the W2 products 2.37-2.45 ms against 3.27-3.46,
// W1 and W3 2.35-2.5 against 2.5-2.8. Other blockings tried: 128 or 512 columns, K chunks of 512
// or all of K, software prefetch of the next tiles into L1 or L2: all slower.
#include "cpu/amx_gemm.h"

#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/convert.h"
#include "moe/moe.h"

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOE_AMX_BUILD 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
// GCC 12's AVX-512 headers warn at every inlined call (GCC bug 105593; see few_rows.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moe::cpu {
namespace {

constexpr int64_t kPairs = 8;     // pairs of 16-column tiles per block of W's rows
constexpr int64_t kChunk = 256;   // k per pass over a block's column pairs
constexpr int64_t kSumLd = kPairs * 32 * 4 + 64;  // bytes per row of the float32 partial sums

size_t round64(size_t n) { return (n + 63) / 64 * 64; }
size_t x_bytes(int64_t M, int64_t K) { return round64(static_cast<size_t>((M + 31) / 32 * 32 * K) * 2); }
size_t w_bytes(int64_t K) { return round64(static_cast<size_t>(kPairs * 32 * K) * 2); }
size_t sum_bytes() { return round64(32 * kSumLd); }

#ifdef MOE_AMX_BUILD
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// 16 rows of 32 bfloat16 (src, row stride ld elements), as 16 pairs each, into their transpose at
// dst (16 x 32 contiguous): row p of dst holds pair p of each of the 16 rows, the layout
// TDPBF16PS wants of its right operand.
__attribute__((target("avx512f"))) void transpose_pairs(const uint16_t *src, int64_t ld, uint16_t *dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld);
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

// X's rows [32 ib, 32 ib + 32) into xp: for each step of 32 in k, the two 16-row tiles.
void copy_x_block(const uint16_t *X, int64_t ldx, int64_t M, int64_t K, int64_t ib, uint16_t *xp) {
  const int64_t steps = K / 32;
  for (int64_t r = 0; r < 32; ++r) {
    const int64_t row = ib * 32 + r;
    uint16_t *dst = xp + (r / 16) * 512 + (r % 16) * 32;
    for (int64_t s = 0; s < steps; ++s, dst += 1024) {
      if (row < M)
        std::memcpy(dst, X + row * ldx + s * 32, 64);
      else
        std::memset(dst, 0, 64);
    }
  }
}

// The calling thread's column pairs [p0, p1) of C (pair p: columns 32p..32p+31).
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void xwt_columns(int64_t M, int64_t K, const uint16_t *xp,
                                                                       const uint16_t *W, int64_t ldw, int64_t p0,
                                                                       int64_t p1, void *C, int cdt, int64_t ldc,
                                                                       uint16_t *wp, unsigned char *sums) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.bytes_per_row[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int64_t steps = K / 32, blocks = (M + 31) / 32;
  for (int64_t b0 = p0; b0 < p1; b0 += kPairs) {
    const int64_t pairs = std::min(kPairs, p1 - b0);
    for (int64_t q = 0; q < pairs; ++q)
      for (int64_t half = 0; half < 2; ++half)
        for (int64_t s = 0; s < steps; ++s)
          transpose_pairs(W + ((b0 + q) * 32 + half * 16) * ldw + s * 32, ldw, wp + ((q * steps + s) * 2 + half) * 512);
    for (int64_t ib = 0; ib < blocks; ++ib) {
      const uint16_t *xa = xp + ib * steps * 1024;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
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
          const uint16_t *wb = wp + q * steps * 1024;
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
          }
          _tile_stored(0, c, kSumLd);
          _tile_stored(1, c + 64, kSumLd);
          _tile_stored(2, c + 16 * kSumLd, kSumLd);
          _tile_stored(3, c + 16 * kSumLd + 64, kSumLd);
        }
      }
      const int64_t rows = std::min<int64_t>(32, M - ib * 32), cols = pairs * 32;
      for (int64_t r = 0; r < rows; ++r) {
        const float *v = reinterpret_cast<const float *>(sums + r * kSumLd);
        const int64_t at = (ib * 32 + r) * ldc + b0 * 32;
        if (cdt == MOE_DTYPE_F32)
          std::memcpy(static_cast<float *>(C) + at, v, cols * sizeof(float));
        else
          narrow(static_cast<uint16_t *>(C) + at, cdt, v, cols);
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_xwt_available() {
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

bool amx_xwt_fits(int64_t N, int64_t K) { return N > 0 && K > 0 && N % 32 == 0 && K % 32 == 0; }

size_t amx_xwt_work_bytes(int64_t M, int64_t N, int64_t K, int threads) {
  return 64 + x_bytes(M, K) + static_cast<size_t>(std::max(threads, 1)) * (w_bytes(K) + sum_bytes());
}

void amx_xwt(int64_t M, int64_t N, int64_t K, const void *X, int64_t ldx, const void *W, int64_t ldw, void *C,
             int cdt, int64_t ldc, unsigned char *work) {
#ifdef MOE_AMX_BUILD
  if (M <= 0) return;
  unsigned char *base = work + (64 - reinterpret_cast<uintptr_t>(work) % 64) % 64;
  uint16_t *xp = reinterpret_cast<uint16_t *>(base);
  unsigned char *per_thread = base + x_bytes(M, K);
  const int64_t blocks = (M + 31) / 32, steps = K / 32, pairs = N / 32;
  const auto *x = static_cast<const uint16_t *>(X);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t ib = 0; ib < blocks; ++ib) copy_x_block(x, ldx, M, K, ib, xp + ib * steps * 1024);
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    unsigned char *mine = per_thread + static_cast<size_t>(t) * (w_bytes(K) + sum_bytes());
    const int64_t p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
    if (p1 > p0)
      xwt_columns(M, K, xp, static_cast<const uint16_t *>(W), ldw, p0, p1, C, cdt, ldc,
                  reinterpret_cast<uint16_t *>(mine), mine + w_bytes(K));
  }
#endif
}

}  // namespace moe::cpu
