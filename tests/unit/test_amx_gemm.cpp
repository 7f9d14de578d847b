// The forward's bfloat16 X W^T on AMX tiles (cpu/amx_gemm.h), on shapes that end in every tail of
// its blocking (rows past a block of 32, column pairs past a block of eight, k past a chunk of
// 256) with row strides wider than the rows: exact on small integers (every sum representable, so
// any order gives it), within float32 rounding of a float64 reference on random values, the
// bfloat16 output the float32 one rounded once, the same bits for any thread count, and nothing
// written outside C's M x N. Skipped where the CPU has no AMX (or it is not granted).
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

struct Shape {
  int64_t M, N, K;
};
const Shape kShapes[] = {{1, 32, 32}, {31, 64, 64}, {33, 96, 288}, {100, 352, 544}, {515, 288, 1024}};

// A problem with strides wider than its rows: ldx K + 33, ldw K + 3 (rows off a 4-byte boundary),
// ldc N + 5; C has a row more
// than M, and every element outside the product starts as a sentinel.
struct Problem {
  Shape s;
  int64_t ldx, ldw, ldc;
  std::vector<uint16_t> x, w;
  std::vector<float> xv, wv;  // the same values as float32 (0 in the gaps)

  Problem(const Shape &shape, std::vector<float> xs, std::vector<float> ws)
      : s(shape), ldx(shape.K + 33), ldw(shape.K + 3), ldc(shape.N + 5) {
    x.assign(s.M * ldx, moe_test::f32_to_bf16(1e30f));
    w.assign(s.N * ldw, moe_test::f32_to_bf16(1e30f));
    xv.assign(x.size(), 0.0f);
    wv.assign(w.size(), 0.0f);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t k = 0; k < s.K; ++k) {
        x[m * ldx + k] = moe_test::f32_to_bf16(xs[m * s.K + k]);
        xv[m * ldx + k] = moe_test::bf16_to_f32(x[m * ldx + k]);
      }
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        w[n * ldw + k] = moe_test::f32_to_bf16(ws[n * s.K + k]);
        wv[n * ldw + k] = moe_test::bf16_to_f32(w[n * ldw + k]);
      }
  }
  // C (of cdt, (M + 1) rows of ldc) after amx_xwt on the current thread count.
  std::vector<unsigned char> run(int cdt) const {
    const size_t es = cdt == MOE_DTYPE_F32 ? 4 : 2;
    std::vector<unsigned char> c((s.M + 1) * ldc * es, 0xA5);
    std::vector<unsigned char> work(moe::cpu::amx_xwt_work_bytes(s.M, s.N, s.K, omp_get_max_threads()));
    moe::cpu::amx_xwt(s.M, s.N, s.K, x.data(), ldx, w.data(), ldw, c.data(), cdt, ldc, work.data());
    return c;
  }
  double sum(int64_t m, int64_t n, bool magnitude) const {
    double v = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      const double p = static_cast<double>(xv[m * ldx + k]) * wv[n * ldw + k];
      v += magnitude ? std::fabs(p) : p;
    }
    return v;
  }
};

std::string name(const Shape &s) {
  return "M " + std::to_string(s.M) + " N " + std::to_string(s.N) + " K " + std::to_string(s.K);
}

float f32_at(const std::vector<unsigned char> &c, int64_t i) {
  float v;
  std::memcpy(&v, c.data() + i * 4, 4);
  return v;
}

// Every byte of C outside rows < M, columns < N still the sentinel.
void expect_untouched_outside(const std::vector<unsigned char> &c, const Problem &p, size_t es) {
  for (int64_t r = 0; r <= p.s.M; ++r)
    for (int64_t j = 0; j < p.ldc; ++j) {
      if (r < p.s.M && j < p.s.N) continue;
      for (size_t b = 0; b < es; ++b)
        ASSERT_EQ(c[(r * p.ldc + j) * es + b], 0xA5)
            << "C written outside the product at row " << r << ", column " << j;
    }
}

class AmxXwt : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!moe::cpu::amx_xwt_available())
      GTEST_SKIP() << "this CPU has no AMX-BF16 (or oneDNN's ISA is capped below it, or the tile state is not granted)";
  }
};

TEST_F(AmxXwt, ExactOnIntegers) {
  for (const Shape &s : kShapes) {
    SCOPED_TRACE(name(s));
    moe_test::Rng rng(s.M * 7 + s.K);
    const Problem p(s, rng.ints(s.M * s.K, -8, 8), rng.ints(s.N * s.K, -8, 8));
    const std::vector<unsigned char> c = p.run(MOE_DTYPE_F32);
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n)
        ASSERT_EQ(f32_at(c, m * p.ldc + n), static_cast<float>(p.sum(m, n, false))) << "at " << m << ", " << n;
    expect_untouched_outside(c, p, 4);
  }
}

TEST_F(AmxXwt, NearFloat64AndBfloat16IsTheFloat32SumRounded) {
  for (const Shape &s : kShapes) {
    SCOPED_TRACE(name(s));
    moe_test::Rng rng(s.N * 5 + s.K);
    const Problem p(s, rng.uniforms(s.M * s.K), rng.uniforms(s.N * s.K));
    const std::vector<unsigned char> c = p.run(MOE_DTYPE_F32), cb = p.run(MOE_DTYPE_BF16);
    // float32 sums of K products: each within K units of float32 rounding of the sum of
    // magnitudes (a term left out or counted twice is off by about 1 / K of that).
    for (int64_t m = 0; m < s.M; ++m)
      for (int64_t n = 0; n < s.N; ++n) {
        const double want = p.sum(m, n, false), tol = std::ldexp(static_cast<double>(s.K), -24) * p.sum(m, n, true);
        const float got = f32_at(c, m * p.ldc + n);
        ASSERT_LE(std::fabs(got - want), tol) << "at " << m << ", " << n << ": " << got << ", want " << want;
        uint16_t b;
        std::memcpy(&b, cb.data() + (m * p.ldc + n) * 2, 2);
        ASSERT_EQ(b, moe_test::f32_to_bf16(got)) << "bfloat16 at " << m << ", " << n;
      }
    expect_untouched_outside(c, p, 4);
    expect_untouched_outside(cb, p, 2);
  }
}

TEST_F(AmxXwt, SameBitsForAnyThreadCount) {
  const int threads = omp_get_max_threads();
  for (const Shape &s : kShapes) {
    SCOPED_TRACE(name(s));
    moe_test::Rng rng(s.M + s.N + s.K);
    const Problem p(s, rng.uniforms(s.M * s.K), rng.uniforms(s.N * s.K));
    omp_set_num_threads(1);
    const std::vector<unsigned char> one = p.run(MOE_DTYPE_F32);
    for (int t : {2, 3}) {
      omp_set_num_threads(t);
      EXPECT_EQ(p.run(MOE_DTYPE_F32), one) << t << " threads";
    }
    omp_set_num_threads(threads);
  }
}

}  // namespace
