// The CPU stages with bfloat16/float16 storage. Each stage must give exactly what its float32
// version gives on the widened inputs, rounded once where it stores: same sums in the same order,
// so the comparison is bit for bit. This pins down the plumbing (element sizes, offsets, which
// outputs are float32 and which are rounded, accumulation into gradients).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/half.h"
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

// Expert FFN, routed (one expert empty) or shared (every expert reads all rows).
void expert_ffn_case(const moe_backend_ops *ops, void *state, int dtype, int activation, bool shared) {
  SCOPED_TRACE(std::string("activation ") + std::to_string(activation) + (shared ? " shared" : " routed"));
  Rng rng(10 + activation + (shared ? 100 : 0));
  const bool glu = activation == MOE_ACT_SWIGLU || activation == MOE_ACT_GEGLU;
  const int64_t E = shared ? 2 : 4, d = 24, ff = 40;
  const std::vector<int64_t> offsets = shared ? std::vector<int64_t>{0, 7} : std::vector<int64_t>{0, 5, 5, 11, 19};
  const int64_t rows = shared ? offsets[1] : offsets.back();
  const int64_t out_rows = shared ? E * rows : rows;  // shared experts write E blocks of rows
  Lowp x(dtype, rng.uniforms(rows * d)), w1(dtype, rng.uniforms(E * ff * d, -0.3f, 0.3f)),
      w3(dtype, rng.uniforms(E * ff * d, -0.3f, 0.3f)), w2(dtype, rng.uniforms(E * d * ff, -0.2f, 0.2f)),
      dy(dtype, rng.uniforms(out_rows * d)), dw1(dtype, rng.uniforms(E * ff * d)), dw3(dtype, rng.uniforms(E * ff * d)),
      dw2(dtype, rng.uniforms(E * d * ff));
  std::vector<float> x32 = x.wide(), w132 = w1.wide(), w332 = w3.wide(), w232 = w2.wide(), dy32 = dy.wide();
  std::vector<float> dw132 = dw1.wide(), dw332 = dw3.wide(), dw232 = dw2.wide();

  Lowp h(dtype, out_rows * ff), g(dtype, out_rows * ff), a(dtype, out_rows * ff), y(dtype, out_rows * d);
  std::vector<float> h32(out_rows * ff), g32(out_rows * ff), a32(out_rows * ff), y32(out_rows * d);
  moe_ffn_args p = moe_test::ffn_args(E, d, ff, activation, offsets, dtype),
               q = moe_test::ffn_args(E, d, ff, activation, offsets);
  p.shared_input = q.shared_input = shared;
  p.x = x.data(), q.x = x32.data();
  p.w1 = w1.data(), q.w1 = w132.data();
  p.w3 = glu ? w3.data() : nullptr, q.w3 = glu ? w332.data() : nullptr;
  p.w2 = w2.data(), q.w2 = w232.data();
  p.h = h.data(), q.h = h32.data();
  p.g = glu ? g.data() : nullptr, q.g = glu ? g32.data() : nullptr;
  p.a = a.data(), q.a = a32.data();
  p.y = y.data(), q.y = y32.data();
  ASSERT_EQ(ops->expert_ffn(state, &p), MOE_OK) << ops->last_error(state);
  ASSERT_EQ(ops->expert_ffn(state, &q), MOE_OK) << ops->last_error(state);
  EXPECT_EQ(y.bits, narrow(dtype, y32));
  EXPECT_EQ(h.bits, narrow(dtype, h32));
  if (glu) {
    EXPECT_EQ(g.bits, narrow(dtype, g32));
  }
  // Backward from the stored (rounded) pre-activations, as a later call would see them.
  std::vector<float> hw = h.wide(), gw = g.wide();
  q.h = hw.data();
  q.g = glu ? gw.data() : nullptr;
  Lowp dh(dtype, out_rows * ff), dg(dtype, out_rows * ff);
  std::vector<float> dh32(out_rows * ff), dg32(out_rows * ff);
  const std::vector<float> dx0 = rng.uniforms(rows * d);
  Lowp dx(dtype, rows * d);
  std::vector<float> dxs = dx0, dx32 = shared ? dx0 : std::vector<float>(rows * d);
  p.dy = dy.data(), q.dy = dy32.data();
  p.dh = dh.data(), q.dh = dh32.data();
  p.dg = glu ? dg.data() : nullptr, q.dg = glu ? dg32.data() : nullptr;
  p.dw1 = dw1.data(), q.dw1 = dw132.data();
  p.dw3 = glu ? dw3.data() : nullptr, q.dw3 = glu ? dw332.data() : nullptr;
  p.dw2 = dw2.data(), q.dw2 = dw232.data();
  p.dx = shared ? static_cast<void *>(dxs.data()) : dx.data();  // shared: float32, accumulated
  q.dx = dx32.data();
  const std::vector<uint16_t> dw1_before = dw1.bits;
  ASSERT_EQ(ops->expert_ffn_bwd(state, &p), MOE_OK) << ops->last_error(state);
  ASSERT_EQ(ops->expert_ffn_bwd(state, &q), MOE_OK) << ops->last_error(state);
  EXPECT_EQ(dw1.bits, narrow(dtype, dw132));
  EXPECT_EQ(dw2.bits, narrow(dtype, dw232));
  if (glu) {
    EXPECT_EQ(dw3.bits, narrow(dtype, dw332));
  }
  EXPECT_NE(dw1.bits, dw1_before);
  if (shared) {
    EXPECT_TRUE(same("dxs", dxs, dx32));
  } else {
    EXPECT_EQ(dx.bits, narrow(dtype, dx32));
  }
}

TEST_P(CpuLowp, ExpertFfnEveryActivation) {
  for (int act : {MOE_ACT_SWIGLU, MOE_ACT_GEGLU, MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SILU})
    for (bool shared : {false, true}) expert_ffn_case(ops, state, dt(), act, shared);
}

TEST_P(CpuLowp, ConvertEveryPair) {
  Rng rng(5);
  const std::vector<float> v = rng.uniforms(1000, -70000.0f, 70000.0f);
  for (int from : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16})
    for (int to : {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
      std::vector<unsigned char> src(v.size() * 4), dst(v.size() * 4, 0xcd), want(v.size() * 4);
      moe::convert_host(src.data(), from, v.data(), MOE_DTYPE_F32, 1000);
      ASSERT_EQ(ops->convert(state, dst.data(), to, src.data(), from, 1000), MOE_OK) << err();
      moe::convert_host(want.data(), to, src.data(), from, 1000);
      EXPECT_EQ(0, std::memcmp(dst.data(), want.data(), 1000 * moe::dtype_size(to))) << from << " -> " << to;
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
