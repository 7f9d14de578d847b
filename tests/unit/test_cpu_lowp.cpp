// The CPU stages with bfloat16/float16 storage. The row stages must give exactly what their
// float32 version gives on the widened inputs, rounded once where it stores: same sums in the same
// order, so the comparison is bit for bit. This pins down the plumbing (element sizes, offsets,
// which outputs are float32 and which are rounded, accumulation into gradients). The expert FFN
// runs 16-bit GEMMs (other sums, other order): it is held to a float64 reference that rounds where
// moe.h says the layer stores (h, g, a, y; dA, dh, dg, each weight gradient once, dx once), within
// two units in the last place.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/half.h"
#include "cpu/activation.h"
#include "support/compare.h"
#include "support/half.h"
#include "support/random.h"
#include "support/stages.h"

namespace {

using moe_test::Lowp;
using moe_test::narrow;
using moe_test::Rng;
using moe_test::same;

class CpuLowp : public moe_test::CpuBackendTest<::testing::TestWithParam<int>> {
 protected:
  int dt() const { return GetParam(); }
};

// A routing of T tokens over k slots each: rows in a shuffled order, a few slots dropped.
struct Routing {
  int64_t T = 13, k = 2, d = 12, R = 0;
  std::vector<int32_t> row_of_slot, row_token;
  std::vector<float> row_weight;
  explicit Routing(Rng &rng, int64_t width) : d(width) {
    std::vector<int32_t> slots;
    for (int32_t s = 0; s < T * k; ++s)
      if (s % 7 != 3) slots.push_back(s);  // dropped: slots 3, 10, 17, 24
    R = static_cast<int64_t>(slots.size());
    rng.shuffle(slots);
    row_of_slot.assign(T * k, -1);
    row_token.resize(R);
    for (int32_t r = 0; r < R; ++r) {
      row_of_slot[slots[r]] = r;
      row_token[r] = slots[r] / static_cast<int32_t>(k);
    }
    row_weight = rng.uniforms(R, 0.1f, 1.0f);
  }
  moe_rows_args args(int dtype) const {
    moe_rows_args a{};
    a.T = T;
    a.d = d;
    a.R = R;
    a.k = k;
    a.dtype = dtype;
    a.token_rows = row_of_slot.data();
    a.row_token = row_token.data();
    a.row_weight = row_weight.data();
    return a;
  }
};

TEST_P(CpuLowp, DispatchCopiesBits) {
  for (int64_t d : {12, 33}) {
    Rng rng(1);
    Routing r(rng, d);
    Lowp x(dt(), rng.uniforms(r.T * d)), xe(dt(), r.R * d);
    moe_rows_args a = r.args(dt());
    a.x = x.data();
    a.xe = xe.data();
    ASSERT_EQ(ops->dispatch(state, &a), MOE_OK) << err();
    for (int64_t row = 0; row < r.R; ++row)
      for (int64_t c = 0; c < d; ++c) ASSERT_EQ(xe.bits[row * d + c], x.bits[r.row_token[row] * d + c]);
  }
}

TEST_P(CpuLowp, CombineAndBackwardEqualFloat32OnWidenedRows) {
  Rng rng(2);
  Routing r(rng, 33);
  const int64_t d = r.d;
  Lowp ye(dt(), rng.uniforms(r.R * d)), dy(dt(), rng.uniforms(r.T * d)), dxe(dt(), rng.uniforms(r.R * d));
  std::vector<float> ye32 = ye.wide(), dy32 = dy.wide(), dxe32 = dxe.wide();

  std::vector<float> y(r.T * d, NAN), y32(r.T * d, NAN);
  moe_rows_args a = r.args(dt()), b = r.args(MOE_DTYPE_F32);
  a.ye = ye.data();
  a.y = y.data();
  b.ye = ye32.data();
  b.y = y32.data();
  ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
  ASSERT_EQ(ops->combine(state, &b), MOE_OK) << err();
  EXPECT_TRUE(same("y", y, y32));

  Lowp dye(dt(), r.R * d);
  std::vector<float> dye32(r.R * d), dw(r.R, NAN), dw32(r.R, NAN);
  a.dy = dy.data();
  a.dye = dye.data();
  a.drow_weight = dw.data();
  b.dy = dy32.data();
  b.dye = dye32.data();
  b.drow_weight = dw32.data();
  ASSERT_EQ(ops->combine_bwd(state, &a), MOE_OK) << err();
  ASSERT_EQ(ops->combine_bwd(state, &b), MOE_OK) << err();
  EXPECT_EQ(dye.bits, narrow(dt(), dye32));
  EXPECT_TRUE(same("dw", dw, dw32));

  std::vector<float> dx(r.T * d, NAN), dx32(r.T * d, NAN);
  a.dxe = dxe.data();
  a.dx = dx.data();
  b.dxe = dxe32.data();
  b.dx = dx32.data();
  ASSERT_EQ(ops->dispatch_bwd(state, &a), MOE_OK) << err();
  ASSERT_EQ(ops->dispatch_bwd(state, &b), MOE_OK) << err();
  EXPECT_TRUE(same("dx", dx, dx32));
  // Dropped-only tokens get zeros, not NaN: every output was written.
  for (float v : dx) ASSERT_TRUE(std::isfinite(v));
}

TEST_P(CpuLowp, SharedCombineAndBackward) {
  for (bool gated : {false, true}) {
    Rng rng(gated ? 3 : 4);
    const int64_t T = 9, d = 20, S = 2;
    Lowp x(dt(), rng.uniforms(T * d)), ys(dt(), rng.uniforms(S * T * d)), dy(dt(), rng.uniforms(T * d));
    std::vector<float> x32 = x.wide(), ys32 = ys.wide(), dy32 = dy.wide(), gw = rng.uniforms(d);
    const std::vector<float> y0 = rng.uniforms(T * d), dx0 = rng.uniforms(T * d), dg0 = rng.uniforms(d);
    std::vector<float> y = y0, y32 = y0, gate(T, NAN), gate32(T, NAN);
    moe_shared_args a = moe_test::shared_args(T, d, S, dt()), b = moe_test::shared_args(T, d, S);
    a.x = x.data();
    b.x = x32.data();
    a.gate_w = b.gate_w = gated ? gw.data() : nullptr;
    a.ys = ys.data();
    b.ys = ys32.data();
    a.gate = gate.data();
    b.gate = gate32.data();
    a.y = y.data();
    b.y = y32.data();
    ASSERT_EQ(ops->shared_combine(state, &a), MOE_OK) << err();
    ASSERT_EQ(ops->shared_combine(state, &b), MOE_OK) << err();
    EXPECT_TRUE(same("y", y, y32));
    if (gated) {
      EXPECT_TRUE(same("gate", gate, gate32));
    }
    Lowp dys(dt(), S * T * d);
    std::vector<float> dys32(S * T * d), dx = dx0, dx32 = dx0, dg = dg0, dg32 = dg0;
    a.dy = dy.data();
    b.dy = dy32.data();
    a.dys = dys.data();
    b.dys = dys32.data();
    a.dx = dx.data();
    b.dx = dx32.data();
    a.dgate_w = dg.data();
    b.dgate_w = dg32.data();
    ASSERT_EQ(ops->shared_combine_bwd(state, &a), MOE_OK) << err();
    ASSERT_EQ(ops->shared_combine_bwd(state, &b), MOE_OK) << err();
    EXPECT_EQ(dys.bits, narrow(dt(), dys32));
    EXPECT_TRUE(same("dx", dx, dx32));
    EXPECT_TRUE(same("dg", dg, dg32));
    if (gated) {
      EXPECT_FALSE(same("dgate_w", dg, dg0)) << "the gate's gradient was accumulated";
    }
  }
}

// The expert FFN of moe.h's precision rule in float64, from the stored (rounded) values.
struct FfnReference {
  int dtype, act;
  bool glu, shared;
  int64_t E, d, ff;
  const std::vector<int64_t> &offsets;
  std::vector<float> x, w1, w3, w2;

  float rd(double v) const { return moe::round_to(dtype, static_cast<float>(v)); }
  int64_t in_row(int64_t e, int64_t i) const { return shared ? i : offsets[e] + i; }
  int64_t out_row(int64_t e, int64_t i) const { return shared ? e * offsets[1] + i : offsets[e] + i; }
  int64_t rows(int64_t e) const { return shared ? offsets[1] : offsets[e + 1] - offsets[e]; }
  // h, g of one row, rounded, and a = act(h, g) rounded (the library's own activation kernel);
  // a_exact: a before that rounding.
  void pre(int64_t e, int64_t r_in, std::vector<float> &h, std::vector<float> &g, std::vector<float> &a,
           std::vector<float> &a_exact) const {
    h.assign(ff, 0.0f);
    g.assign(ff, 0.0f);
    a.assign(ff, 0.0f);
    for (int64_t j = 0; j < ff; ++j) {
      double sh = 0, sg = 0;
      for (int64_t k = 0; k < d; ++k) {
        sh += static_cast<double>(x[r_in * d + k]) * w1[(e * ff + j) * d + k];
        if (glu) sg += static_cast<double>(x[r_in * d + k]) * w3[(e * ff + j) * d + k];
      }
      h[j] = rd(sh);
      g[j] = rd(sg);
    }
    moe::cpu::activation_forward(act, h.data(), glu ? g.data() : nullptr, a.data(), ff);
    a_exact = a;
    for (float &v : a) v = rd(v);
  }
};

// |got - want| within two units in the last place of the dtype, relative to each value plus a
// share of the tensor's largest: a tenth for a sum over a row (what one differently rounded
// intermediate can move it by), half for a sum over many rows (weight gradients, dx), where such
// differences add up.
void expect_near_ulps(int dtype, const std::vector<float> &got, const std::vector<float> &want, const char *what,
                      double share = 0.1) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const double ulp2 = dtype == MOE_DTYPE_BF16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -10);
  double scale = 0;
  for (float v : want) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    const double tol = ulp2 * (std::fabs(static_cast<double>(want[i])) + share * scale);
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) {
      ADD_FAILURE() << what << "[" << i << "] is " << got[i] << ", want " << want[i] << " (tolerance " << tol << ")";
      ++bad;
    }
  }
}

// Expert FFN, routed (one expert empty) or shared (every expert reads all rows). rows_scale
// multiplies every expert's rows, so that both the bfloat16 kernels (few rows) and the float32
// copies (many rows) are covered.
// d, ff: small weights share one GEMM per row count; large ones get a GEMM per count (see
// src/cpu/expert_ffn.cpp): both are covered.
void expert_ffn_case(const moe_backend_ops *ops, void *state, int dtype, int activation, bool shared, int64_t rows_scale,
                     int64_t d, int64_t ff) {
  SCOPED_TRACE(std::string("activation ") + std::to_string(activation) + (shared ? " shared" : " routed") + " x" +
               std::to_string(rows_scale) + " d " + std::to_string(d) + " ff " + std::to_string(ff));
  Rng rng(10 + activation + (shared ? 100 : 0) + rows_scale + d);
  const bool glu = activation == MOE_ACT_SWIGLU || activation == MOE_ACT_GEGLU;
  const int64_t E = shared ? 2 : 4;
  std::vector<int64_t> offsets = shared ? std::vector<int64_t>{0, 7} : std::vector<int64_t>{0, 5, 5, 11, 19};
  for (int64_t &o : offsets) o *= rows_scale;
  const int64_t rows = shared ? offsets[1] : offsets.back();
  const int64_t out_rows = shared ? E * rows : rows;  // shared experts write E blocks of rows
  // Wider than the usual cases, the weights shrink as 1 / sqrt(width), as initialisations do, so
  // that h and y keep their size (and the tolerances their meaning).
  const float s1 = 0.3f * static_cast<float>(std::min(1.0, std::sqrt(96.0 / d)));
  const float s2 = 0.2f * static_cast<float>(std::min(1.0, std::sqrt(704.0 / ff)));
  Lowp x(dtype, rng.uniforms(rows * d)), w1(dtype, rng.uniforms(E * ff * d, -s1, s1)),
      w3(dtype, rng.uniforms(E * ff * d, -s1, s1)), w2(dtype, rng.uniforms(E * d * ff, -s2, s2)),
      dy(dtype, rng.uniforms(out_rows * d)), dw1(dtype, rng.uniforms(E * ff * d)), dw3(dtype, rng.uniforms(E * ff * d)),
      dw2(dtype, rng.uniforms(E * d * ff));
  const FfnReference ref{dtype, activation, glu, shared, E, d, ff, offsets, x.wide(), w1.wide(), w3.wide(), w2.wide()};

  Lowp h(dtype, out_rows * ff), g(dtype, out_rows * ff), a(dtype, out_rows * ff), y(dtype, out_rows * d);
  moe_ffn_args p{};
  p.num_experts = E;
  p.d = d;
  p.ff = ff;
  p.activation = activation;
  p.dtype = dtype;
  p.offsets = offsets.data();
  p.shared_input = shared;
  p.x = x.data();
  p.w1 = w1.data();
  p.w3 = glu ? w3.data() : nullptr;
  p.w2 = w2.data();
  p.h = h.data();
  p.g = glu ? g.data() : nullptr;
  p.a = a.data();
  p.y = y.data();
  ASSERT_EQ(ops->expert_ffn(state, &p), MOE_OK) << ops->last_error(state);

  // The reference forward, and its backward from the same stored pre-activations.
  const std::vector<float> dyw = dy.wide(), dw1w = dw1.wide(), dw3w = dw3.wide(), dw2w = dw2.wide();
  std::vector<float> rh(out_rows * ff), rg(out_rows * ff), ry(out_rows * d), ry_exact_a(out_rows * d);
  std::vector<double> sdw1(E * ff * d), sdw3(E * ff * d), sdw2(E * d * ff), sdx(rows * d);
  std::vector<float> hv, gv, av, av_exact, dh(ff), dg(ff);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < ref.rows(e); ++i) {
      const int64_t ri = ref.in_row(e, i), ro = ref.out_row(e, i);
      ref.pre(e, ri, hv, gv, av, av_exact);
      std::copy(hv.begin(), hv.end(), rh.begin() + ro * ff);
      std::copy(gv.begin(), gv.end(), rg.begin() + ro * ff);
      for (int64_t c = 0; c < d; ++c) {
        double s = 0;
        double s_exact = 0;
        for (int64_t j = 0; j < ff; ++j) {
          s += static_cast<double>(av[j]) * ref.w2[(e * d + c) * ff + j];
          s_exact += static_cast<double>(av_exact[j]) * ref.w2[(e * d + c) * ff + j];
        }
        ry[ro * d + c] = ref.rd(s);
        ry_exact_a[ro * d + c] = ref.rd(s_exact);
      }
      // dA = dY W2, rounded; dh, dg from it (the library's kernel), rounded.
      for (int64_t j = 0; j < ff; ++j) {
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += static_cast<double>(dyw[ro * d + c]) * ref.w2[(e * d + c) * ff + j];
        dh[j] = ref.rd(s);
      }
      moe::cpu::activation_backward(activation, hv.data(), glu ? gv.data() : nullptr, dh.data(),
                                    glu ? dg.data() : nullptr, ff);
      for (int64_t j = 0; j < ff; ++j) {
        dh[j] = ref.rd(dh[j]);
        dg[j] = ref.rd(dg[j]);
        for (int64_t c = 0; c < d; ++c) sdw2[(e * d + c) * ff + j] += static_cast<double>(dyw[ro * d + c]) * av[j];
        for (int64_t k = 0; k < d; ++k) {
          sdw1[(e * ff + j) * d + k] += static_cast<double>(dh[j]) * ref.x[ri * d + k];
          if (glu) sdw3[(e * ff + j) * d + k] += static_cast<double>(dg[j]) * ref.x[ri * d + k];
          sdx[ri * d + k] += static_cast<double>(dh[j]) * ref.w1[(e * ff + j) * d + k] +
                             (glu ? static_cast<double>(dg[j]) * ref.w3[(e * ff + j) * d + k] : 0.0);
        }
      }
    }
  expect_near_ulps(dtype, h.wide(), rh, "h");
  if (glu) expect_near_ulps(dtype, g.wide(), rg, "g");
  expect_near_ulps(dtype, y.wide(), ry, "y");
  // a is rounded before the W2 product: y is much nearer that than the unrounded a's product.
  // Told apart where a sum has few terms (with hundreds, y's own rounding hides the difference);
  // relu(h) needs no rounding at all.
  if (activation != MOE_ACT_RELU && ff <= 64) {
    double near = 0, far = 0;
    const std::vector<float> yw = y.wide();
    for (size_t i = 0; i < yw.size(); ++i) {
      near += (static_cast<double>(yw[i]) - ry[i]) * (static_cast<double>(yw[i]) - ry[i]);
      far += (static_cast<double>(yw[i]) - ry_exact_a[i]) * (static_cast<double>(yw[i]) - ry_exact_a[i]);
    }
    EXPECT_LT(near, 0.5 * far) << "y does not follow the rule that a is stored in the layer's dtype";
  }
  {  // An inference forward: h, g and a are scratch then (the backend may leave them transposed).
    Lowp hi(dtype, out_rows * ff), gi(dtype, out_rows * ff), ai(dtype, out_rows * ff), yi(dtype, out_rows * d);
    moe_ffn_args q = p;
    q.h = hi.data();
    q.g = glu ? gi.data() : nullptr;
    q.a = ai.data();
    q.y = yi.data();
    q.inference = 1;
    ASSERT_EQ(ops->expert_ffn(state, &q), MOE_OK) << ops->last_error(state);
    expect_near_ulps(dtype, yi.wide(), ry, "y (inference)");
  }

  Lowp dhb(dtype, out_rows * ff), dgb(dtype, out_rows * ff);
  const std::vector<float> dx0 = rng.uniforms(rows * d);
  Lowp dx(dtype, rows * d);
  std::vector<float> dxs = dx0;
  p.dy = dy.data();
  p.dh = dhb.data();
  p.dg = glu ? dgb.data() : nullptr;
  p.dw1 = dw1.data();
  p.dw3 = glu ? dw3.data() : nullptr;
  p.dw2 = dw2.data();
  p.dx = shared ? static_cast<void *>(dxs.data()) : dx.data();  // shared: float32, accumulated
  const std::vector<uint16_t> dw1_before = dw1.bits;
  ASSERT_EQ(ops->expert_ffn_bwd(state, &p), MOE_OK) << ops->last_error(state);
  std::vector<float> rdw1(E * ff * d), rdw3(E * ff * d), rdw2(E * d * ff), rdx(rows * d);
  for (size_t i = 0; i < rdw1.size(); ++i) {
    rdw1[i] = ref.rd(dw1w[i] + sdw1[i]);
    rdw3[i] = ref.rd(dw3w[i] + sdw3[i]);
    rdw2[i] = ref.rd(dw2w[i] + sdw2[i]);
  }
  for (size_t i = 0; i < rdx.size(); ++i)
    rdx[i] = shared ? static_cast<float>(dx0[i] + sdx[i]) : ref.rd(sdx[i]);  // shared dx is float32
  expect_near_ulps(dtype, dw1.wide(), rdw1, "dw1", 0.5);
  expect_near_ulps(dtype, dw2.wide(), rdw2, "dw2", 0.5);
  if (glu) expect_near_ulps(dtype, dw3.wide(), rdw3, "dw3", 0.5);
  EXPECT_NE(dw1.bits, dw1_before);
  expect_near_ulps(dtype, shared ? dxs : dx.wide(), rdx, "dx", 0.5);
}

TEST_P(CpuLowp, ExpertFfnEveryActivation) {
  for (int act : {MOE_ACT_SWIGLU, MOE_ACT_GEGLU, MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SILU})
    for (bool shared : {false, true})
      for (int64_t scale : {1, 9}) {
        expert_ffn_case(ops, state, dt(), act, shared, scale, 24, 40);
        expert_ffn_case(ops, state, dt(), act, shared, scale, 96, 704);
      }
  // Rows of x, then of a, 4 KB long: read through copies at a wider stride where few.
  for (bool shared : {false, true}) {
    expert_ffn_case(ops, state, dt(), MOE_ACT_SWIGLU, shared, 1, 2048, 40);
    expert_ffn_case(ops, state, dt(), MOE_ACT_SWIGLU, shared, 1, 48, 2048);
  }
  // Hundreds of rows per expert (485, 582, 776; shared 679, dx accumulated) and over a thousand
  // (1055, 1266, 1688): on CPUs with AMX the bfloat16 products of that many rows run on the tile
  // kernel (cpu/amx_gemm.h; d and ff multiples of 32), and so do the weight gradients of more
  // than 24 rows (45 to 72 above with d 96) and the backward's X W of any rows; there the
  // forward of 5 to 72 rows above runs as W X^T on oneDNN, and so do the products whose N (d or
  // ff: 24, 40, 48) is not a multiple of 32 (expert_ffn.cpp).
  for (bool shared : {false, true}) expert_ffn_case(ops, state, dt(), MOE_ACT_SWIGLU, shared, 97, 96, 704);
  if (dt() == MOE_DTYPE_BF16) expert_ffn_case(ops, state, dt(), MOE_ACT_SWIGLU, false, 211, 96, 704);
}

// Every pair against core/half.h, bit for bit: 1000 elements (one thread), and 70001 (the
// threads' runs, ending off a cache line), with NaN, infinities and halfway cases among them.
TEST_P(CpuLowp, ConvertEveryPair) {
  Rng rng(5);
  for (int64_t n : {1000, 70001}) {
    std::vector<float> v = rng.uniforms(n, -70000.0f, 70000.0f);
    v[3] = NAN;
    v[n - 2] = -std::numeric_limits<float>::infinity();
    v[n / 2] = std::bit_cast<float>(0x3f808000u);  // halfway between two bfloat16 values
    v[n / 2 + 1] = std::bit_cast<float>(0x3f818000u);
    for (int from : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16})
      for (int to : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
        std::vector<unsigned char> src(n * 4), dst(n * 4, 0xcd), want(n * 4, 0xcd);
        moe::convert_host(src.data(), from, v.data(), MOE_DTYPE_F32, n);
        ASSERT_EQ(ops->convert(state, dst.data(), to, src.data(), from, n), MOE_OK) << err();
        moe::convert_host(want.data(), to, src.data(), from, n);
        EXPECT_EQ(0, std::memcmp(dst.data(), want.data(), n * 4)) << from << " -> " << to << ", " << n;
      }
  }
  EXPECT_EQ(ops->convert(state, nullptr, MOE_DTYPE_F16, nullptr, MOE_DTYPE_F32, 0), MOE_OK);
}

TEST_P(CpuLowp, FindNonfinite) {
  std::vector<float> v(41, 0.5f);
  v[17] = std::numeric_limits<float>::infinity();
  v[30] = NAN;
  Lowp l(dt(), v);
  int64_t first = 99;
  ASSERT_EQ(ops->find_nonfinite(state, l.data(), dt(), 41, &first), MOE_OK);
  EXPECT_EQ(first, 17);
  ASSERT_EQ(ops->find_nonfinite(state, l.data(), dt(), 17, &first), MOE_OK);
  EXPECT_EQ(first, -1);
  if (dt() == MOE_DTYPE_F16) {  // finite in float32, infinite once stored in float16
    Lowp big(dt(), std::vector<float>{1.0f, 1e5f});
    ASSERT_EQ(ops->find_nonfinite(state, big.data(), dt(), 2, &first), MOE_OK);
    EXPECT_EQ(first, 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuLowp, ::testing::Values(MOE_DTYPE_BF16, MOE_DTYPE_F16),
                         [](const ::testing::TestParamInfo<int> &i) { return std::string(moe::dtype_name(i.param)); });

}  // namespace
