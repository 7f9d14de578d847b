// bfloat16 and float16 layers through the public API (moe.h "Precision"): against a float32 layer
// given the same rounded parameters and inputs, the routing must be identical (the router is
// float32 in both) and y, dx and every gradient must agree to the dtype's precision; host copies
// round to nearest even; check_finite and the buffer checks use the dtype's element size.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "support/compare.h"
#include "support/half.h"
#include "support/layer.h"
#include "support/random.h"

namespace {

using moe_test::LayerPtr;
using moe_test::Lowp;
using moe_test::make_context;
using moe_test::make_layer;

std::vector<float> random(size_t n, unsigned seed) { return moe_test::inputs(n, seed, 1.0f); }

// max |a - b| <= tol * max |b|, a finite, and b not all zeros (the comparison means something).
void expect_close(const std::vector<float> &a, const std::vector<float> &b, double tol, const std::string &what) {
  EXPECT_TRUE(moe_test::all_finite(what, a));
  EXPECT_TRUE(std::any_of(b.begin(), b.end(), [](float v) { return v != 0.0f; })) << what << " is all zeros";
  EXPECT_TRUE(moe_test::close(what, a, b, tol));
}

moe_config preset(const char *name, int dtype) {
  moe_config c = moe_test::preset(name, 48, 64);
  moe_test::at_most_16_experts(c);
  if (c.num_shared_experts > 0) c.d_ff_shared = 40;
  c.seed = 7;
  c.dtype = static_cast<moe_dtype>(dtype);
  return c;
}

struct PrecisionCase {
  const char *preset;
  int dtype;
};

class Precision : public ::testing::TestWithParam<PrecisionCase> {};

TEST_P(Precision, MatchesFloat32LayerWithTheSameRoundedValues) {
  const PrecisionCase pc = GetParam();
  const int dt = pc.dtype;
  const double tol = dt == MOE_DTYPE_BF16 ? 1e-2 : 2e-3;
  moe_config cl = preset(pc.preset, dt), cf = cl;
  cf.dtype = MOE_DTYPE_F32;
  const LayerPtr low = make_layer(cl), f32 = make_layer(cf);
  ASSERT_TRUE(low && f32);
  // The float32 layer takes the low-precision layer's (rounded) parameters.
  for (const moe_test::Param &p : moe_test::params(low.get())) {
    const std::vector<float> v = moe_test::get_param(low.get(), p);
    moe_test::set_param(f32.get(), p.name, v);
    const bool expert = moe_test::stored_dtype(p.name, dt) == dt;
    EXPECT_EQ(moe_test::param_dtype(low.get(), p.name), expert ? dt : MOE_DTYPE_F32) << p.name;
    if (expert) {
      for (float x : v) ASSERT_EQ(moe_test::round_to(dt, x), x) << p.name << " holds rounded values";
    }
  }
  const int64_t T = 37, d = cl.d_model, k = cl.top_k;
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Lowp x(dt, random(T * d, 11 + step)), dy(dt, random(T * d, 21 + step));
    std::vector<float> x32 = x.wide(), dy32 = dy.wide();
    const moe_test::ContextPtr cl_ctx = make_context(low.get()), cf_ctx = make_context(f32.get());
    Lowp y(dt, T * d), dx(dt, T * d);
    std::vector<float> y32(T * d), dx32(T * d);
    ASSERT_EQ(moe_layer_zero_grad(low.get()), MOE_OK);
    ASSERT_EQ(moe_layer_zero_grad(f32.get()), MOE_OK);
    ASSERT_EQ(moe_forward(low.get(), x.data(), T, y.data(), cl_ctx.get()), MOE_OK) << moe_last_error();
    ASSERT_EQ(moe_forward(f32.get(), x32.data(), T, y32.data(), cf_ctx.get()), MOE_OK) << moe_last_error();
    if (cl.routing == MOE_ROUTE_TOKEN_CHOICE) {
      const moe_test::TopK r = moe_test::topk(cl_ctx.get(), T, k), r32 = moe_test::topk(cf_ctx.get(), T, k);
      EXPECT_EQ(r.ids, r32.ids) << "the router is float32 on the same values";
      EXPECT_TRUE(moe_test::same("topk weights", r.weights, r32.weights));
    }
    const moe_stats s = moe_test::stats(cl_ctx.get()), s32 = moe_test::stats(cf_ctx.get());
    EXPECT_EQ(s.aux_loss_total, s32.aux_loss_total);
    EXPECT_EQ(s.dropped_slots, s32.dropped_slots);
    expect_close(y.wide(), y32, tol, "y");
    ASSERT_EQ(moe_backward(low.get(), cl_ctx.get(), dy.data(), dx.data()), MOE_OK) << moe_last_error();
    ASSERT_EQ(moe_backward(f32.get(), cf_ctx.get(), dy32.data(), dx32.data()), MOE_OK) << moe_last_error();
    expect_close(dx.wide(), dx32, tol, "dx");
    for (const moe_test::Param &p : moe_test::params(low.get())) {
      if (!p.trainable) continue;
      const std::vector<float> g = moe_test::get_grad(low.get(), p), g32 = moe_test::get_grad(f32.get(), p);
      if (p.name == "router.noise_weight") continue;  // starts at zero: its gradient may be tiny
      expect_close(g, g32, tol, "grad " + p.name);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Presets, Precision,
    ::testing::Values(PrecisionCase{"mixtral", MOE_DTYPE_BF16}, PrecisionCase{"mixtral", MOE_DTYPE_F16},
                      PrecisionCase{"deepseek-v3", MOE_DTYPE_BF16}, PrecisionCase{"deepseek-v3", MOE_DTYPE_F16},
                      PrecisionCase{"switch", MOE_DTYPE_BF16}, PrecisionCase{"shazeer", MOE_DTYPE_F16},
                      PrecisionCase{"expert-choice", MOE_DTYPE_BF16}, PrecisionCase{"qwen2-moe", MOE_DTYPE_BF16}),
    [](const ::testing::TestParamInfo<PrecisionCase> &i) {
      std::string n = std::string(i.param.preset) + (i.param.dtype == MOE_DTYPE_BF16 ? "_bf16" : "_f16");
      std::replace(n.begin(), n.end(), '-', '_');
      return n;
    });

moe_config small(int dtype) {
  moe_config c = moe_test::config(16, 24, 4, 2);
  c.dtype = static_cast<moe_dtype>(dtype);
  return c;
}

TEST(PrecisionApi, HostCopiesRoundToNearestEven) {
  const LayerPtr l = make_layer(small(MOE_DTYPE_BF16));
  std::vector<float> w(4 * 24 * 16, 0.25f);
  // 1 + 2^-8 is halfway between two bfloat16 values: ties go to the even one, 1.0.
  w[0] = 1.00390625f;
  w[1] = 1.01171875f;  // 1 + 3*2^-8: halfway, to the even 1 + 2^-6
  w[2] = 0.1f;
  ASSERT_EQ(moe_layer_set_param(l.get(), "experts.w1", w.data(), w.size()), MOE_OK);
  std::vector<float> back(w.size());
  ASSERT_EQ(moe_layer_get_param(l.get(), "experts.w1", back.data(), back.size()), MOE_OK);
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.015625f);
  EXPECT_EQ(back[2], 0.10009765625f);
  EXPECT_EQ(back[3], 0.25f);
  // The router stays float32: no rounding.
  std::vector<float> r(4 * 16, 0.1f);
  ASSERT_EQ(moe_layer_set_param(l.get(), "router.weight", r.data(), r.size()), MOE_OK);
  ASSERT_EQ(moe_layer_get_param(l.get(), "router.weight", back.data(), r.size()), MOE_OK);
  EXPECT_EQ(back[0], 0.1f);
}

TEST(PrecisionApi, ParamDtypeErrors) {
  const LayerPtr l = make_layer(small(MOE_DTYPE_F16));
  moe_dtype out = MOE_DTYPE_F32;
  EXPECT_EQ(moe_layer_param_dtype(l.get(), "experts.w2", &out), MOE_OK);
  EXPECT_EQ(out, MOE_DTYPE_F16);
  EXPECT_EQ(moe_layer_param_dtype(l.get(), "router.bias", &out), MOE_OK);
  EXPECT_EQ(out, MOE_DTYPE_F32);
  EXPECT_EQ(moe_layer_param_dtype(l.get(), "experts.w9", &out), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("experts.w9"), std::string::npos) << moe_last_error();
  EXPECT_EQ(moe_layer_param_dtype(l.get(), "experts.w1", nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_layer_param_dtype(nullptr, "experts.w1", &out), MOE_ERR_INVALID_ARGUMENT);
}

TEST(PrecisionApi, CheckFiniteKnowsTheDtype) {
  moe_config c = small(MOE_DTYPE_F16);
  c.check_finite = 1;
  const LayerPtr l = make_layer(c);
  const int64_t n = 4 * 24 * 16;
  std::vector<float> before(n), w(n, 0.5f), after(n);
  ASSERT_EQ(moe_layer_get_param(l.get(), "experts.w1", before.data(), n), MOE_OK);
  w[5] = 1e5f;  // finite in float32, infinite in float16
  EXPECT_EQ(moe_layer_set_param(l.get(), "experts.w1", w.data(), n), MOE_ERR_NONFINITE);
  const std::string msg = moe_last_error();
  EXPECT_NE(msg.find("float16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("host[5]"), std::string::npos) << msg;
  ASSERT_EQ(moe_layer_get_param(l.get(), "experts.w1", after.data(), n), MOE_OK);
  EXPECT_EQ(before, after) << "nothing changed";
  // The router is float32: 1e5 is fine there.
  std::vector<float> r(4 * 16, 1e5f);
  EXPECT_EQ(moe_layer_set_param(l.get(), "router.weight", r.data(), r.size()), MOE_OK) << moe_last_error();

  const int64_t T = 3;
  Lowp x(MOE_DTYPE_F16, random(T * 16, 3)), y(MOE_DTYPE_F16, T * 16);
  x.bits[1 * 16 + 7] = 0x7c00;  // +inf
  EXPECT_EQ(moe_forward(l.get(), x.bits.data(), T, y.bits.data(), nullptr), MOE_ERR_NONFINITE);
  EXPECT_NE(std::string(moe_last_error()).find("x[1][7]"), std::string::npos) << moe_last_error();
  x.bits[1 * 16 + 7] = 0x3c00;  // 1.0
  EXPECT_EQ(moe_forward(l.get(), x.bits.data(), T, y.bits.data(), nullptr), MOE_OK) << moe_last_error();
}

TEST(PrecisionApi, BuffersAreSizedByTheDtype) {
  const LayerPtr l = make_layer(small(MOE_DTYPE_BF16));
  const int64_t T = 5, d = 16;
  // x and y back to back in one allocation: distinct for 2-byte elements.
  std::vector<uint16_t> buf(2 * T * d);
  Lowp x(MOE_DTYPE_BF16, random(T * d, 4));
  std::copy(x.bits.begin(), x.bits.end(), buf.begin());
  EXPECT_EQ(moe_forward(l.get(), buf.data(), T, buf.data() + T * d, nullptr), MOE_OK) << moe_last_error();
  // One element less apart: they overlap.
  EXPECT_EQ(moe_forward(l.get(), buf.data(), T, buf.data() + T * d - 1, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("overlap"), std::string::npos) << moe_last_error();
}

TEST(PrecisionApi, Deterministic) {
  for (int dt : {MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
    moe_config c = small(dt);
    c.num_shared_experts = 1;
    c.shared_gate = 1;
    const LayerPtr a = make_layer(c), b = make_layer(c);
    const int64_t T = 29, d = 16;
    Lowp x(dt, random(T * d, 5)), dy(dt, random(T * d, 6));
    Lowp ya(dt, T * d), yb(dt, T * d), dxa(dt, T * d), dxb(dt, T * d);
    const moe_test::ContextPtr ca = make_context(a.get()), cb = make_context(b.get());
    ASSERT_EQ(moe_forward(a.get(), x.bits.data(), T, ya.bits.data(), ca.get()), MOE_OK);
    ASSERT_EQ(moe_forward(b.get(), x.bits.data(), T, yb.bits.data(), cb.get()), MOE_OK);
    ASSERT_EQ(moe_backward(a.get(), ca.get(), dy.bits.data(), dxa.bits.data()), MOE_OK);
    ASSERT_EQ(moe_backward(b.get(), cb.get(), dy.bits.data(), dxb.bits.data()), MOE_OK);
    EXPECT_EQ(ya.bits, yb.bits);
    EXPECT_EQ(dxa.bits, dxb.bits);
    for (uint16_t v : ya.bits) ASSERT_NE(v, 0x7fff) << "every y element written";
  }
}

}  // namespace
