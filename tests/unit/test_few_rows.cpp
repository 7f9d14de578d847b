// The few-rows kernels (cpu/few_rows.h). few_rows_xwt, the forward products of experts with few
// rows: its sums against float64 ones over every tail of its blocking (rows of weights in fours,
// input rows in sixes, k in steps of 16 or 32), with strided operands; and, because each output is
// one fixed sum whatever the blocking, the same bits for a row computed alone or among others, for
// a weight row inside a block of four or on its own, and for any thread count. few_rows_xw, the
// backward's products along a weight's rows, and few_rows_grad, its weight gradients (alone or
// several as one stream): bit for bit their documented order of sums; few_rows_grad_bf16 (bfloat16 on VDPBF16PS) exact on integers.
// Forward products with X in columns (XwtProduct::columns): bit for bit their order of sums, the
// same alone, among other rows, batched with products in rows and for any thread count.
// Each suite runs at every instruction set level the CPU has (AVX-512, AVX2, portable), so one
// CPU checks every kernel it can run; the levels it lacks report themselves skipped.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <ostream>
#include <tuple>
#include <vector>

#include "cpu/few_rows.h"
#include "support/half.h"
#include "support/random.h"

namespace moe::cpu {
// How GoogleTest prints a level in a test's parameters.
void PrintTo(FewRowsIsa isa, std::ostream *os) {
  *os << (isa == FewRowsIsa::avx512 ? "avx512" : isa == FewRowsIsa::avx2 ? "avx2" : "portable");
}
}  // namespace moe::cpu

namespace {

using moe::cpu::FewRowsIsa;
using moe_test::Rng;

struct Shape {
  int64_t M, N, K;
};

// Shapes that end in every tail: M past a group of six, N past a block of four, K past a step; and
// rows long enough (K 9000) that a chunk holds only 4 (float32) or 4 to 12 (16-bit, by the size
// of L2) of them, so each thread runs many chunks, each fetched ahead while the one before
// computes; and N 4100 of short rows, 65 chunks of 64, which the threads claim in runs of up to
// eight ending in a run of one.
const Shape kShapes[] = {{1, 1, 1},    {1, 5, 17},    {2, 4, 32},     {3, 67, 33},  {5, 130, 100}, {6, 64, 1024},
                         {7, 9, 31},   {13, 70, 64},  {24, 131, 257}, {25, 8, 16},  {4, 3, 48},    {12, 257, 95},
                         {14, 67, 9000}, {2, 4100, 64}};

// Random non-zero values rounded to dtype (for the references) and their bytes (for the kernels).
struct Stored {
  std::vector<float> v;
  std::vector<unsigned char> bytes;
  Stored(int dt, std::vector<float> values) : v(moe_test::rounded(dt, std::move(values))), bytes(moe_test::encode(dt, v)) {}
  float operator[](size_t i) const { return v[i]; }
};

// Operands of one shape in dtype, with row strides past their widths.
struct Operands {
  int dtype;
  FewRowsIsa isa;
  Shape s;
  int64_t ldx, ldw, ldc;
  Rng rng;
  Stored x, w;

  // x_stride: X's row stride, 0 for K + 3.
  Operands(int dt, FewRowsIsa level, Shape sh, uint64_t seed, int64_t x_stride = 0)
      : dtype(dt), isa(level), s(sh), ldx(x_stride ? x_stride : sh.K + 3), ldw(sh.K + 5), ldc(sh.N + 2), rng(seed),
        x(dt, rng.nonzeros(static_cast<size_t>(s.M * ldx), 1.0f)),
        w(dt, rng.nonzeros(static_cast<size_t>(s.N * ldw), 0.5f)) {}
  // C of the kernel over rows [m0, m0 + rows) of X and weight rows [n0, n0 + cols), into a
  // buffer of sentinels (NaN) with row stride ldc.
  std::vector<float> run(int64_t m0, int64_t rows, int64_t n0, int64_t cols) const {
    std::vector<float> c(static_cast<size_t>(s.M * ldc), std::nanf(""));
    const size_t es = moe_test::dtype_size(dtype);
    moe::cpu::few_rows_xwt(x.bytes.data() + m0 * ldx * es, ldx, w.bytes.data() + n0 * ldw * es, ldw, dtype, rows, cols, s.K,
                           c.data() + m0 * ldc + n0, ldc, isa);
    return c;
  }
  std::vector<float> run() const { return run(0, s.M, 0, s.N); }
};

std::string name(int dtype) { return dtype == MOE_DTYPE_F32 ? "float32" : dtype == MOE_DTYPE_BF16 ? "bfloat16" : "float16"; }
std::string name(FewRowsIsa isa) {
  return isa == FewRowsIsa::avx512 ? "avx512" : isa == FewRowsIsa::avx2 ? "avx2" : "portable";
}

// A dtype and an instruction set level: the parameters of the suites below, which skip the levels
// the CPU lacks.
using Kernel = std::tuple<int, FewRowsIsa>;

class KernelTest : public ::testing::TestWithParam<Kernel> {
 protected:
  void SetUp() override {
    if (isa() > moe::cpu::few_rows_best_isa()) GTEST_SKIP() << "this CPU has no " << name(isa());
  }
  int dtype() const { return std::get<0>(GetParam()); }
  FewRowsIsa isa() const { return std::get<1>(GetParam()); }
};

const auto kKernels = ::testing::Combine(::testing::Values(MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16),
                                         ::testing::Values(FewRowsIsa::avx512, FewRowsIsa::avx2, FewRowsIsa::portable));
std::string kernel_name(const ::testing::TestParamInfo<Kernel> &i) {
  return name(std::get<0>(i.param)) + "_" + name(std::get<1>(i.param));
}

// run() (a kernel's whole output) at one thread and at three: the same bits.
template <class Run>
void expect_same_bits_at_1_and_3_threads(Run &&run, const std::string &what) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> one = run();
  omp_set_num_threads(3);
  const std::vector<float> three = run();
  omp_set_num_threads(before);
  ASSERT_EQ(one.size(), three.size()) << what;
  EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float))) << what;
}

std::string shape_name(int dt, const Shape &s) {
  return name(dt) + " M " + std::to_string(s.M) + " N " + std::to_string(s.N) + " K " + std::to_string(s.K);
}

class FewRows : public KernelTest {};

TEST_P(FewRows, SumsMatchFloat64WithinFloat32Rounding) {
  const int dt = dtype();
  uint64_t seed = 1;
  for (const Shape &s : kShapes) {
    const Operands op(dt, isa(), s, seed++);
    const std::vector<float> c = op.run();
    for (int64_t m = 0; m < s.M; ++m) {
      for (int64_t n = 0; n < s.N; ++n) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < s.K; ++k) {
          const double p = static_cast<double>(op.x[m * op.ldx + k]) * op.w[n * op.ldw + k];
          ref += p;
          mag += std::fabs(p);
        }
        // float32 sums of K products (exact products: 16-bit inputs, or float32 with an FMA):
        // at most about K roundings of 2^-24 of the magnitude.
        const double tol = (static_cast<double>(s.K) + 4) * std::ldexp(mag, -24);
        ASSERT_NEAR(c[m * op.ldc + n], ref, tol) << name(dt) << " M " << s.M << " N " << s.N << " K " << s.K
                                                 << " at (" << m << ", " << n << ")";
      }
      for (int64_t n = s.N; n < op.ldc; ++n)
        ASSERT_TRUE(std::isnan(c[m * op.ldc + n])) << "wrote past N at (" << m << ", " << n << ")";
    }
  }
}

// The documented order, written out: 16 lanes, lane j the fused sum over k = j, j + 16, ... in
// order, then the halves added pairwise (lane i + lane i + 8, then + 4, + 2, + 1). Bit for bit,
// so the AVX-512 kernel, the AVX2 one and the portable loop agree wherever each runs (this CPU
// runs each it has). bfloat16 on VDPBF16PS sums pairs in the instruction's own order
// (FewRows.SumsMatchFloat64WithinFloat32Rounding covers it there).
TEST_P(FewRows, EachSumIsSixteenFusedLanesAddedPairwise) {
  const int dt = dtype();
  if (moe::cpu::few_rows_paired(dt, isa()))
    GTEST_SKIP() << "bfloat16 runs on VDPBF16PS on this CPU: pairs summed in its own order";
  uint64_t seed = 50;
  for (const Shape &s : kShapes) {
    const Operands op(dt, isa(), s, seed++);
    const std::vector<float> c = op.run();
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n) {
        float lanes[16] = {};
        for (int64_t k = 0; k < s.K; ++k)
          lanes[k % 16] = std::fma(op.w[n * op.ldw + k], op.x[m * op.ldx + k], lanes[k % 16]);
        for (int width = 8; width >= 1; width /= 2)
          for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
        ASSERT_EQ(c[m * op.ldc + n], lanes[0]) << shape_name(dt, s) << " at (" << m << ", " << n << ")";
      }
  }
}

TEST_P(FewRows, EachOutputIsTheSameSumAloneOrAmongOthers) {
  const int dt = dtype();
  uint64_t seed = 100;
  for (const Shape &s : kShapes) {
    const Operands op(dt, isa(), s, seed++);
    const std::vector<float> all = op.run();
    // Every input row alone (a group of one) and every weight row alone (no block of four).
    for (int64_t m = 0; m < s.M; ++m) {
      const std::vector<float> row = op.run(m, 1, 0, s.N);
      ASSERT_EQ(0, std::memcmp(&row[m * op.ldc], &all[m * op.ldc], s.N * sizeof(float)))
          << name(dt) << " M " << s.M << " N " << s.N << " K " << s.K << ": input row " << m;
    }
    for (int64_t n = 0; n < s.N; n += 3) {
      const std::vector<float> col = op.run(0, s.M, n, 1);
      for (int64_t m = 0; m < s.M; ++m)
        ASSERT_EQ(0, std::memcmp(&col[m * op.ldc + n], &all[m * op.ldc + n], sizeof(float)))
            << name(dt) << " M " << s.M << " N " << s.N << " K " << s.K << ": weight row " << n << ", input row "
            << m;
    }
  }
}

TEST_P(FewRows, SameBitsForAnyThreadCount) {
  const int dt = dtype();
  // 16 chunks of 64 weight rows; of long rows 25 chunks of 4 (float32) or 9 to 25 (16-bit); and
  // 65 chunks of 64, claimed in runs: several per thread, in whatever order the threads come.
  for (const Shape s : {Shape{9, 1000, 300}, Shape{14, 99, 9000}, Shape{3, 4100, 64}}) {
    const Operands op(dt, isa(), s, 7);
    expect_same_bits_at_1_and_3_threads([&] { return op.run(); }, shape_name(dt, s));
  }
}

// Input rows whose stride is a multiple of 4 KB are copied to a wider stride for a pass of more
// than four (cpu/few_rows.cpp, PaddedRows): the same bits as each row computed alone (never
// copied), for strides of 4 KB, 8 KB, and rows too long to copy.
TEST_P(FewRows, InputRowsAtStridesOf4KBGiveTheSameBits) {
  const int dt = dtype();
  const int64_t es = static_cast<int64_t>(moe_test::dtype_size(dt));
  struct Case {
    Shape s;
    int64_t ldx_bytes;
  };
  for (const Case c : {Case{{16, 70, 1000}, 4096}, Case{{6, 9, 1024}, 4096}, Case{{11, 33, 2000}, 8192},
                       Case{{7, 5, 9000}, 40960}}) {
    const Operands op(dt, isa(), c.s, 11, c.ldx_bytes / es);
    const std::vector<float> all = op.run();
    for (int64_t m = 0; m < c.s.M; ++m) {
      const std::vector<float> row = op.run(m, 1, 0, c.s.N);
      ASSERT_EQ(0, std::memcmp(&row[m * op.ldc], &all[m * op.ldc], c.s.N * sizeof(float)))
          << shape_name(dt, c.s) << " row stride " << c.ldx_bytes << " B: input row " << m;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, FewRows, kKernels, kernel_name);

// ---- the pairs layout of few_rows_xwt's bfloat16 inputs ----------------------------------------

// Every element where few_rows_pair_row says (pieces of 16, each next to its partner row's), the
// tails and the partner of an odd M's last row zero, and nothing past few_rows_pairs_size; the
// same bytes whichever order the rows are written in.
TEST(FewRowsPairs, EachRowInPiecesNextToItsPartnerTailsAndPaddingZero) {
  for (const Shape s : {Shape{1, 0, 16}, Shape{2, 0, 17}, Shape{5, 0, 33}, Shape{6, 0, 1}, Shape{7, 0, 100}}) {
    const int64_t size = moe::cpu::few_rows_pairs_size(s.M, s.K), pieces = (s.K + 15) / 16;
    ASSERT_GE(size, (s.M + 1) / 2 * pieces * 32) << shape_name(MOE_DTYPE_BF16, s);
    std::vector<uint16_t> x(static_cast<size_t>(s.M * s.K));
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(0x3F80 + i % 1000);
    const uint16_t sentinel = 0xFFFF;  // a NaN: no row writes it
    std::vector<uint16_t> forward(static_cast<size_t>(size) + 8, sentinel), backward = forward;
    for (int64_t i = 0; i < s.M; ++i) moe::cpu::few_rows_pair_row(x.data() + i * s.K, s.K, s.M, i, forward.data());
    for (int64_t i = s.M - 1; i >= 0; --i)
      moe::cpu::few_rows_pair_row(x.data() + i * s.K, s.K, s.M, i, backward.data());
    EXPECT_EQ(forward, backward) << shape_name(MOE_DTYPE_BF16, s);
    const int64_t stride = size / ((s.M + 1) / 2);
    for (int64_t m = 0; m < s.M + s.M % 2; ++m)
      for (int64_t k = 0; k < pieces * 16; ++k) {
        const uint16_t want = m < s.M && k < s.K ? x[m * s.K + k] : 0;
        ASSERT_EQ(forward[m / 2 * stride + k / 16 * 32 + m % 2 * 16 + k % 16], want)
            << shape_name(MOE_DTYPE_BF16, s) << " row " << m << " k " << k;
      }
    for (size_t i = static_cast<size_t>(size); i < forward.size(); ++i)
      ASSERT_EQ(forward[i], sentinel) << "wrote past the size";
  }
}

// A product whose X is not in the layout its dtype is read in is refused before any work.
TEST(FewRowsPairs, BatchRefusesAProductInTheWrongLayout) {
  std::vector<uint16_t> x(64 * 4, 0x3F80), w(64 * 64, 0x3F80);
  std::vector<float> c(4 * 64, 7.0f);
  const bool paired = moe::cpu::few_rows_paired(MOE_DTYPE_BF16);
  const moe::cpu::XwtProduct wrong{x.data(), 64, w.data(), 64, 4, 64, 64, c.data(), 64, !paired};
  EXPECT_THROW(moe::cpu::XwtBatch(&wrong, 1, MOE_DTYPE_BF16), std::logic_error);
  const moe::cpu::XwtProduct f32{x.data(), 32, w.data(), 32, 4, 64, 32, c.data(), 64, true};
  EXPECT_THROW(moe::cpu::XwtBatch(&f32, 1, MOE_DTYPE_F32), std::logic_error);
  if (paired) {  // rows past the columns are rows, which bfloat16 is not read as here
    std::vector<float> xt(static_cast<size_t>(moe::cpu::few_rows_columns_size(8, 64)), 1.0f);
    const moe::cpu::XwtProduct m2{xt.data(), 8, w.data(), 64, 8, 64, 64, c.data(), 64, false, true, x.data(), 64, 1};
    EXPECT_THROW(moe::cpu::XwtBatch(&m2, 1, MOE_DTYPE_BF16), std::logic_error);
  }
  for (float v : c) ASSERT_EQ(v, 7.0f);
}

// ---- the columns layout: XwtProduct::columns --------------------------------------------------

// Shapes past every tail of the columns kernel: input rows in passes of one to three vectors of 8
// (M 1-8, 9-16, 17-24, then 2 + 2, 3 + 2, 3 + 3), weight rows in tiles of 12, 6 or 4 and then 4,
// 2 and 1, in chunks of 12 to 60; k from 1 on (a bfloat16 row's last element is read alone), long
// rows (K 9000) and many chunks (N 4100).
const Shape kColumnShapes[] = {{1, 1, 1},    {1, 13, 2},   {3, 25, 17},   {8, 61, 33},   {9, 12, 64},
                               {16, 130, 100}, {17, 7, 31}, {24, 67, 257}, {25, 50, 16},  {33, 13, 48},
                               {40, 73, 95},  {48, 26, 1000}, {13, 30, 9000}, {5, 4100, 64}};

// The product of Operands over input rows [m0, m0 + rows) and weight rows [n0, n0 + cols), X laid
// out as columns, through an XwtBatch at op's level; C as Operands::run.
std::vector<float> run_columns(const Operands &op, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
  const int64_t es = static_cast<int64_t>(moe_test::dtype_size(op.dtype));
  std::vector<float> xt(static_cast<size_t>(moe::cpu::few_rows_columns_size(rows, op.s.K)), std::nanf(""));
  for (int64_t i = 0; i < rows; ++i)
    moe::cpu::few_rows_column(op.x.bytes.data() + (m0 + i) * op.ldx * es, op.dtype, op.s.K, rows, i, xt.data());
  std::vector<float> c(static_cast<size_t>(op.s.M * op.ldc), std::nanf(""));
  const moe::cpu::XwtProduct p{xt.data(), moe::cpu::few_rows_columns_ld(rows), op.w.bytes.data() + n0 * op.ldw * es,
                               op.ldw, rows, cols, op.s.K, c.data() + m0 * op.ldc + n0, op.ldc, false, true};
  moe::cpu::XwtBatch batch(&p, 1, op.dtype, op.isa);
#pragma omp parallel if (batch.chunks() > 1)
  batch.drain();
  return c;
}
std::vector<float> run_columns(const Operands &op) { return run_columns(op, 0, op.s.M, 0, op.s.N); }

// Every element of every row at k * ld + i, the columns past M zero, nothing past the size; the
// same floats whichever order the rows are written in.
TEST(FewRowsColumns, EachRowInItsColumnPaddingZero) {
  for (const int dt : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16})
    for (const Shape s : {Shape{1, 0, 5}, Shape{8, 0, 3}, Shape{9, 0, 300}, Shape{20, 0, 1}, Shape{3, 0, 257}}) {
      const int64_t ld = moe::cpu::few_rows_columns_ld(s.M), size = moe::cpu::few_rows_columns_size(s.M, s.K);
      ASSERT_EQ(ld % 8, 0);
      ASSERT_GE(ld, s.M);
      ASSERT_LT(ld, s.M + 8);
      ASSERT_EQ(size, s.K * ld);
      Rng rng(40 + s.M);
      const Stored x(dt, rng.nonzeros(static_cast<size_t>(s.M * s.K), 1.0f));
      const size_t es = moe_test::dtype_size(dt);
      std::vector<float> forward(static_cast<size_t>(size) + 8, std::nanf("")), backward = forward;
      for (int64_t i = 0; i < s.M; ++i)
        moe::cpu::few_rows_column(x.bytes.data() + i * s.K * es, dt, s.K, s.M, i, forward.data());
      for (int64_t i = s.M - 1; i >= 0; --i)
        moe::cpu::few_rows_column(x.bytes.data() + i * s.K * es, dt, s.K, s.M, i, backward.data());
      ASSERT_EQ(0, std::memcmp(forward.data(), backward.data(), forward.size() * sizeof(float))) << shape_name(dt, s);
      for (int64_t k = 0; k < s.K; ++k)
        for (int64_t i = 0; i < ld; ++i)
          ASSERT_EQ(forward[k * ld + i], i < s.M ? x[i * s.K + k] : 0.0f) << shape_name(dt, s) << " k " << k << " i " << i;
      for (size_t i = static_cast<size_t>(size); i < forward.size(); ++i)
        ASSERT_TRUE(std::isnan(forward[i])) << "wrote past the size";
    }
}

class FewRowsColumns : public KernelTest {};

// The documented order, written out: each sum over k in order, one fused multiply-add per term,
// from zero, bit for bit, at every level and for every dtype (no lane sums: bfloat16 too).
TEST_P(FewRowsColumns, EachSumIsTheFusedSumInOrderOfK) {
  const int dt = dtype();
  uint64_t seed = 300;
  for (const Shape &s : kColumnShapes) {
    const Operands op(dt, isa(), s, seed++);
    const std::vector<float> c = run_columns(op);
    for (int64_t m = 0; m < s.M; ++m) {
      for (int64_t n = 0; n < s.N; ++n) {
        float sum = 0.0f;
        for (int64_t k = 0; k < s.K; ++k) sum = std::fma(op.w[n * op.ldw + k], op.x[m * op.ldx + k], sum);
        ASSERT_EQ(c[m * op.ldc + n], sum) << shape_name(dt, s) << " at (" << m << ", " << n << ")";
      }
      for (int64_t n = s.N; n < op.ldc; ++n)
        ASSERT_TRUE(std::isnan(c[m * op.ldc + n])) << "wrote past N at (" << m << ", " << n << ")";
    }
  }
}

TEST_P(FewRowsColumns, EachOutputIsTheSameSumAloneOrAmongOthers) {
  const int dt = dtype();
  uint64_t seed = 400;
  for (const Shape &s : kColumnShapes) {
    if (s.N * s.K > 300000) continue;  // the long shapes: the sums above, once
    const Operands op(dt, isa(), s, seed++);
    const std::vector<float> all = run_columns(op);
    for (int64_t m = 0; m < s.M; m += 5) {
      const std::vector<float> row = run_columns(op, m, 1, 0, s.N);
      ASSERT_EQ(0, std::memcmp(&row[m * op.ldc], &all[m * op.ldc], s.N * sizeof(float)))
          << shape_name(dt, s) << ": input row " << m;
    }
    for (int64_t n = 0; n < s.N; n += 7) {
      const std::vector<float> col = run_columns(op, 0, s.M, n, 1);
      for (int64_t m = 0; m < s.M; ++m)
        ASSERT_EQ(0, std::memcmp(&col[m * op.ldc + n], &all[m * op.ldc + n], sizeof(float)))
            << shape_name(dt, s) << ": weight row " << n << ", input row " << m;
    }
  }
}

TEST_P(FewRowsColumns, SameBitsForAnyThreadCount) {
  const int dt = dtype();
  for (const Shape s : {Shape{20, 1000, 300}, Shape{13, 99, 9000}, Shape{40, 4100, 64}}) {
    const Operands op(dt, isa(), s, 9);
    expect_same_bits_at_1_and_3_threads([&] { return run_columns(op); }, shape_name(dt, s));
  }
}

// Products in columns and in rows as one stream of work: each the same bits as alone.
TEST_P(FewRowsColumns, BatchedWithProductsInRowsEachAsAlone) {
  const int dt = dtype();
  const FewRowsIsa level = isa();
  const Operands a(dt, level, Shape{12, 200, 300}, 21), b(dt, level, Shape{5, 130, 300}, 22);
  const int64_t es = static_cast<int64_t>(moe_test::dtype_size(dt));
  std::vector<float> xt(static_cast<size_t>(moe::cpu::few_rows_columns_size(a.s.M, a.s.K)));
  for (int64_t i = 0; i < a.s.M; ++i)
    moe::cpu::few_rows_column(a.x.bytes.data() + i * a.ldx * es, dt, a.s.K, a.s.M, i, xt.data());
  const bool paired = moe::cpu::few_rows_paired(dt, level);
  std::vector<uint16_t> pairs;
  if (paired) {
    pairs.resize(static_cast<size_t>(moe::cpu::few_rows_pairs_size(b.s.M, b.s.K)));
    for (int64_t i = 0; i < b.s.M; ++i)
      moe::cpu::few_rows_pair_row(b.x.bytes.data() + i * b.ldx * es, b.s.K, b.s.M, i, pairs.data());
  }
  std::vector<float> ca(static_cast<size_t>(a.s.M * a.ldc), std::nanf("")), cb(b.s.M * b.ldc, std::nanf(""));
  const moe::cpu::XwtProduct products[] = {
      {paired ? static_cast<const void *>(pairs.data()) : b.x.bytes.data(), b.ldx, b.w.bytes.data(), b.ldw, b.s.M, b.s.N,
       b.s.K, cb.data(), b.ldc, paired},
      {xt.data(), moe::cpu::few_rows_columns_ld(a.s.M), a.w.bytes.data(), a.ldw, a.s.M, a.s.N, a.s.K, ca.data(), a.ldc,
       false, true}};
  moe::cpu::XwtBatch batch(products, 2, dt, level);
#pragma omp parallel
  batch.drain();
  const std::vector<float> alone_a = run_columns(a), alone_b = b.run();
  EXPECT_EQ(0, std::memcmp(ca.data(), alone_a.data(), ca.size() * sizeof(float))) << "the product in columns";
  EXPECT_EQ(0, std::memcmp(cb.data(), alone_b.data(), cb.size() * sizeof(float))) << "the product in rows";
}

// Rows past the columns (M2) on the rows kernel: the columns' rows as in columns alone, the
// others as few_rows_xwt's, bit for bit.
TEST_P(FewRowsColumns, RowsPastTheColumnsAsTheRowsKernel) {
  const int dt = dtype();
  const FewRowsIsa level = isa();
  if (moe::cpu::few_rows_paired(dt, level)) GTEST_SKIP() << "bfloat16 rows in pairs on this CPU: not taken as M2 rows";
  const int64_t es = static_cast<int64_t>(moe_test::dtype_size(dt));
  for (const Shape s : {Shape{17, 130, 100}, Shape{20, 61, 1000}, Shape{27, 25, 33}}) {
    const Operands op(dt, level, s, 31);
    const int64_t n = s.M / 8 * 8;
    std::vector<float> xt(static_cast<size_t>(moe::cpu::few_rows_columns_size(n, s.K)));
    for (int64_t i = 0; i < n; ++i)
      moe::cpu::few_rows_column(op.x.bytes.data() + i * op.ldx * es, dt, s.K, n, i, xt.data());
    std::vector<float> c(static_cast<size_t>(s.M * op.ldc), std::nanf(""));
    const moe::cpu::XwtProduct p{xt.data(), moe::cpu::few_rows_columns_ld(n), op.w.bytes.data(), op.ldw, n, s.N, s.K,
                                 c.data(), op.ldc, false, true, op.x.bytes.data() + n * op.ldx * es, op.ldx, s.M - n};
    moe::cpu::XwtBatch batch(&p, 1, dt, level);
#pragma omp parallel
    batch.drain();
    const std::vector<float> columns = run_columns(op, 0, n, 0, s.N), rows = op.run(n, s.M - n, 0, s.N);
    EXPECT_EQ(0, std::memcmp(c.data(), columns.data(), n * op.ldc * sizeof(float))) << shape_name(dt, s);
    EXPECT_EQ(0, std::memcmp(c.data() + n * op.ldc, rows.data() + n * op.ldc, (s.M - n) * op.ldc * sizeof(float)))
        << shape_name(dt, s);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, FewRowsColumns, kKernels, kernel_name);

// ---- few_rows_xw: C (+)= X W, W [K, N] read along its rows ---------------------------------------

// Shapes past every tail of its tiles (input rows in sixes; columns in 64, 32, 16 and a partial
// vector) and of its chunks of columns (K 9000: chunks of 16 columns, many per thread); on AVX2,
// of its strips (7 to 64 rows: pieces of 32 k, 128 columns a chunk; 65 rows in place again).
const Shape kXwShapes[] = {{1, 1, 1},   {1, 17, 5},   {2, 64, 32},  {3, 100, 33}, {5, 131, 64},
                           {6, 48, 100}, {7, 95, 31},  {13, 70, 64}, {16, 257, 300}, {25, 16, 16},
                           {4, 3, 48},   {14, 67, 9000}, {64, 130, 70}, {65, 20, 40}};

// X and W in dtype, C with a random start (accumulate adds to it).
struct XwOperands {
  int dtype;
  FewRowsIsa isa;
  Shape s;
  int64_t ldx, ldw, ldc;
  Rng rng;
  Stored x, w;
  std::vector<float> c0;

  XwOperands(int dt, FewRowsIsa level, Shape sh, uint64_t seed)
      : dtype(dt), isa(level), s(sh), ldx(sh.K + 3), ldw(sh.N + 5), ldc(sh.N + 2), rng(seed),
        x(dt, rng.nonzeros(static_cast<size_t>(s.M * ldx), 1.0f)),
        w(dt, rng.nonzeros(static_cast<size_t>(s.K * ldw), 0.5f)),
        c0(rng.nonzeros(static_cast<size_t>(s.M * ldc), 2.0f)) {}
  std::vector<float> run(bool accumulate) const {
    std::vector<float> c = c0;
    moe::cpu::few_rows_xw(x.bytes.data(), ldx, w.bytes.data(), ldw, dtype, s.M, s.N, s.K, c.data(), ldc, accumulate, isa);
    return c;
  }
};

class FewRowsXw : public KernelTest {};

// The documented order, written out: each sum over k in order, one fused multiply-add per term,
// then C + sum once. Bit for bit, so any blocking, tile or thread gives these bits. bfloat16 on
// VDPBF16PS (pairs of k): within float32 rounding of the float64 sum instead, on the same shapes.
TEST_P(FewRowsXw, EachSumIsTheFusedSumInOrderOfK) {
  const int dt = dtype();
  uint64_t seed = 200;
  for (const Shape &s : kXwShapes)
    for (bool accumulate : {false, true}) {
      const XwOperands op(dt, isa(), s, seed++);
      const std::vector<float> c = op.run(accumulate);
      for (int64_t m = 0; m < s.M; ++m) {
        for (int64_t n = 0; n < s.N; ++n) {
          float sum = 0.0f;
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < s.K; ++k) {
            sum = std::fma(op.x[m * op.ldx + k], op.w[k * op.ldw + n], sum);
            ref += static_cast<double>(op.x[m * op.ldx + k]) * op.w[k * op.ldw + n];
            mag += std::fabs(static_cast<double>(op.x[m * op.ldx + k]) * op.w[k * op.ldw + n]);
          }
          const float want = accumulate ? op.c0[m * op.ldc + n] + sum : sum;
          const std::string at = name(dt) + " M " + std::to_string(s.M) + " N " + std::to_string(s.N) + " K " +
                                 std::to_string(s.K) + (accumulate ? " accumulate" : "") + " at (" +
                                 std::to_string(m) + ", " + std::to_string(n) + ")";
          if (moe::cpu::few_rows_paired(dt, isa())) {  // VDPBF16PS: pairs of k in its own order
            const double c0 = accumulate ? op.c0[m * op.ldc + n] : 0.0;
            ASSERT_NEAR(c[m * op.ldc + n], c0 + ref,
                        (static_cast<double>(s.K) + 4) * std::ldexp(mag, -24) + std::ldexp(std::fabs(c0 + ref), -23))
                << at;
          } else {
            ASSERT_EQ(c[m * op.ldc + n], want) << at;
          }
        }
        for (int64_t n = s.N; n < op.ldc; ++n)
          ASSERT_EQ(c[m * op.ldc + n], op.c0[m * op.ldc + n]) << "wrote past N at (" << m << ", " << n << ")";
      }
    }
}

// Against float64 sums, so that the written-out order above is itself a product.
TEST_P(FewRowsXw, SumsMatchFloat64WithinFloat32Rounding) {
  const int dt = dtype();
  const XwOperands op(dt, isa(), Shape{16, 300, 1024}, 7);
  const std::vector<float> c = op.run(false);
  for (int64_t m = 0; m < op.s.M; ++m)
    for (int64_t n = 0; n < op.s.N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < op.s.K; ++k) {
        const double p = static_cast<double>(op.x[m * op.ldx + k]) * op.w[k * op.ldw + n];
        ref += p;
        mag += std::fabs(p);
      }
      ASSERT_NEAR(c[m * op.ldc + n], ref, (static_cast<double>(op.s.K) + 4) * std::ldexp(mag, -24))
          << name(dt) << " at (" << m << ", " << n << ")";
    }
}

TEST_P(FewRowsXw, SameBitsForAnyThreadCount) {
  const int dt = dtype();
  for (const Shape s : {Shape{9, 1000, 300}, Shape{14, 99, 9000}}) {
    const XwOperands op(dt, isa(), s, 9);
    expect_same_bits_at_1_and_3_threads([&] { return op.run(true); }, shape_name(dt, s));
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, FewRowsXw, kKernels, kernel_name);

// ---- few_rows_grad: G += A^T B ---------------------------------------------------------------------

// Shapes past every tail (gradient rows in fours, columns in 64, 32, 16 and a partial vector) and
// of the chunks (K 9000: 4 float32 or 12 16-bit gradient rows a chunk).
const Shape kGradShapes[] = {{1, 1, 1},    {1, 5, 17},   {2, 4, 64},   {3, 67, 33},   {5, 130, 100},
                             {16, 64, 1024}, {7, 9, 31},  {13, 70, 95}, {32, 131, 48}, {14, 10, 9000}};

// A [M, N] and B [M, K] float32, G [N, K] in dtype holding random values to add to.
struct GradOperands {
  int dtype;
  FewRowsIsa isa;
  Shape s;  // M input rows, N gradient rows, K columns
  int64_t lda, ldb, ldg;
  Rng rng;
  std::vector<float> a, b;
  Stored g0;

  GradOperands(int dt, FewRowsIsa level, Shape sh, uint64_t seed)
      : dtype(dt), isa(level), s(sh), lda(sh.N + 3), ldb(sh.K + 1), ldg(sh.K + 5), rng(seed),
        a(rng.nonzeros(static_cast<size_t>(s.M * lda), 1.0f)), b(rng.nonzeros(static_cast<size_t>(s.M * ldb), 1.0f)),
        g0(dt, rng.nonzeros(static_cast<size_t>(s.N * ldg), 4.0f)) {}
  std::vector<float> run() const {
    std::vector<unsigned char> g = g0.bytes;
    moe::cpu::few_rows_grad(a.data(), lda, b.data(), ldb, s.M, g.data(), ldg, dtype, s.N, s.K, isa);
    return moe_test::decode(dtype, g);
  }
};

class FewRowsGrad : public KernelTest {};

// The documented order, written out: each sum over m in order, one fused multiply-add per term,
// then added to G and rounded to its dtype once. Bit for bit; columns past K untouched.
TEST_P(FewRowsGrad, EachSumIsTheFusedSumInOrderOfRowsAddedOnce) {
  const int dt = dtype();
  uint64_t seed = 300;
  for (const Shape &s : kGradShapes) {
    const GradOperands op(dt, isa(), s, seed++);
    const std::vector<float> g = op.run();
    for (int64_t j = 0; j < s.N; ++j) {
      for (int64_t k = 0; k < s.K; ++k) {
        float sum = 0.0f;
        for (int64_t m = 0; m < s.M; ++m) sum = std::fma(op.a[m * op.lda + j], op.b[m * op.ldb + k], sum);
        const float want = moe_test::rounded(dt, std::vector<float>{op.g0[j * op.ldg + k] + sum})[0];
        ASSERT_EQ(g[j * op.ldg + k], want) << name(dt) << " M " << s.M << " N " << s.N << " K " << s.K << " at ("
                                           << j << ", " << k << ")";
      }
      for (int64_t k = s.K; k < op.ldg; ++k)
        ASSERT_EQ(g[j * op.ldg + k], op.g0[j * op.ldg + k]) << "wrote past K at (" << j << ", " << k << ")";
    }
  }
}

TEST_P(FewRowsGrad, SameBitsForAnyThreadCount) {
  const int dt = dtype();
  for (const Shape s : {Shape{9, 1000, 300}, Shape{14, 99, 9000}}) {
    const GradOperands op(dt, isa(), s, 11);
    expect_same_bits_at_1_and_3_threads([&] { return op.run(); }, shape_name(dt, s));
  }
}

// Several gradients as one stream (an expert's dW2, dW1, dW3: each chunk's next one may belong to
// the next gradient): each G as few_rows_grad leaves it alone, bit for bit, at 1 and 3 threads;
// an empty gradient in the stream changes nothing. The shapes' chunks end mid-stream (K 9000: 4
// or 12 rows a chunk) and one gradient has a single chunk.
TEST_P(FewRowsGrad, StreamOfGradientsSameBitsAsEachAlone) {
  const int dt = dtype();
  const GradOperands ops[] = {GradOperands(dt, isa(), Shape{9, 70, 9000}, 21), GradOperands(dt, isa(), Shape{9, 3, 40}, 22),
                              GradOperands(dt, isa(), Shape{9, 0, 16}, 23), GradOperands(dt, isa(), Shape{9, 131, 300}, 24)};
  std::vector<std::vector<float>> alone;
  for (const GradOperands &op : ops) alone.push_back(op.run());
  for (int threads : {1, 3}) {
    std::vector<std::vector<unsigned char>> g;
    std::vector<moe::cpu::GradProduct> stream;
    for (const GradOperands &op : ops) g.push_back(op.g0.bytes);
    for (size_t i = 0; i < g.size(); ++i) {
      const GradOperands &op = ops[i];
      stream.push_back({op.a.data(), op.lda, op.b.data(), op.ldb, op.s.M, g[i].data(), op.ldg, op.s.N, op.s.K});
    }
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    moe::cpu::few_rows_grads(stream.data(), static_cast<int64_t>(stream.size()), dt, isa());
    omp_set_num_threads(before);
    for (size_t i = 0; i < g.size(); ++i) {
      const std::vector<float> got = moe_test::decode(dt, g[i]);
      ASSERT_EQ(got.size(), alone[i].size());
      for (size_t e = 0; e < got.size(); ++e)
        ASSERT_EQ(std::memcmp(&got[e], &alone[i][e], sizeof(float)), 0)
            << name(dt) << " gradient " << i << " element " << e << " at " << threads << " threads: " << got[e]
            << " against " << alone[i][e] << " alone";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, FewRowsGrad, kKernels, kernel_name);

// A level the CPU lacks is refused before any work: std::invalid_argument, outputs untouched.
TEST(FewRowsIsaLevels, ALevelTheCpuLacksIsRefusedBeforeAnyWork) {
  const FewRowsIsa best = moe::cpu::few_rows_best_isa();
  if (best == FewRowsIsa::avx512) GTEST_SKIP() << "this CPU has every level";
  const auto lacking = static_cast<FewRowsIsa>(static_cast<int>(best) + 1);
  std::vector<float> x(4 * 64, 1.0f), w(64 * 64, 0.5f), c(4 * 64, 7.0f), g(64 * 64, 3.0f);
  EXPECT_THROW(moe::cpu::few_rows_xwt(x.data(), 64, w.data(), 64, MOE_DTYPE_F32, 4, 64, 64, c.data(), 64, lacking),
               std::invalid_argument);
  EXPECT_THROW(moe::cpu::few_rows_xw(x.data(), 64, w.data(), 64, MOE_DTYPE_F32, 4, 64, 64, c.data(), 64, true, lacking),
               std::invalid_argument);
  EXPECT_THROW(moe::cpu::few_rows_grad(x.data(), 64, x.data(), 64, 4, g.data(), 64, MOE_DTYPE_F32, 64, 64, lacking),
               std::invalid_argument);
  const moe::cpu::XwtProduct p{x.data(), 64, w.data(), 64, 4, 64, 64, c.data(), 64, false};
  EXPECT_THROW(moe::cpu::XwtBatch(&p, 1, MOE_DTYPE_F32, lacking), std::invalid_argument);
  for (float v : c) ASSERT_EQ(v, 7.0f);
  for (float v : g) ASSERT_EQ(v, 3.0f);
}

// ---- few_rows_grad_bf16: G += A^T B, all bfloat16, on VDPBF16PS ------------------------------------

// A [M, N], B [M, K] and G [N, K] bfloat16 (strides past their widths), from values given.
struct Bf16GradOperands {
  Shape s;
  int64_t lda, ldb, ldg;
  Stored a, b, g0;

  template <class Values>
  Bf16GradOperands(Shape sh, Values &&values)
      : s(sh), lda(sh.N + 3), ldb(sh.K + 1), ldg(sh.K + 5), a(MOE_DTYPE_BF16, values(s.M * lda)),
        b(MOE_DTYPE_BF16, values(s.M * ldb)), g0(MOE_DTYPE_BF16, values(s.N * ldg)) {}
  std::vector<float> run() const {
    std::vector<unsigned char> g = g0.bytes;
    std::vector<uint32_t> scratch(static_cast<size_t>(moe::cpu::few_rows_grad_bf16_scratch(s.M, s.N, s.K)));
    moe::cpu::few_rows_grad_bf16(a.bytes.data(), lda, b.bytes.data(), ldb, s.M, g.data(), ldg, s.N, s.K,
                                 scratch.data());
    return moe_test::decode(MOE_DTYPE_BF16, g);
  }
  // G + A^T B at (j, k) in float64, and the sum of the products' magnitudes.
  double exact(int64_t j, int64_t k, double *mag) const {
    double sum = 0;
    *mag = 0;
    for (int64_t m = 0; m < s.M; ++m) {
      const double p = static_cast<double>(a[m * lda + j]) * b[m * ldb + k];
      sum += p;
      *mag += std::fabs(p);
    }
    return g0[j * ldg + k] + sum;
  }
};

bool have_bf16_dot() { return __builtin_cpu_supports("avx512bf16"); }

// Small integers: every product and partial sum exact in float32, so whatever the order of the
// pairs the sum is the exact one, added to G and rounded to bfloat16 once. Bit for bit, over the
// tails of rows (odd M), tiles and chunks; columns past K untouched.
TEST(FewRowsGradBf16, IntegerSumsAreExactAddedToGAndRoundedOnce) {
  if (!have_bf16_dot()) GTEST_SKIP() << "no AVX512-BF16 on this CPU: few_rows_grad_bf16 is not used here";
  uint64_t seed = 500;
  for (const Shape &s : kGradShapes) {
    Rng rng(seed++);
    const Bf16GradOperands op(s, [&](int64_t n) { return rng.ints(static_cast<size_t>(n), -7, 7); });
    const std::vector<float> g = op.run();
    for (int64_t j = 0; j < s.N; ++j) {
      for (int64_t k = 0; k < s.K; ++k) {
        double mag;
        const float exact = static_cast<float>(op.exact(j, k, &mag));  // an integer float32 holds
        const float want = moe_test::rounded(MOE_DTYPE_BF16, std::vector<float>{exact})[0];
        ASSERT_EQ(g[j * op.ldg + k], want) << shape_name(MOE_DTYPE_BF16, s) << " at (" << j << ", " << k << ")";
      }
      for (int64_t k = s.K; k < op.ldg; ++k)
        ASSERT_EQ(g[j * op.ldg + k], op.g0[j * op.ldg + k]) << "wrote past K at (" << j << ", " << k << ")";
    }
  }
}

// Random values: within the float32 rounding of the sums and one bfloat16 rounding of the result.
TEST(FewRowsGradBf16, SumsMatchFloat64WithinRounding) {
  if (!have_bf16_dot()) GTEST_SKIP() << "no AVX512-BF16 on this CPU: few_rows_grad_bf16 is not used here";
  for (const Shape &s : {Shape{12, 300, 1024}, Shape{5, 67, 100}}) {
    Rng rng(17);
    const Bf16GradOperands op(s, [&](int64_t n) { return rng.nonzeros(static_cast<size_t>(n), 1.0f); });
    const std::vector<float> g = op.run();
    for (int64_t j = 0; j < s.N; ++j)
      for (int64_t k = 0; k < s.K; ++k) {
        double mag;
        const double want = op.exact(j, k, &mag);
        ASSERT_NEAR(g[j * op.ldg + k], want,
                    (static_cast<double>(s.M) + 4) * std::ldexp(mag, -24) + std::ldexp(std::fabs(want), -8))
            << shape_name(MOE_DTYPE_BF16, s) << " at (" << j << ", " << k << ")";
      }
  }
}

TEST(FewRowsGradBf16, SameBitsForAnyThreadCount) {
  if (!have_bf16_dot()) GTEST_SKIP() << "no AVX512-BF16 on this CPU: few_rows_grad_bf16 is not used here";
  for (const Shape s : {Shape{9, 1000, 300}, Shape{12, 99, 9000}}) {
    Rng rng(23);
    const Bf16GradOperands op(s, [&](int64_t n) { return rng.nonzeros(static_cast<size_t>(n), 1.0f); });
    expect_same_bits_at_1_and_3_threads([&] { return op.run(); }, shape_name(MOE_DTYPE_BF16, s));
  }
}

}  // namespace
