// Each expert's FFN over its rows: GEMM, activation (GLU or plain), GEMM; and the backward.
//
// The GEMMs run on oneDNN matmul primitives (cpu/gemm.h) over the weights in their public
// [out, in] layout, threaded by oneDNN; the elementwise passes are threaded here. Two ways to run
// a call, chosen once per call:
//  - direct: every operand in its storage dtype. float32 layers, and bfloat16 layers where the
//    CPU's bfloat16 kernels are the fast ones for this many rows (bf16_native_max_rows());
//  - widened: float32 GEMMs on float32 copies (float16 layers: oneDNN 2.6 has no float16 matmul on
//    the CPU; bfloat16 layers at many rows on CPUs whose bfloat16 dot product is no faster than
//    their float32 FMA). Weights are widened a panel of kPanel rows or columns at a time.
// Both follow the precision rule of moe.h: h and g are rounded to the layer's dtype, the
// activation a is computed from the rounded values and rounded, y is rounded; in backward dA, dh,
// dg are rounded, a weight gradient is rounded once when added, dx once.
//
// Every GEMM of a call is prepared before the first output is written (a dry run of the same
// code), so that a primitive oneDNN cannot create, or scratch that cannot be had, fails the call
// before it changes anything.
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/half.h"
#include "cpu/activation.h"
#include "cpu/amx_gemm.h"
#include "cpu/convert.h"
#include "cpu/cpu.h"
#include "cpu/few_rows.h"
#include "cpu/gemm.h"

namespace moe::cpu {

namespace {

constexpr int64_t kPanel = 512;  // weight rows (or columns) widened at a time
// Row stride of a widened column panel (kPanel columns of K rows, the right operand of X W). At
// 512 floats, 2 KB, oneDNN's AVX2 kernels for under ~300 rows (which read it in place, uncopied)
// lose half their speed to the rows' falling into the same cache sets: X [128, 1024] times a
// panel, 2 cores of an AMD EPYC Zen 3, 1.35 ms at a stride of 512 floats, 0.75 at 528; K 2048,
// 2.6 and 1.8 ms; 256 rows 2.2 and 1.5 ms.
constexpr int64_t kPanelLd = kPanel + 16;
constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kSmallWeights = 1 << 16;  // weight elements below which row counts share a GEMM

// Elementwise work split into contiguous chunks, one per thread, each a vectorised call.
template <class F>
void chunked(int64_t n, F &&f) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk) - c * kChunk);
}

bool glu(int kind) { return kind == MOE_ACT_SWIGLU || kind == MOE_ACT_GEGLU || kind == MOE_ACT_SWIGLU_CLAMPED; }

// The activation and its parameters (MOE_ACT_SWIGLU_CLAMPED's alpha and limit).
struct Act {
  int kind;
  float alpha, limit;
};
Act act_of(const moe_ffn_args *a) { return {a->activation, a->swiglu_alpha, a->swiglu_limit}; }

struct Rows {
  int64_t begin, n;  // output rows [begin, begin + n)
  int64_t in;        // first input row
};

Rows rows_of(const moe_ffn_args *a, int64_t e) {
  if (a->shared_input) return {e * a->offsets[1], a->offsets[1], 0};
  return {a->offsets[e], a->offsets[e + 1] - a->offsets[e], a->offsets[e]};
}

int64_t max_rows(const moe_ffn_args *a) {
  int64_t m = 0;
  for (int64_t e = 0; e < a->num_experts; ++e) m = std::max(m, rows_of(a, e).n);
  return m;
}

// One operand of a GEMM: storage of dtype, row stride ld, read transposed when trans.
struct Mat {
  const void *p;
  int dtype;
  int64_t ld;
  bool trans = false;
};

const void *at(const void *p, int dtype, int64_t i) { return elem_at(p, dtype, i); }
void *at(void *p, int dtype, int64_t i) { return elem_at(p, dtype, i); }

// dst[rows, cols] (row stride ld, elements of dt, each rounded once) = src[cols, rows]^T, float32.
// Each thread takes one run of src's rows (dst's columns, whole cache lines of dst). Split over
// dst's rows instead, every thread read all of src, half of it from the other core's cache, where
// the product had just written it: a bfloat16 forward of 512 tokens (d 1024, d_ff 2048, 8
// experts, top-2; 2 cores of a Xeon with AMX, one build, runs alternated) 18.0 -> 16.6 ms.
void transpose_rows(void *dst, int dt, int64_t ld, const float *src, int64_t rows, int64_t cols) {
  if (rows == 0) return;
#pragma omp parallel if (worth_threads(rows * cols))
  {
    const auto [j0, j1] = thread_run(cols);
    if (j1 > j0) transpose_narrow(at(dst, dt, j0), dt, ld, src + j0 * rows, rows, rows, j1 - j0);
  }
}

// Runs or, dry, only prepares the GEMMs of a call; the arena and scratch are sized in between.
class Exec {
 public:
  Exec(State &st, bool dry) : st_(st), dry_(dry) {}
  bool dry() const { return dry_; }
  // C[M,N] (+)= op(A) op(B); C of dtype cdt with row stride ldc. The expert's rows are M, or K
  // for a weight gradient (A transposed).
  void gemm(int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt, int64_t ldc, bool acc) {
    if (M == 0 || N == 0) return;
    // oneDNN 2.6's float32 kernels run row counts off a multiple of 16 at 0.75-0.95 of the rate
    // of the multiples around them (N 2048 K 1024, 2 cores of a Xeon with AMX: 1003, 1006, 1007,
    // 1027 rows at 222-250 GFLOP/s, multiples of 16 from 944 to 1104 at 265-298). Past
    // f32_sixteens_from rows the rest beyond the last multiple of 16, as W X^T (one more read of
    // the weight), costs less than that: forward of 4096 tokens (d 1024, d_ff 2048, 8 experts,
    // top-2; about 1024 rows each) 0.95 of the time, training step 0.96; at 256 and 512 rows
    // 1.04 and 1.01, at 768 1.00.
    const int64_t sixteens = small_rows().f32_sixteens_from;
    if (A.dtype == MOE_DTYPE_F32 && sixteens > 0 && M >= sixteens && M % 16 != 0 && !A.trans && B.trans && !acc &&
        K * N >= kSmallWeights) {
      const int64_t m = M / 16 * 16;
      gemm_as_given(m, N, K, A, B, C, cdt, ldc, acc);
      return gemm_rows_as_wxt(m, M - m, N, K, A, B, C, cdt, ldc);
    }
    // bfloat16 products of many of an expert's rows (M, or K for a weight gradient) on the tile
    // kernel where it takes them; the rest below only where it does not (no AMX, N off a
    // multiple of 32, few rows).
    const SmallRows &small = small_rows();
    const int64_t amx_from = A.trans ? small.amx_grad_from : B.trans ? small.amx_xwt_from : small.amx_xw_from;
    if (amx_from > 0 && (A.trans ? K : M) >= amx_from && A.dtype == MOE_DTYPE_BF16 && B.dtype == MOE_DTYPE_BF16 &&
        (cdt == MOE_DTYPE_BF16 || cdt == MOE_DTYPE_F32) && amx_gemm_fits(N, K) && amx_gemm_available())
      return gemm_amx(M, N, K, A, B, C, cdt, ldc, acc);
    const int64_t block = A.dtype == MOE_DTYPE_BF16 ? small.bf16_brgemm_rows : 0;
    if (block > 0 && !A.trans && K * N >= kSmallWeights)
      return gemm_in_blocks(M, N, K, A, B, C, cdt, ldc, acc, block, small.bf16_brgemm_most);
    if (block > 0 && A.trans && !B.trans && M * N >= kSmallWeights && K < block && K % 32 != 0)
      return gemm_padded_k(M, N, K, A, B, C, cdt, ldc, acc);
    gemm_as_given(M, N, K, A, B, C, cdt, ldc, acc);
  }

  // Bytes of the padded operands that gemm_in_blocks and gemm_padded_k copy through (sized by
  // the dry run).
  size_t pad_bytes() const { return pad_bytes_; }

 private:
  // oneDNN 2.6's AMX kernels (brgemm) choose their blocking from the row count, and some counts
  // run at a fifth of the speed of their neighbours: 106, 118, 122, 848, 944 (2 cores of a Xeon
  // with AMX, N 2048 K 1024, 0.31 TFLOP/s against 1.6-1.8 at 104, 120, 832). Counts that are
  // multiples of 16 up to 256 all run well, and so do most multiples of 64 (of 16 past 256 not:
  // 816, 928, 992, 1392; of 64, 320, 1088 and 1344 at 0.6-0.8 of their neighbours' rate in one
  // scan, 576 in some). So up to `block` rows go in blocks of at most `block` (a multiple
  // of 16); more in calls of multiples of 64, at most `most` rows each, and the rest (under 64).
  // Fewer calls copy the weight into oneDNN's tile layout fewer times: 1024 rows in one call
  // against four of 256, 0.91 of the time (N 2048 K 1024; N 1024 K 2048 0.97); in the layer,
  // bfloat16 forward of 2048 and 4096 tokens 0.90 and 0.89 of the time, training step of 1024
  // 0.95 (calls of up to 2048 rows: no better). The rest of a forward product (X W^T, nothing
  // to add to) runs as W X^T where wxt_bf16 allows, the weight read as stored: each such call
  // 0.13-0.34 ms against 0.19-0.39 for the call that copies the weight into the tile layout once
  // more for under 64 rows (N 2048 K 1024 and N 1024 K 2048); bfloat16 forward of 2048 and 4096
  // tokens 0.97 of the time. Any other last block short of a multiple of 16 runs padded, through
  // a copy.
  void gemm_in_blocks(int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt, int64_t ldc,
                      bool acc, int64_t block, int64_t most) {
    const int64_t blocks = (M + block - 1) / block;
    const int64_t each = (M + blocks - 1) / blocks, step = (each + 15) / 16 * 16;
    int64_t m = 0;
    for (int64_t m0 = 0; m0 < M; m0 += m) {
      const int64_t left = M - m0;
      if (M <= block)
        m = std::min(step, left);
      else
        m = left > most ? most : left >= 64 ? left / 64 * 64 : left;
      if (M > block && m < 64 && m <= small_rows().wxt_bf16 && B.trans && !acc) {
        gemm_rows_as_wxt(m0, m, N, K, A, B, C, cdt, ldc);
        continue;
      }
      const int64_t padded = (m + 15) / 16 * 16;
      const void *a = dry_ ? nullptr : at(A.p, A.dtype, m0 * A.ld);
      void *c = dry_ ? nullptr : at(C, cdt, m0 * ldc);
      if (padded == m) {
        gemm_as_given(m, N, K, Mat{a, A.dtype, A.ld}, B, c, cdt, ldc, acc);
        continue;
      }
      const size_t ea = dtype_size(A.dtype), ec = dtype_size(cdt);
      const size_t a_bytes = static_cast<size_t>(padded * K) * ea, c_bytes = static_cast<size_t>(padded * N) * ec;
      pad_bytes_ = std::max(pad_bytes_, a_bytes + c_bytes);
      unsigned char *pa = dry_ ? nullptr : st_.gemm_pad.data(), *pc = dry_ ? nullptr : pa + a_bytes;
      if (!dry_) {
        for (int64_t i = 0; i < m; ++i) std::memcpy(pa + i * K * ea, at(a, A.dtype, i * A.ld), K * ea);
        std::memset(pa + m * K * ea, 0, (padded - m) * K * ea);
        if (acc)
          for (int64_t i = 0; i < m; ++i) std::memcpy(pc + i * N * ec, at(c, cdt, i * ldc), N * ec);
      }
      gemm_as_given(padded, N, K, Mat{pa, A.dtype, K}, B, pc, cdt, N, acc);
      if (!dry_)
        for (int64_t i = 0; i < m; ++i) std::memcpy(at(c, cdt, i * ldc), pc + i * N * ec, N * ec);
    }
  }

  // On the tile kernel, its work in the padded operands' buffer.
  void gemm_amx(int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt, int64_t ldc,
                bool acc) {
    pad_bytes_ = std::max(pad_bytes_, amx_gemm_work_bytes(M, N, K, omp_get_max_threads()));
    if (!dry_) amx_gemm(M, N, K, A.p, A.ld, A.trans, B.p, B.ld, B.trans, C, cdt, ldc, acc, st_.gemm_pad.data());
  }

  // Rows [m0, m0 + m) of C = A B^T (B read transposed: a weight as stored) as W X^T, into the
  // padded operands' buffer as float32, then transposed into C's rows.
  void gemm_rows_as_wxt(int64_t m0, int64_t m, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt,
                        int64_t ldc) {
    pad_bytes_ = std::max(pad_bytes_, static_cast<size_t>(m * N) * sizeof(float));
    float *ct = dry_ ? nullptr : reinterpret_cast<float *>(st_.gemm_pad.data());
    const void *a = dry_ ? nullptr : at(A.p, A.dtype, m0 * A.ld);
    gemm_few_rows(m, N, K, Mat{B.p, B.dtype, B.ld}, Mat{a, A.dtype, A.ld}, ct);
    if (!dry_) transpose_rows(at(C, cdt, m0 * ldc), cdt, ldc, ct, m, N);
  }

  // A weight gradient (K: the expert's rows) on oneDNN's AMX kernels runs a third faster with K
  // a multiple of 32 (one tile of bfloat16 pairs): 2048 x 1024 += [131 rows]^T [131 rows] 0.64
  // ms, the same padded with zero rows to 160 0.54 (2 cores of a Xeon with AMX); from about 256
  // rows the copy costs what it saves (1000 rows 3.51 ms, 1024 3.55), so below `block` only. The
  // rows are copied, each operand's K rows then zeros: the zero products leave every sum as it was.
  void gemm_padded_k(int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt, int64_t ldc,
                     bool acc) {
    const int64_t padded = (K + 31) / 32 * 32;
    const size_t ea = dtype_size(A.dtype), eb = dtype_size(B.dtype);
    const size_t a_bytes = static_cast<size_t>(padded * M) * ea, b_bytes = static_cast<size_t>(padded * N) * eb;
    pad_bytes_ = std::max(pad_bytes_, a_bytes + b_bytes);
    unsigned char *pa = dry_ ? nullptr : st_.gemm_pad.data(), *pb = dry_ ? nullptr : pa + a_bytes;
    if (!dry_) {
      for (int64_t i = 0; i < K; ++i) {
        std::memcpy(pa + i * M * ea, at(A.p, A.dtype, i * A.ld), M * ea);
        std::memcpy(pb + i * N * eb, at(B.p, B.dtype, i * B.ld), N * eb);
      }
      std::memset(pa + K * M * ea, 0, (padded - K) * M * ea);
      std::memset(pb + K * N * eb, 0, (padded - K) * N * eb);
    }
    gemm_as_given(M, N, padded, Mat{pa, A.dtype, M, true}, Mat{pb, B.dtype, N}, C, cdt, ldc, acc);
  }

  void gemm_as_given(int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &B, void *C, int cdt, int64_t ldc,
                     bool acc) {
    GemmShape s;
    // Small weights: one primitive for every row count (the rows are a runtime size). A fixed
    // row count reaches oneDNN's brgemm kernels, which matters only where the product is large
    // enough to pay for a primitive per count (about 0.05-0.3 ms and a few dozen allocations
    // each).
    const bool small = (A.trans ? M : K) * N < kSmallWeights;
    s.runtime_m = small && !A.trans;
    s.runtime_k = small && A.trans;
    s.M = s.runtime_m ? 0 : M;
    s.N = N;
    s.K = s.runtime_k ? 0 : K;
    s.trans_a = A.trans;
    s.trans_b = B.trans;
    s.lda = A.ld;
    s.ldb = B.ld;
    s.ldc = ldc;
    s.a_dtype = A.dtype;
    s.b_dtype = B.dtype;
    s.c_dtype = cdt;
    s.accumulate = acc;
    const Gemm g = st_.gemms.prepare(s);
    if (!dry_) g.run(A.p, B.p, C, st_.gemm_scratch, M, K);
  }

 public:
  // C^T[N, rows] = W[N, K] X[rows, K]^T into ct (of cdt, row stride rows): a product over few
  // rows with the weight as the left operand, read in its natural layout. (oneDNN's kernels read
  // a transposed right operand through a copy; with 16 rows this runs in 0.32 ms where X W^T
  // takes 0.47, N 2048, K 1024, 2 cores of an Emerald Rapids Xeon.) x_rows false: X is given as
  // its transpose, [K, rows] (row stride X.ld).
  void gemm_few_rows(int64_t rows, int64_t N, int64_t K, const Mat &W, const Mat &X, void *ct,
                     int cdt = MOE_DTYPE_F32, bool x_rows = true) {
    if (rows == 0 || N == 0) return;
    GemmShape s;
    const bool small = N * K < kSmallWeights;
    s.runtime_n = small;
    s.M = N;
    s.N = small ? 0 : rows;
    s.K = K;
    s.trans_b = x_rows;  // X's rows are the columns of the right operand
    s.lda = W.ld;
    s.ldb = X.ld;
    s.ldc = rows;
    s.a_dtype = W.dtype;
    s.b_dtype = X.dtype;
    s.c_dtype = cdt;
    const Gemm g = st_.gemms.prepare(s);
    if (!dry_) g.run(W.p, X.p, ct, st_.gemm_scratch, N, K, rows);
  }

 private:
  State &st_;
  bool dry_;
  size_t pad_bytes_ = 0;
};

// The float32 arena of a widened call, carved in order (mark/reset reuse it expert after
// expert); sized by a dry run of the same code, which hands out null pointers.
class Arena {
 public:
  Arena(std::vector<float> &store, bool dry) : store_(store), dry_(dry) {}
  float *take(int64_t n) {
    const size_t at = used_;
    used_ += static_cast<size_t>(n);
    peak_ = std::max(peak_, used_);
    if (dry_) return nullptr;
    if (used_ > store_.size()) fail(MOE_ERR_INTERNAL, "expert_ffn: arena of %zu floats too small", store_.size());
    return store_.data() + at;
  }
  size_t mark() const { return used_; }
  void reset(size_t mark) { used_ = mark; }
  size_t peak() const { return peak_; }

 private:
  std::vector<float> &store_;
  bool dry_;
  size_t used_ = 0, peak_ = 0;
};

// Elementwise passes on rows of dtype storage: float32 computes in place, 16-bit storage through
// float32 pieces (rounded where stored).
void act_forward(const Exec &x, const Act &k, int dt, const void *h, const void *g, void *out, int64_t n) {
  if (x.dry() || n == 0) return;
  if (dt == MOE_DTYPE_F32) {
    chunked(n, [&](int64_t at0, int64_t len) {
      activation_forward(k.kind, static_cast<const float *>(h) + at0, g ? static_cast<const float *>(g) + at0 : nullptr,
                         static_cast<float *>(out) + at0, len, k.alpha, k.limit);
    });
    return;
  }
  chunked(n, [&](int64_t at0, int64_t len) {
    constexpr int64_t kPiece = 1024;
    float hf[kPiece], gf[kPiece], of[kPiece];
    for (int64_t i = 0; i < len; i += kPiece) {
      const int64_t m = std::min(kPiece, len - i);
      widen(hf, at(h, dt, at0 + i), dt, m);
      if (g) widen(gf, at(g, dt, at0 + i), dt, m);
      activation_forward(k.kind, hf, g ? gf : nullptr, of, m, k.alpha, k.limit);
      narrow(at(out, dt, at0 + i), dt, of, m);
    }
  });
}

// a = act(h, g) (a may be NULL: not wanted), then (dh, dg) from da = dh: dh = da g act'(h), dg = da act(h).
void act_backward(const Exec &x, const Act &k, int dt, const void *h, const void *g, void *a, void *dh, void *dg,
                  int64_t n) {
  if (x.dry() || n == 0) return;
  chunked(n, [&](int64_t at0, int64_t len) {
    constexpr int64_t kPiece = 1024;
    float hf[kPiece], gf[kPiece], af[kPiece], df[kPiece], dgf[kPiece];
    for (int64_t i = 0; i < len; i += kPiece) {
      const int64_t m = std::min(kPiece, len - i);
      const float *hp = hf, *gp = g ? gf : nullptr;
      float *dp = df, *dgp = dg ? dgf : nullptr;
      if (dt == MOE_DTYPE_F32) {
        hp = static_cast<const float *>(h) + at0 + i;
        gp = g ? static_cast<const float *>(g) + at0 + i : nullptr;
        dp = static_cast<float *>(dh) + at0 + i;
        dgp = dg ? static_cast<float *>(dg) + at0 + i : nullptr;
      } else {
        widen(hf, at(h, dt, at0 + i), dt, m);
        if (g) widen(gf, at(g, dt, at0 + i), dt, m);
        widen(df, at(dh, dt, at0 + i), dt, m);
      }
      if (a) {
        float *ap = dt == MOE_DTYPE_F32 ? static_cast<float *>(a) + at0 + i : af;
        activation_forward(k.kind, hp, gp, ap, m, k.alpha, k.limit);
        if (dt != MOE_DTYPE_F32) narrow(at(a, dt, at0 + i), dt, af, m);
      }
      activation_backward(k.kind, hp, gp, dp, dgp, m, k.alpha, k.limit);
      if (dt != MOE_DTYPE_F32) {
        narrow(at(dh, dt, at0 + i), dt, df, m);
        if (dg) narrow(at(dg, dt, at0 + i), dt, dgf, m);
      }
    }
  });
}

// Rows of float32 values: round in place to dt (what storing keeps), and store into dst (rows of
// dt with row stride ld_dst) when dst is given.
void round_rows(const Exec &x, float *v, int64_t rows, int64_t cols, int64_t ldv, int dt, void *dst, int64_t ld_dst) {
  if (x.dry() || rows == 0) return;
#pragma omp parallel for schedule(static) if (worth_threads(rows * cols))
  for (int64_t i = 0; i < rows; ++i) {
    round_in_place(v + i * ldv, dt, cols);
    if (dst) narrow(at(dst, dt, i * ld_dst), dt, v + i * ldv, cols);
  }
}

// dst rows (dt, stride ld_dst) += src rows (float32, stride ld_src), rounded once.
void add_rows(const Exec &x, void *dst, int dt, int64_t ld_dst, const float *src, int64_t ld_src, int64_t rows,
              int64_t cols) {
  if (x.dry() || rows == 0) return;
#pragma omp parallel for schedule(static) if (worth_threads(rows * cols))
  for (int64_t i = 0; i < rows; ++i) {
    float buf[kPanel];
    for (int64_t c = 0; c < cols; c += kPanel) {
      const int64_t m = std::min(kPanel, cols - c);
      widen(buf, at(dst, dt, i * ld_dst + c), dt, m);
      const float *s = src + i * ld_src + c;
      for (int64_t j = 0; j < m; ++j) buf[j] += s[j];
      narrow(at(dst, dt, i * ld_dst + c), dt, buf, m);
    }
  }
}

// Widens rows x cols of src (dt, row stride ld) into dst (float32, row stride ld_dst, or cols).
void widen_rows(const Exec &x, float *dst, const void *src, int dt, int64_t ld, int64_t rows, int64_t cols,
                int64_t ld_dst = 0) {
  if (x.dry() || rows == 0) return;
  if (ld_dst == 0) ld_dst = cols;
#pragma omp parallel for schedule(static) if (worth_threads(rows * cols))
  for (int64_t i = 0; i < rows; ++i) widen(dst + i * ld_dst, at(src, dt, i * ld), dt, cols);
}

// Rows of float32 values (row stride ldv) += bias row b (cols elements of dt); b NULL: nothing.
void add_bias_rows(const Exec &x, float *v, int64_t rows, int64_t cols, int64_t ldv, const void *b, int dt) {
  if (x.dry() || rows == 0 || !b) return;
#pragma omp parallel for schedule(static) if (worth_threads(rows * cols))
  for (int64_t i = 0; i < rows; ++i) {
    float buf[kPanel];
    for (int64_t c = 0; c < cols; c += kPanel) {
      const int64_t m = std::min(kPanel, cols - c);
      widen(buf, at(b, dt, c), dt, m);
      float *r = v + i * ldv + c;
      for (int64_t j = 0; j < m; ++j) r[j] += buf[j];
    }
  }
}

// db[cols] (dt) += column sums of src (rows x cols of sdt, row stride ld), each summed in row
// order in double and rounded once when added; db NULL: nothing.
void add_column_sums(const Exec &x, void *db, int dt, const void *src, int sdt, int64_t rows, int64_t cols,
                     int64_t ld) {
  if (x.dry() || rows == 0 || !db) return;
  const int64_t panels = (cols + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) if (worth_threads(rows * cols))
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t c0 = p * kPanel, m = std::min(kPanel, cols - c0);
    double sum[kPanel] = {};
    float buf[kPanel];
    for (int64_t i = 0; i < rows; ++i) {
      widen(buf, at(src, sdt, i * ld + c0), sdt, m);
      for (int64_t j = 0; j < m; ++j) sum[j] += buf[j];
    }
    widen(buf, at(db, dt, c0), dt, m);
    for (int64_t j = 0; j < m; ++j) buf[j] += static_cast<float>(sum[j]);
    narrow(at(db, dt, c0), dt, buf, m);
  }
}

// ---- the two ways to run a call -------------------------------------------------------------------

// Expert e's bias rows (NULL when the layer has none).
const void *bias_of(const void *b, int dt, int64_t e, int64_t n) { return b ? at(b, dt, e * n) : nullptr; }

struct Call {
  const moe_ffn_args *a;
  int64_t d, ff;
  int dt;  // storage dtype
  bool is_glu;
};

// transpose_rows, but for a dry run.
void transpose_into(const Exec &x, void *dst, int dt, int64_t ld, const float *src, int64_t rows, int64_t cols) {
  if (!x.dry()) transpose_rows(dst, dt, ld, src, rows, cols);
}

// Forward of an expert with few rows: every product as W X^T (see Exec::gemm_few_rows) into ct,
// float32, transposed into place (rounded there in a 16-bit call, whose biases, if any, make
// it a widened call instead).
void forward_few_rows(Exec &x, const Call &c, Arena &arena, int64_t e, const Rows &r) {
  const moe_ffn_args *a = c.a;
  const int64_t d = c.d, ff = c.ff, n = r.n;
  const int dt = c.dt;
  const bool f32 = dt == MOE_DTYPE_F32;
  float *ct = arena.take(n * std::max(d, ff));
  const Mat X{at(a->x, dt, r.in * d), dt, d};
  void *h = at(a->h, dt, r.begin * ff), *g = c.is_glu ? at(a->g, dt, r.begin * ff) : nullptr;
  void *act = at(a->a, dt, r.begin * ff), *y = at(a->y, dt, r.begin * d);
  if (a->inference && !a->b1 && !a->b3 && !a->b2) {
    // Nothing reads h, g and a after an inference forward, so they stay transposed as the
    // products leave them ([ff, n], rounded to dt by oneDNN as the transposition would): the
    // activation is element by element, and W2 reads a^T as it stands. One transposition of
    // three, and h and g written once, in dt, not as float32 first.
    x.gemm_few_rows(n, ff, d, Mat{at(a->w1, dt, e * ff * d), dt, d}, X, h, dt);
    if (g) x.gemm_few_rows(n, ff, d, Mat{at(a->w3, dt, e * ff * d), dt, d}, X, g, dt);
    act_forward(x, act_of(a), dt, h, g, act, n * ff);
    x.gemm_few_rows(n, d, ff, Mat{at(a->w2, dt, e * d * ff), dt, ff}, Mat{act, dt, n}, ct, MOE_DTYPE_F32, false);
    transpose_into(x, y, dt, d, ct, n, d);
    return;
  }
  x.gemm_few_rows(n, ff, d, Mat{at(a->w1, dt, e * ff * d), dt, d}, X, ct);
  transpose_into(x, h, dt, ff, ct, n, ff);
  if (f32) add_bias_rows(x, static_cast<float *>(h), n, ff, ff, bias_of(a->b1, dt, e, ff), dt);
  if (g) {
    x.gemm_few_rows(n, ff, d, Mat{at(a->w3, dt, e * ff * d), dt, d}, X, ct);
    transpose_into(x, g, dt, ff, ct, n, ff);
    if (f32) add_bias_rows(x, static_cast<float *>(g), n, ff, ff, bias_of(a->b3, dt, e, ff), dt);
  }
  act_forward(x, act_of(a), dt, h, g, act, n * ff);
  x.gemm_few_rows(n, d, ff, Mat{at(a->w2, dt, e * d * ff), dt, ff}, Mat{act, dt, ff}, ct);
  transpose_into(x, y, dt, d, ct, n, d);
  if (f32) add_bias_rows(x, static_cast<float *>(y), n, d, d, bias_of(a->b2, dt, e, d), dt);
}

// v[0, n) += bias b (n elements of dt); b NULL: nothing.
void add_bias(float *v, const void *b, int dt, int64_t n) {
  if (!b) return;
  float buf[kPanel];
  for (int64_t c = 0; c < n; c += kPanel) {
    const int64_t m = std::min(kPanel, n - c);
    widen(buf, at(b, dt, c), dt, m);
    for (int64_t j = 0; j < m; ++j) v[c + j] += buf[j];
  }
}

// The experts of a call with few rows each (decoding: small_rows().few_*), any dtype: every
// product on the few-rows kernel (cpu/few_rows.h), which reads each weight once, in its storage
// dtype. All of them together, in one parallel region: the W1 and W3 products of every expert as
// one stream of chunks, h, g and a row by row, the W2 products, y row by row. Expert by expert,
// each product began on a cold fetch and ended with a thread waiting for the last chunk, and
// every elementwise pass woke the team (d 1024, d_ff 2048, 8 experts, top-2, SwiGLU: 24
// products and 40 passes per forward of 64 tokens); together, on 2 cores of an AMD EPYC Zen 4,
// forward of 8 and 64 tokens 0.90 and 0.94 of the time in bfloat16, 0.95 and 0.98 in float32.
class FewExperts {
 public:
  // columns_from: rows from which an expert's inputs are laid out as columns (XwtProduct), 0
  // never; columns_rest: rows past a multiple of 8 left to the rows kernel (see column_rows).
  FewExperts(const Call &c, int64_t max_rows, int64_t columns_from, int64_t columns_rest)
      : c_(c), max_(max_rows), columns_from_(columns_from), columns_rest_(few_rows_paired(c.dt) ? 0 : columns_rest) {}
  bool few(const Rows &r) const { return r.n > 0 && r.n <= max_; }
  int64_t max_rows() const { return max_; }

  void forward(Exec &x, Arena &arena, std::vector<XwtProduct> &products) {
    const moe_ffn_args *a = c_.a;
    const int64_t d = c_.d, ff = c_.ff;
    const int dt = c_.dt;
    int64_t rows = 0, experts = 0, most = 0, pairs = 0, columns = 0;
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (!few(r)) continue;
      rows += r.n, ++experts, pairs += (r.n + 1) / 2;
      if (in_columns(r))
        columns += few_rows_columns_ld(column_rows(r));
      else
        most = std::max(most, r.n);
    }
    if (rows == 0) return;
    wide_ = dt == MOE_DTYPE_F32;  // float32 storage takes the kernel's sums directly
    if (!wide_) {
      hf_ = arena.take(rows * ff);
      gf_ = c_.is_glu ? arena.take(rows * ff) : nullptr;
      af_ = arena.take(rows * ff);
      yf_ = arena.take(rows * d);
    }
    // Inputs at strides the kernel would copy for every chunk of weight rows (see
    // few_rows_input_ld) are copied once: x before the W1 | W3 products, a as each row is
    // stored. (Forward of 64 tokens, d 1024, d_ff 2048, 2 cores of an AMD EPYC Zen 4: the
    // kernel's copies took 7 % of the float32 time, 2 % of the bfloat16.)
    // Where the kernel reads its inputs in pairs of rows (few_rows_paired), they are laid out so
    // once, each expert's from its first pair on.
    paired_ = few_rows_paired(dt);
    ldx_ = paired_ ? d : few_rows_input_ld(d, dt, most);
    lda_ = paired_ ? ff : few_rows_input_ld(ff, dt, most);
    if (paired_) {
      xp_ = take_bytes(arena, few_rows_pairs_size(2 * pairs, d) * es());
      ap_ = take_bytes(arena, few_rows_pairs_size(2 * pairs, ff) * es());
    } else {
      xp_ = ldx_ != d ? take_bytes(arena, rows * ldx_ * es()) : nullptr;
      ap_ = lda_ != ff ? take_bytes(arena, rows * lda_ * es()) : nullptr;
    }
    // Experts of columns_from_ rows or more: x and a as columns, each written once.
    xc_ = columns ? reinterpret_cast<float *>(take_bytes(arena, columns * d * 4)) : nullptr;
    ac_ = columns ? reinterpret_cast<float *>(take_bytes(arena, columns * ff * 4)) : nullptr;
    const int64_t first = (c_.is_glu ? 2 : 1) * experts;
    if (x.dry()) {  // the list of products is sized here, so that the real run allocates nothing
      if (products.size() < static_cast<size_t>(first + experts)) products.resize(first + experts);
      return;
    }
    int64_t i = 0, j = first;
    each_few([&](int64_t e, const Rows &r, int64_t o, int64_t q, int64_t col) {
      const void *w1 = at(a->w1, dt, e * ff * d), *w2 = at(a->w2, dt, e * d * ff);
      const void *w3 = c_.is_glu ? at(a->w3, dt, e * ff * d) : nullptr;
      const int64_t n = column_rows(r);
      if (n == 0) {
        const void *xe = xp_ ? input(xp_, d, ldx_, o, q) : at(a->x, dt, r.in * d);
        const void *ae = ap_ ? input(ap_, ff, lda_, o, q) : at(a->a, dt, r.begin * ff);
        products[i++] = {xe, ldx_, w1, d, r.n, ff, d, h(r, o), ff, paired_};
        if (c_.is_glu) products[i++] = {xe, ldx_, w3, d, r.n, ff, d, g(r, o), ff, paired_};
        products[j++] = {ae, lda_, w2, ff, r.n, d, ff, y(r, o), d, paired_};
        return;
      }
      // The rows past the columns as stored (columns only where the CPU has no AVX-512, which
      // reads rows at any stride in place).
      const int64_t ld = few_rows_columns_ld(n), rest = r.n - n;
      const void *xr = at(a->x, dt, (r.in + n) * d), *ar = at(a->a, dt, (r.begin + n) * ff);
      products[i++] = {xc_ + col * d, ld, w1, d, n, ff, d, h(r, o), ff, false, true, xr, d, rest};
      if (c_.is_glu) products[i++] = {xc_ + col * d, ld, w3, d, n, ff, d, g(r, o), ff, false, true, xr, d, rest};
      products[j++] = {ac_ + col * ff, ld, w2, ff, n, d, ff, y(r, o), d, false, true, ar, ff, rest};
    });
    XwtBatch hidden(products.data(), first, dt), out(products.data() + first, experts, dt);
#pragma omp parallel if (hidden.chunks() > 1 && ff * d >= (int64_t{1} << 16))
    {
      if (xp_ || xc_) {
        RowOf at_row0(*this);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < rows; ++k) copy_input_row(at_row0(k));
      }
      hidden.drain();
#pragma omp barrier
      RowOf at_row(*this);
#pragma omp for schedule(static)
      for (int64_t k = 0; k < rows; ++k) hidden_row(at_row(k));
      out.drain();
#pragma omp barrier
      RowOf at_row2(*this);
#pragma omp for schedule(static) nowait  // the region's end is the barrier
      for (int64_t k = 0; k < rows; ++k) output_row(at_row2(k));
    }
  }

 private:
  // Row i of expert e, whose rows r are rows [o, o + r.n) of the few experts' and whose pairs
  // of rows begin at pair q of theirs (and, in columns, whose columns begin at column c).
  struct Row {
    int64_t e;
    Rows r;
    int64_t o, q, c, i;
  };

  bool in_columns(const Rows &r) const { return columns_from_ > 0 && r.n >= columns_from_; }
  // Rows of r laid out as columns: none where r is not in columns; else down to a multiple of 8
  // where at most columns_rest_ rows are left (to the rows kernel: each column vector costs as
  // much for 1 row as for 8), else all.
  int64_t column_rows(const Rows &r) const {
    if (!in_columns(r)) return 0;
    const int64_t whole = r.n / 8 * 8;
    return whole >= 16 && r.n - whole <= columns_rest_ ? whole : r.n;
  }

  // The k-th row of the few experts' for ks that only increase (one thread's share of a loop).
  class RowOf {
   public:
    explicit RowOf(const FewExperts &f) : f_(f) {}
    Row operator()(int64_t k) {
      for (;; ++e_) {
        const Rows r = rows_of(f_.c_.a, e_);
        if (!f_.few(r)) continue;
        if (k < o_ + r.n) return {e_, r, o_, q_, c_, k - o_};
        o_ += r.n;
        q_ += (r.n + 1) / 2;
        if (f_.in_columns(r)) c_ += few_rows_columns_ld(f_.column_rows(r));
      }
    }

   private:
    const FewExperts &f_;
    // the expert of the last row asked for, its first row, pair and column among the few
    int64_t e_ = 0, o_ = 0, q_ = 0, c_ = 0;
  };

  template <class F>
  void each_few(F &&f) const {
    for (int64_t e = 0, o = 0, q = 0, col = 0; e < c_.a->num_experts; ++e) {
      const Rows r = rows_of(c_.a, e);
      if (!few(r)) continue;
      f(e, r, o, q, col);
      o += r.n;
      q += (r.n + 1) / 2;
      if (in_columns(r)) col += few_rows_columns_ld(column_rows(r));
    }
  }

  // The copied inputs (K elements a row) of the expert whose rows begin at row o and pair q of
  // the few: in pairs, or rows of stride ld.
  char *input(char *base, int64_t K, int64_t ld, int64_t o, int64_t q) const {
    return base + (paired_ ? few_rows_pairs_size(2 * q, K) : o * ld) * es();
  }

  // Row w of the inputs x or a (K elements of src) into their copy at base.
  void copy_input(char *base, int64_t K, int64_t ld, const Row &w, const void *src) const {
    if (paired_)
      few_rows_pair_row(src, K, w.r.n, w.i, input(base, K, ld, w.o, w.q));
    else
      std::memcpy(input(base, K, ld, w.o, w.q) + w.i * ld * es(), src, K * es());
  }

  // Float32 rows of expert rows r (at o among the few): h, g and a are the stored ones when wide.
  float *h(const Rows &r, int64_t o) const {
    return wide_ ? static_cast<float *>(c_.a->h) + r.begin * c_.ff : hf_ + o * c_.ff;
  }
  float *g(const Rows &r, int64_t o) const {
    if (!c_.is_glu) return nullptr;
    return wide_ ? static_cast<float *>(c_.a->g) + r.begin * c_.ff : gf_ + o * c_.ff;
  }
  float *act(const Rows &r, int64_t o) const {
    return wide_ ? static_cast<float *>(c_.a->a) + r.begin * c_.ff : af_ + o * c_.ff;
  }
  float *y(const Rows &r, int64_t o) const {
    return wide_ ? static_cast<float *>(c_.a->y) + r.begin * c_.d : yf_ + o * c_.d;
  }

  int64_t es() const { return static_cast<int64_t>(dtype_size(c_.dt)); }

  // n bytes of the arena, aligned to a cache line.
  static char *take_bytes(Arena &arena, int64_t n) {
    constexpr int64_t kLine = 64;
    float *p = arena.take((n + kLine) / static_cast<int64_t>(sizeof(float)));
    if (!p) return nullptr;  // dry
    const auto at = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<char *>((at + kLine - 1) / kLine * kLine);
  }

  void copy_input_row(const Row &w) const {
    const void *src = at(c_.a->x, c_.dt, (w.r.in + w.i) * c_.d);
    if (w.i < column_rows(w.r))
      few_rows_column(src, c_.dt, c_.d, column_rows(w.r), w.i, xc_ + w.c * c_.d);
    else if (xp_ && !in_columns(w.r))
      copy_input(xp_, c_.d, ldx_, w, src);
  }

  // The kernel's sums plus bias, rounded to the layer's dtype and stored; with keep, v is left
  // holding the stored values too (h and g, which the activation reads as stored).
  void finish(float *v, const void *b, void *dst, int64_t n, bool keep) const {
    add_bias(v, b, c_.dt, n);
    if (keep)
      narrow_rounded(dst, c_.dt, v, n);
    else
      narrow(dst, c_.dt, v, n);
  }

  void hidden_row(const Row &w) const {
    const moe_ffn_args *a = c_.a;
    const int64_t ff = c_.ff, row = w.r.begin + w.i;
    float *hr = h(w.r, w.o) + w.i * ff, *gr = c_.is_glu ? g(w.r, w.o) + w.i * ff : nullptr;
    float *ar = act(w.r, w.o) + w.i * ff;
    finish(hr, bias_of(a->b1, c_.dt, w.e, ff), at(a->h, c_.dt, row * ff), ff, true);
    if (gr) finish(gr, bias_of(a->b3, c_.dt, w.e, ff), at(a->g, c_.dt, row * ff), ff, true);
    const Act k = act_of(a);
    activation_forward(k.kind, hr, gr, ar, ff, k.alpha, k.limit);
    finish(ar, nullptr, at(a->a, c_.dt, row * ff), ff, false);  // the W2 product reads a as stored
    if (w.i < column_rows(w.r))
      few_rows_column(at(a->a, c_.dt, row * ff), c_.dt, ff, column_rows(w.r), w.i, ac_ + w.c * ff);
    else if (ap_ && !in_columns(w.r))
      copy_input(ap_, ff, lda_, w, at(a->a, c_.dt, row * ff));
  }

  void output_row(const Row &w) const {
    const moe_ffn_args *a = c_.a;
    const int64_t d = c_.d;
    finish(y(w.r, w.o) + w.i * d, bias_of(a->b2, c_.dt, w.e, d), at(a->y, c_.dt, (w.r.begin + w.i) * d), d, false);
  }

  const Call &c_;
  int64_t max_, columns_from_, columns_rest_;
  bool wide_ = false, paired_ = false;
  float *hf_ = nullptr, *gf_ = nullptr, *af_ = nullptr, *yf_ = nullptr;
  char *xp_ = nullptr, *ap_ = nullptr;  // x and a in pairs or at strides ldx_ and lda_, where copied
  float *xc_ = nullptr, *ac_ = nullptr;  // x and a of the experts in columns
  int64_t ldx_ = 0, lda_ = 0;
};

// Forward of expert e, operands in storage.
void forward_direct(Exec &x, const Call &c, int64_t e, const Rows &r) {
  const moe_ffn_args *a = c.a;
  const int64_t d = c.d, ff = c.ff;
  const int dt = c.dt;
  const Mat X{at(a->x, dt, r.in * d), dt, d};
  void *h = at(a->h, dt, r.begin * ff), *g = c.is_glu ? at(a->g, dt, r.begin * ff) : nullptr;
  void *act = at(a->a, dt, r.begin * ff);
  x.gemm(r.n, ff, d, X, Mat{at(a->w1, dt, e * ff * d), dt, d, true}, h, dt, ff, false);
  if (g) x.gemm(r.n, ff, d, X, Mat{at(a->w3, dt, e * ff * d), dt, d, true}, g, dt, ff, false);
  // Biases: float32 only here (a 16-bit call with biases is widened, so that h = x W1^T + b1 is
  // rounded once).
  if (dt == MOE_DTYPE_F32) {
    add_bias_rows(x, static_cast<float *>(h), r.n, ff, ff, bias_of(a->b1, dt, e, ff), dt);
    if (g) add_bias_rows(x, static_cast<float *>(g), r.n, ff, ff, bias_of(a->b3, dt, e, ff), dt);
  }
  act_forward(x, act_of(a), dt, h, g, act, r.n * ff);
  x.gemm(r.n, d, ff, Mat{act, dt, ff}, Mat{at(a->w2, dt, e * d * ff), dt, ff, true}, at(a->y, dt, r.begin * d), dt,
         d, false);
  if (dt == MOE_DTYPE_F32)
    add_bias_rows(x, static_cast<float *>(a->y) + r.begin * d, r.n, d, d, bias_of(a->b2, dt, e, d), dt);
}

// out[:, panel] = X (float32, [rows, K]) times a panel of W^T, for panels of kPanel rows of the
// weight W ([N, K] rows of dt): each panel widened into wbuf.
void gemm_widened_nt(Exec &x, int64_t rows, int64_t N, int64_t K, const float *X, const void *W, int dt, float *wbuf,
                     float *out, int64_t ldo) {
  for (int64_t p = 0; p < N; p += kPanel) {
    const int64_t w = std::min(kPanel, N - p);
    widen_rows(x, wbuf, at(W, dt, p * K), dt, K, w, K);
    x.gemm(rows, w, K, Mat{X, MOE_DTYPE_F32, K}, Mat{wbuf, MOE_DTYPE_F32, K, true}, x.dry() ? nullptr : out + p,
           MOE_DTYPE_F32, ldo, false);
  }
}

// out[:, panel] (+)= X (float32, [rows, K]) times a column panel of W ([K, N] rows of dt, row stride N).
void gemm_widened_nn(Exec &x, int64_t rows, int64_t N, int64_t K, const float *X, const void *W, int dt, float *wbuf,
                     float *out, int64_t ldo, bool acc) {
  for (int64_t p = 0; p < N; p += kPanel) {
    const int64_t w = std::min(kPanel, N - p);
    widen_rows(x, wbuf, at(W, dt, p), dt, N, K, w, kPanelLd);
    x.gemm(rows, w, K, Mat{X, MOE_DTYPE_F32, K}, Mat{wbuf, MOE_DTYPE_F32, kPanelLd}, x.dry() ? nullptr : out + p,
           MOE_DTYPE_F32, ldo, acc);
  }
}

void forward_widened(Exec &x, const Call &c, Arena &arena, int64_t e, const Rows &r, const float *xf) {
  const moe_ffn_args *a = c.a;
  const int64_t d = c.d, ff = c.ff, n = r.n;
  const int dt = c.dt;
  float *hf = arena.take(n * ff), *gf = c.is_glu ? arena.take(n * ff) : nullptr, *af = arena.take(n * ff);
  float *yf = arena.take(n * d), *wbuf = arena.take(kPanelLd * std::max(d, ff));
  gemm_widened_nt(x, n, ff, d, xf, at(a->w1, dt, e * ff * d), dt, wbuf, hf, ff);
  add_bias_rows(x, hf, n, ff, ff, bias_of(a->b1, dt, e, ff), dt);
  round_rows(x, hf, n, ff, ff, dt, at(a->h, dt, r.begin * ff), ff);
  if (c.is_glu) {
    gemm_widened_nt(x, n, ff, d, xf, at(a->w3, dt, e * ff * d), dt, wbuf, gf, ff);
    add_bias_rows(x, gf, n, ff, ff, bias_of(a->b3, dt, e, ff), dt);
    round_rows(x, gf, n, ff, ff, dt, at(a->g, dt, r.begin * ff), ff);
  }
  act_forward(x, act_of(a), MOE_DTYPE_F32, hf, gf, af, n * ff);
  round_rows(x, af, n, ff, ff, dt, nullptr, 0);
  gemm_widened_nt(x, n, d, ff, af, at(a->w2, dt, e * d * ff), dt, wbuf, yf, d);
  add_bias_rows(x, yf, n, d, d, bias_of(a->b2, dt, e, d), dt);
  round_rows(x, yf, n, d, d, dt, at(a->y, dt, r.begin * d), d);
}

// C[M, N] (+)= A W for a weight W [K, N] read along its rows (dY W2, dH W1), as Exec::gemm; a
// float32 W whose rows lie a multiple of 4 KB apart through a copy at a padded row stride where
// small_rows() says oneDNN reads it slowly in place (SmallRows::nn_copy_from).
void gemm_weight_rows(Exec &x, Arena &arena, int64_t M, int64_t N, int64_t K, const Mat &A, const Mat &W, void *C,
                      int cdt, int64_t ldc, bool acc) {
  const SmallRows &small = small_rows();
  // oneDNN 2.6's sgemm reads its operands in place (no packed copies) where 1/M + 1/N >= 0.0038.
  const bool copy = W.dtype == MOE_DTYPE_F32 && !A.trans && !W.trans && M >= small.nn_copy_from &&
                    M <= small.nn_copy_to && (W.ld * static_cast<int64_t>(sizeof(float))) % 4096 == 0 &&
                    1.0 / static_cast<double>(M) + 1.0 / static_cast<double>(N) >= 0.0038;
  if (!copy) return x.gemm(M, N, K, A, W, C, cdt, ldc, acc);
  const int64_t ld = N + 16;  // floats: see kPanelLd
  const size_t mark = arena.mark();
  float *w = arena.take(K * ld + 16);
  if (!x.dry()) {
    w = reinterpret_cast<float *>((reinterpret_cast<uintptr_t>(w) + 63) / 64 * 64);
    const float *src = static_cast<const float *>(W.p);
#pragma omp parallel for schedule(static) if (worth_threads(K * N))
    for (int64_t k = 0; k < K; ++k) std::memcpy(w + k * ld, src + k * W.ld, static_cast<size_t>(N) * sizeof(float));
  }
  x.gemm(M, N, K, A, Mat{w, MOE_DTYPE_F32, ld}, C, cdt, ldc, acc);
  arena.reset(mark);
}

// Backward of expert e, operands in storage. dxf: float32 [n, d] scratch for a 16-bit dx. With few
// rows (small_rows().bwd_*, grad_f32), the products read along a weight's rows and float32 weight
// gradients run on the few-rows kernels (few_rows_xw, few_rows_grad; sums in float32, each
// rounded once where stored, as oneDNN's).
void backward_direct(Exec &x, const Call &c, Arena &arena, int64_t e, const Rows &r, float *dxf) {
  const moe_ffn_args *a = c.a;
  const int64_t d = c.d, ff = c.ff, n = r.n;
  const int dt = c.dt;
  const void *xe = at(a->x, dt, r.in * d), *dy = at(a->dy, dt, r.begin * d);
  const void *h = at(a->h, dt, r.begin * ff), *g = c.is_glu ? at(a->g, dt, r.begin * ff) : nullptr;
  void *act = at(a->a, dt, r.begin * ff), *dh = at(a->dh, dt, r.begin * ff);
  void *dg = c.is_glu ? at(a->dg, dt, r.begin * ff) : nullptr;
  const void *w1 = at(a->w1, dt, e * ff * d), *w3 = c.is_glu ? at(a->w3, dt, e * ff * d) : nullptr;
  const void *w2 = at(a->w2, dt, e * d * ff);
  void *dw1 = at(a->dw1, dt, e * ff * d), *dw3 = dg ? at(a->dw3, dt, e * ff * d) : nullptr;
  void *dw2 = at(a->dw2, dt, e * d * ff);
  const SmallRows &small = small_rows();
  const bool few = dt == MOE_DTYPE_F32 ? n >= small.bwd_f32_from && n <= small.bwd_f32 : n <= small.bwd_16;
  const bool few_grad = dt == MOE_DTYPE_F32 && n <= small.grad_f32;
  const bool few_grad_bf16 = dt == MOE_DTYPE_BF16 && n <= small.grad_bf16;
  const bool live = !x.dry();
  // dA = dY W2 (into dh), then a = act(h, g) recomputed (one pass over h and g rather than n*ff
  // more memory kept from forward) and dh, dg from dA.
  if (few) {
    float *da = dt == MOE_DTYPE_F32 ? static_cast<float *>(dh) : arena.take(n * ff);
    if (live) few_rows_xw(dy, d, w2, ff, dt, n, ff, d, da, ff, false);
    if (live && dt != MOE_DTYPE_F32) narrow(dh, dt, da, n * ff);
  } else {
    gemm_weight_rows(x, arena, n, ff, d, Mat{dy, dt, d}, Mat{w2, dt, ff}, dh, dt, ff, false);
  }
  act_backward(x, act_of(a), dt, h, g, act, dh, dg, n * ff);
  add_column_sums(x, a->db2 ? at(a->db2, dt, e * d) : nullptr, dt, dy, dt, n, d, d);
  add_column_sums(x, a->db1 ? at(a->db1, dt, e * ff) : nullptr, dt, dh, dt, n, ff, ff);
  if (dg) add_column_sums(x, a->db3 ? at(a->db3, dt, e * ff) : nullptr, dt, dg, dt, n, ff, ff);
  // dW2 += dY^T a ; dW1 += dH^T X ; dW3 += dG^T X
  if (few_grad) {  // float32: every operand as stored
    auto f32 = [](const void *p) { return static_cast<const float *>(p); };
    const GradProduct grads[3] = {{f32(dy), d, f32(act), ff, n, dw2, ff, d, ff},
                                  {f32(dh), ff, f32(xe), d, n, dw1, d, ff, d},
                                  {f32(dg), ff, f32(xe), d, n, dw3, d, ff, d}};
    if (live) few_rows_grads(grads, dg ? 3 : 2, dt);
  } else if (few_grad_bf16) {  // on VDPBF16PS, every operand as stored
    // A and B in pairs: (n + 1) / 2 rows of d + ff, for each of the three
    auto *scratch = reinterpret_cast<uint32_t *>(arena.take(few_rows_grad_bf16_scratch(n, ff, d)));
    if (live) few_rows_grad_bf16(dy, d, act, ff, n, dw2, ff, d, ff, scratch);
    if (live) few_rows_grad_bf16(dh, ff, xe, d, n, dw1, d, ff, d, scratch);
    if (live && dg) few_rows_grad_bf16(dg, ff, xe, d, n, dw3, d, ff, d, scratch);
  } else {
    x.gemm(d, ff, n, Mat{dy, dt, d, true}, Mat{act, dt, ff}, dw2, dt, ff, true);
    x.gemm(ff, d, n, Mat{dh, dt, ff, true}, Mat{xe, dt, d}, dw1, dt, d, true);
    if (dg) x.gemm(ff, d, n, Mat{dg, dt, ff, true}, Mat{xe, dt, d}, dw3, dt, d, true);
  }
  if (!a->dx) return;
  // dX = dH W1 + dG W3. Shared experts all read the same rows: their dx (float32) adds up; a
  // routed expert's rows are stored, in float32 directly or summed in dxf and rounded once.
  const bool direct = a->shared_input || dt == MOE_DTYPE_F32;
  void *out = a->shared_input ? a->dx : (dt == MOE_DTYPE_F32 ? at(a->dx, dt, r.begin * d) : dxf);
  const int odt = a->shared_input ? MOE_DTYPE_F32 : (direct ? dt : MOE_DTYPE_F32);
  if (few) {  // out is float32 in every case here
    if (live) few_rows_xw(dh, ff, w1, d, dt, n, d, ff, static_cast<float *>(out), d, a->shared_input);
    if (live && dg) few_rows_xw(dg, ff, w3, d, dt, n, d, ff, static_cast<float *>(out), d, true);
  } else {
    gemm_weight_rows(x, arena, n, d, ff, Mat{dh, dt, ff}, Mat{w1, dt, d}, out, odt, d, a->shared_input);
    if (dg) gemm_weight_rows(x, arena, n, d, ff, Mat{dg, dt, ff}, Mat{w3, dt, d}, out, odt, d, true);
  }
  if (!direct && live) narrow(at(a->dx, dt, r.begin * d), dt, dxf, n * d);
}

void backward_widened(Exec &x, const Call &c, Arena &arena, int64_t e, const Rows &r, const float *xf) {
  const moe_ffn_args *a = c.a;
  const int64_t d = c.d, ff = c.ff, n = r.n;
  const int dt = c.dt;
  float *dyf = arena.take(n * d), *hf = arena.take(n * ff), *gf = c.is_glu ? arena.take(n * ff) : nullptr;
  float *af = arena.take(n * ff), *dhf = arena.take(n * ff), *dgf = c.is_glu ? arena.take(n * ff) : nullptr;
  float *dxf = a->dx ? arena.take(n * d) : nullptr;
  float *wbuf = arena.take(kPanelLd * std::max(d, ff)), *cbuf = arena.take(kPanel * std::max(d, ff));
  widen_rows(x, dyf, at(a->dy, dt, r.begin * d), dt, d, n, d);
  widen_rows(x, hf, at(a->h, dt, r.begin * ff), dt, ff, n, ff);
  if (c.is_glu) widen_rows(x, gf, at(a->g, dt, r.begin * ff), dt, ff, n, ff);
  // With few rows (small_rows().bwd_16) the products along a weight's rows run on few_rows_xw,
  // which reads each weight once in its dtype (the panels would read it, write it widened and read
  // that again); its inputs are 16-bit as stored (dY) or rounded to dt already (dH, dG: narrowed
  // exactly), its sums float32 in order of k.
  const bool few = n <= small_rows().bwd_16;
  const bool live = !x.dry();
  // dA = dY W2 (W2 is [d, ff]: column panels), rounded as stored
  if (!few)
    gemm_widened_nn(x, n, ff, d, dyf, at(a->w2, dt, e * d * ff), dt, wbuf, dhf, ff, false);
  else if (live)
    few_rows_xw(at(a->dy, dt, r.begin * d), d, at(a->w2, dt, e * d * ff), ff, dt, n, ff, d, dhf, ff, false);
  round_rows(x, dhf, n, ff, ff, dt, nullptr, 0);
  act_backward(x, act_of(a), MOE_DTYPE_F32, hf, gf, af, dhf, dgf, n * ff);
  round_rows(x, af, n, ff, ff, dt, nullptr, 0);
  round_rows(x, dhf, n, ff, ff, dt, nullptr, 0);
  if (c.is_glu) round_rows(x, dgf, n, ff, ff, dt, nullptr, 0);
  add_column_sums(x, a->db2 ? at(a->db2, dt, e * d) : nullptr, dt, dyf, MOE_DTYPE_F32, n, d, d);
  add_column_sums(x, a->db1 ? at(a->db1, dt, e * ff) : nullptr, dt, dhf, MOE_DTYPE_F32, n, ff, ff);
  if (c.is_glu) add_column_sums(x, a->db3 ? at(a->db3, dt, e * ff) : nullptr, dt, dgf, MOE_DTYPE_F32, n, ff, ff);
  // Weight gradients a panel at a time into cbuf, each added to its gradient and rounded once; with
  // few rows on few_rows_grads, which adds each sum to its gradient and rounds it once too, each
  // gradient read and written once in its dtype (not widened and narrowed a panel at a time).
  void *dw2 = at(a->dw2, dt, e * d * ff);
  const float *dpre[2] = {dhf, dgf};
  void *dws[2] = {at(a->dw1, dt, e * ff * d), c.is_glu ? at(a->dw3, dt, e * ff * d) : nullptr};
  if (n <= small_rows().widened_grad) {
    const GradProduct grads[3] = {{dyf, d, af, ff, n, dw2, ff, d, ff},
                                  {dhf, ff, xf, d, n, dws[0], d, ff, d},
                                  {dgf, ff, xf, d, n, dws[1], d, ff, d}};
    if (!x.dry()) few_rows_grads(grads, c.is_glu ? 3 : 2, dt);
  } else {
    for (int64_t p = 0; p < ff; p += kPanel) {  // dW2[:, p] += dY^T a[:, p]
      const int64_t w = std::min(kPanel, ff - p);
      x.gemm(d, w, n, Mat{dyf, MOE_DTYPE_F32, d, true}, Mat{x.dry() ? nullptr : af + p, MOE_DTYPE_F32, ff}, cbuf,
             MOE_DTYPE_F32, w, false);
      add_rows(x, at(dw2, dt, p), dt, ff, cbuf, w, d, w);
    }
    for (int i = 0; i < (c.is_glu ? 2 : 1); ++i) {
      for (int64_t p = 0; p < ff; p += kPanel) {  // dW1[p, :] += dH[:, p]^T X
        const int64_t w = std::min(kPanel, ff - p);
        x.gemm(w, d, n, Mat{x.dry() ? nullptr : dpre[i] + p, MOE_DTYPE_F32, ff, true}, Mat{xf, MOE_DTYPE_F32, d},
               cbuf, MOE_DTYPE_F32, d, false);
        add_rows(x, at(dws[i], dt, p * d), dt, d, cbuf, d, w, d);
      }
    }
  }
  if (!a->dx) return;
  // dX = dH W1 + dG W3 (W1, W3 are [ff, d]: column panels); shared experts add into float32 dx.
  float *out = a->shared_input ? static_cast<float *>(a->dx) : dxf;
  if (few) {
    float *narrowed = arena.take((n * ff + 1) / 2);  // dH, then dG, in dt
    if (live) narrow(narrowed, dt, dhf, n * ff);
    if (live) few_rows_xw(narrowed, ff, at(a->w1, dt, e * ff * d), d, dt, n, d, ff, out, d, a->shared_input);
    if (live && c.is_glu) narrow(narrowed, dt, dgf, n * ff);
    if (live && c.is_glu) few_rows_xw(narrowed, ff, at(a->w3, dt, e * ff * d), d, dt, n, d, ff, out, d, true);
  } else {
    gemm_widened_nn(x, n, d, ff, dhf, at(a->w1, dt, e * ff * d), dt, wbuf, out, d, a->shared_input);
    if (c.is_glu) gemm_widened_nn(x, n, d, ff, dgf, at(a->w3, dt, e * ff * d), dt, wbuf, out, d, true);
  }
  if (!a->shared_input && !x.dry()) narrow(at(a->dx, dt, r.begin * d), dt, dxf, n * d);
}

// Runs body(exec, arena) twice: dry, to prepare every GEMM and size the arena and the GEMM
// scratch, then for real (unless only_prepare). Nothing is written before the second run.
template <class Body>
void prepared(State &st, bool only_prepare, Body &&body) {
  {
    Exec dry(st, true);
    Arena arena(st.widened, true);
    body(dry, arena);
    if (st.widened.size() < arena.peak()) st.widened.resize(arena.peak());
    if (st.gemm_scratch.size() < st.gemms.max_scratch()) st.gemm_scratch.resize(st.gemms.max_scratch());
    if (st.gemm_pad.size() < dry.pad_bytes()) st.gemm_pad.resize(dry.pad_bytes());
  }
  if (only_prepare) return;
  Exec run(st, false);
  Arena arena(st.widened, false);
  body(run, arena);
}

bool widened_call(State &st, const moe_ffn_args *a) {
  if (a->dtype == MOE_DTYPE_F32) return false;
  if (a->b1) return true;  // biases are added in float32 before h, g, y are rounded
  if (a->dtype == MOE_DTYPE_F16 || !st.gemms.supports(MOE_DTYPE_BF16)) return true;
  return max_rows(a) > bf16_native_max_rows();
}

// Calls each(x, arena, e, rows, xf) for every expert with more than `batched` rows; xf is the
// expert's input widened to float32 in a widened call (null otherwise). Each expert reuses the
// arena past the shared rows; then batch(x, arena) runs the rest, with the arena past them too.
template <class Each, class Batch>
void each_expert(State &st, const moe_ffn_args *a, bool widened, int64_t batched, Each &&each, Batch &&batch) {
  prepared(st, a->prepare != 0, [&](Exec &x, Arena &arena) {
    const int64_t d = a->d;
    const float *shared_x = nullptr;
    if (widened && a->shared_input) {  // shared experts all read the same rows: widened once
      float *p = arena.take(a->offsets[1] * d);
      widen_rows(x, p, a->x, a->dtype, d, a->offsets[1], d);
      shared_x = p;
    }
    const size_t mark = arena.mark();
    for (int64_t e = 0; e < a->num_experts; ++e) {
      const Rows r = rows_of(a, e);
      if (r.n <= batched) continue;
      arena.reset(mark);
      const float *xf = shared_x;
      if (widened && !xf) {
        float *p = arena.take(r.n * d);
        widen_rows(x, p, at(a->x, a->dtype, r.in * d), a->dtype, d, r.n, d);
        xf = p;
      }
      each(x, arena, e, r, xf);
    }
    arena.reset(mark);
    batch(x, arena);
  });
}

// Whether forward_direct's products of n rows (X W1^T, X W3^T, A W2^T) all run on amx_gemm.
bool forward_on_amx(const Call &c, int64_t n) {
  const int64_t from = small_rows().amx_xwt_from;
  return c.dt == MOE_DTYPE_BF16 && from > 0 && n >= from && amx_gemm_fits(c.ff, c.d) && amx_gemm_fits(c.d, c.ff) &&
         amx_gemm_available();
}

}  // namespace

moe_status expert_ffn(void *state, const moe_ffn_args *a) {
  return guarded(state, [&] {
    State &st = *static_cast<State *>(state);
    const Call c{a, a->d, a->ff, a->dtype, glu(a->activation)};
    const bool widened = widened_call(st, a);
    const SmallRows &small = small_rows();
    const int64_t columns = c.dt == MOE_DTYPE_F32 ? small.columns_f32 : c.dt == MOE_DTYPE_BF16 ? small.columns_bf16 : 0;
    const int64_t few_rows = c.dt == MOE_DTYPE_F32                           ? small.few_f32
                             : c.dt == MOE_DTYPE_BF16 && small.few_bf16 >= 0 ? small.few_bf16
                                                                             : small.few_16;
    FewExperts few(c, few_rows, columns, small.columns_rest);
    each_expert(
        st, a, widened, few.max_rows(),
        [&](Exec &x, Arena &arena, int64_t e, const Rows &r, const float *xf) {
          if (widened)
            forward_widened(x, c, arena, e, r, xf);
          else if (r.n <= (c.dt == MOE_DTYPE_F32 ? small.wxt_f32 : c.dt == MOE_DTYPE_BF16 ? small.wxt_bf16 : 0) &&
                   !forward_on_amx(c, r.n))
            forward_few_rows(x, c, arena, e, r);
          else
            forward_direct(x, c, e, r);
        },
        [&](Exec &x, Arena &arena) { few.forward(x, arena, st.xwt); });
  });
}

moe_status expert_ffn_bwd(void *state, const moe_ffn_args *a) {
  return guarded(state, [&] {
    State &st = *static_cast<State *>(state);
    const Call c{a, a->d, a->ff, a->dtype, glu(a->activation)};
    const bool widened = widened_call(st, a);
    each_expert(
        st, a, widened, 0,
        [&](Exec &x, Arena &arena, int64_t e, const Rows &r, const float *xf) {
          if (widened) {
            backward_widened(x, c, arena, e, r, xf);
          } else {
            float *dxf = a->dx && !a->shared_input && c.dt != MOE_DTYPE_F32 ? arena.take(r.n * c.d) : nullptr;
            backward_direct(x, c, arena, e, r, dxf);
          }
        },
        [](Exec &, Arena &) {});
  });
}

}  // namespace moe::cpu
