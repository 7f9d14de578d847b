// The experts' bfloat16 products on AMX tiles (cpu/amx_gemm.h), in each of the four layouts (A
// as stored or transposed, B as stored or a weight [N, K]), on shapes that end in every tail of
// its blocking (rows past a block of 32, column pairs past a block of eight, k past a step of 32
// and a chunk of 256) with row strides wider than the rows: exact on small integers (every sum
// representable, so any order gives it), with and without adding to C; within float32 rounding
// of a float64 reference on random values; bfloat16 C the float32 sum (plus C's old value)
// rounded once; the same bits for any thread count; nothing written outside C's M x N and nothing
// read outside the operands (the gaps between rows hold NaN, which would spread to C even where
// a zero padding multiplies it). Skipped where the CPU has no AMX (or it is not granted).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/amx_gemm.h"
#include "moe/moe.h"
#include "support/half.h"
#include "support/random.h"

namespace {

using moe_test::bf16_to_f32;
using moe_test::f32_to_bf16;

struct Shape {
  int64_t M, N, K;
};
const Shape kShapes[] = {{1, 32, 1}, {31, 64, 45}, {33, 96, 288}, {100, 352, 547}, {515, 288, 1024}};
constexpr unsigned char kSentinel = 0xA5;
constexpr uint16_t kNaN = 0x7FC0;  // bfloat16 quiet NaN

// op(A) [M, K] and op(B) [K, N] stored as amx_gemm reads them, rows strided wider than they are
// (A: 33 elements more, B: 3, so rows start off a 4-byte boundary), the gaps NaN.
struct Problem {
  Shape s;
  bool a_trans, b_trans;
  int64_t lda, ldb, ldc;
  std::vector<uint16_t> a, b;
  std::vector<double> sum, magnitude;  // float64 sums of the stored values' products, and of |products|

  Problem(const Shape &shape, bool at, bool bt, const std::vector<float> &av, const std::vector<float> &bv)
      : s(shape), a_trans(at), b_trans(bt), ldc(shape.N + 5) {
    lda = (a_trans ? s.M : s.K) + 33;
    ldb = (b_trans ? s.K : s.N) + 3;
    a.assign((a_trans ? s.K : s.M) * lda, kNaN);
    b.assign((b_trans ? s.N : s.K) * ldb, kNaN);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t k = 0; k < s.K; ++k) a[a_at(m, k)] = f32_to_bf16(av[m * s.K + k]);
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t n = 0; n < s.N; ++n) b[b_at(k, n)] = f32_to_bf16(bv[k * s.N + n]);
    sum.assign(s.M * s.N, 0.0);
    magnitude.assign(s.M * s.N, 0.0);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t k = 0; k < s.K; ++k) {
        const double x = bf16_to_f32(a[a_at(m, k)]);
        for (int64_t n = 0; n < s.N; ++n) {
          const double p = x * bf16_to_f32(b[b_at(k, n)]);
          sum[m * s.N + n] += p;
          magnitude[m * s.N + n] += std::fabs(p);
        }
      }
  }
  int64_t a_at(int64_t m, int64_t k) const { return a_trans ? k * lda + m : m * lda + k; }
  int64_t b_at(int64_t k, int64_t n) const { return b_trans ? n * ldb + k : k * ldb + n; }

  // C ((M + 1) rows of ldc, of cdt) after amx_gemm on the current thread count: the sentinel
  // everywhere, but for C's M x N holding c0 (encoded in cdt) where accumulate.
  std::vector<unsigned char> run(int cdt, bool accumulate, const std::vector<float> &c0 = {}) const {
    const size_t es = cdt == MOE_DTYPE_F32 ? 4 : 2;
    std::vector<unsigned char> c((s.M + 1) * ldc * es, kSentinel);
    if (accumulate)
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < s.N; ++n) put(c, cdt, m * ldc + n, c0[m * s.N + n]);
    std::vector<unsigned char> work(moe::cpu::amx_gemm_work_bytes(s.M, s.N, s.K, omp_get_max_threads()));
    moe::cpu::amx_gemm(s.M, s.N, s.K, a.data(), lda, a_trans, b.data(), ldb, b_trans, c.data(), cdt, ldc, accumulate,
                       work.data());
    return c;
  }
  static void put(std::vector<unsigned char> &c, int cdt, int64_t i, float v) {
    if (cdt == MOE_DTYPE_F32) {
      std::memcpy(c.data() + i * 4, &v, 4);
    } else {
      const uint16_t h = f32_to_bf16(v);
      std::memcpy(c.data() + i * 2, &h, 2);
    }
  }
  static float get(const std::vector<unsigned char> &c, int cdt, int64_t i) {
    if (cdt == MOE_DTYPE_F32) {
      float v;
      std::memcpy(&v, c.data() + i * 4, 4);
      return v;
    }
    uint16_t h;
    std::memcpy(&h, c.data() + i * 2, 2);
    return bf16_to_f32(h);
  }
  // Every byte of C outside its M x N still the sentinel.
  void expect_untouched_outside(const std::vector<unsigned char> &c, int cdt) const {
    const size_t es = cdt == MOE_DTYPE_F32 ? 4 : 2;
    for (int64_t r = 0; r <= s.M; ++r)
      for (int64_t j = 0; j < ldc; ++j) {
        if (r < s.M && j < s.N) continue;
        for (size_t e = 0; e < es; ++e)
          ASSERT_EQ(c[(r * ldc + j) * es + e], kSentinel)
              << "C written outside the product at row " << r << ", column " << j;
      }
  }
};

std::string name(const Shape &s, bool at, bool bt) {
  return "M " + std::to_string(s.M) + " N " + std::to_string(s.N) + " K " + std::to_string(s.K) +
         (at ? " A^T" : " A") + (bt ? " B^T" : " B");
}

class AmxGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!moe::cpu::amx_gemm_available())
      GTEST_SKIP() << "this CPU has no AMX-BF16 (or oneDNN's ISA is capped below it, or the tile state is not granted)";
  }
  template <class F>
  static void each_case(F &&f) {
    for (const Shape &s : kShapes)
      for (bool at : {false, true})
        for (bool bt : {false, true}) {
          SCOPED_TRACE(name(s, at, bt));
          f(s, at, bt);
        }
  }
};

TEST_F(AmxGemm, ExactOnIntegersStoredOrAdded) {
  each_case([](const Shape &s, bool at, bool bt) {
    moe_test::Rng rng(s.M * 7 + s.K + at + 2 * bt);
    const Problem p(s, at, bt, rng.ints(s.M * s.K, -8, 8), rng.ints(s.K * s.N, -8, 8));
    const std::vector<float> c0 = rng.ints(s.M * s.N, -1000, 1000);
    const std::vector<unsigned char> stored = p.run(MOE_DTYPE_F32, false), added = p.run(MOE_DTYPE_F32, true, c0);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t i = m * p.ldc + n;
        ASSERT_EQ(Problem::get(stored, MOE_DTYPE_F32, i), static_cast<float>(p.sum[m * s.N + n])) << m << ", " << n;
        ASSERT_EQ(Problem::get(added, MOE_DTYPE_F32, i), static_cast<float>(c0[m * s.N + n] + p.sum[m * s.N + n]))
            << m << ", " << n;
      }
    p.expect_untouched_outside(stored, MOE_DTYPE_F32);
    p.expect_untouched_outside(added, MOE_DTYPE_F32);
  });
}

TEST_F(AmxGemm, NearFloat64AndBfloat16RoundedOnce) {
  each_case([](const Shape &s, bool at, bool bt) {
    moe_test::Rng rng(s.N * 5 + s.K + at + 2 * bt);
    const Problem p(s, at, bt, rng.uniforms(s.M * s.K), rng.uniforms(s.K * s.N));
    const std::vector<float> c0 = rng.uniforms(s.M * s.N, -4.0f, 4.0f);
    const std::vector<unsigned char> f = p.run(MOE_DTYPE_F32, false), fa = p.run(MOE_DTYPE_F32, true, c0);
    const std::vector<unsigned char> h = p.run(MOE_DTYPE_BF16, false), ha = p.run(MOE_DTYPE_BF16, true, c0);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t i = m * p.ldc + n, r = m * s.N + n;
        // float32 sums of K products: within K units of float32 rounding of the sum of magnitudes
        // (a term left out or counted twice is off by about 1 / K of it).
        const float v = Problem::get(f, MOE_DTYPE_F32, i);
        ASSERT_LE(std::fabs(v - p.sum[r]), std::ldexp(static_cast<double>(s.K), -24) * p.magnitude[r])
            << m << ", " << n << ": " << v << ", want " << p.sum[r];
        ASSERT_EQ(Problem::get(fa, MOE_DTYPE_F32, i), c0[r] + v) << m << ", " << n;
        ASSERT_EQ(Problem::get(h, MOE_DTYPE_BF16, i), bf16_to_f32(f32_to_bf16(v))) << m << ", " << n;
        const float old = bf16_to_f32(f32_to_bf16(c0[r]));
        ASSERT_EQ(Problem::get(ha, MOE_DTYPE_BF16, i), bf16_to_f32(f32_to_bf16(old + v))) << m << ", " << n;
      }
    p.expect_untouched_outside(f, MOE_DTYPE_F32);
    p.expect_untouched_outside(ha, MOE_DTYPE_BF16);
  });
}

TEST_F(AmxGemm, SameBitsForAnyThreadCount) {
  const int threads = omp_get_max_threads();
  each_case([threads](const Shape &s, bool at, bool bt) {
    moe_test::Rng rng(s.M + s.N + s.K + at + 2 * bt);
    const Problem p(s, at, bt, rng.uniforms(s.M * s.K), rng.uniforms(s.K * s.N));
    omp_set_num_threads(1);
    const std::vector<unsigned char> one = p.run(MOE_DTYPE_F32, false);
    for (int t : {2, 3}) {
      omp_set_num_threads(t);
      EXPECT_EQ(p.run(MOE_DTYPE_F32, false), one) << t << " threads";
    }
    omp_set_num_threads(threads);
  });
}

}  // namespace
