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

namespace {

// Independent of the library's conversions: the compiler's _Float16, and bfloat16 by rounding the
// float32 bits.
uint16_t to_bits(int dtype, float f) {
  if (dtype == MOE_DTYPE_F16) {
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float from_bits(int dtype, uint16_t b) {
  if (dtype == MOE_DTYPE_F16) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return static_cast<float>(h);
  }
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<float> random(size_t n, unsigned seed, float scale = 1.0f) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  for (float &x : v) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    x = scale * (static_cast<float>((s >> 40) & 0xffffff) / 8388608.0f - 1.0f);
  }
  return v;
}

struct Lowp {
  int dtype;
  std::vector<uint16_t> bits;
  Lowp(int dt, const std::vector<float> &v) : dtype(dt), bits(v.size()) {
    for (size_t i = 0; i < v.size(); ++i) bits[i] = to_bits(dt, v[i]);
  }
  Lowp(int dt, size_t n) : dtype(dt), bits(n, 0x7fff) {}
  std::vector<float> wide() const {
    std::vector<float> v(bits.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = from_bits(dtype, bits[i]);
    return v;
  }
};

struct Layer {
  moe_layer *l = nullptr;
  explicit Layer(const moe_config &c) { EXPECT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error(); }
  ~Layer() { moe_layer_destroy(l); }
};
struct Ctx {
  moe_context *c = nullptr;
  explicit Ctx(moe_layer *l) { EXPECT_EQ(moe_context_create(l, &c), MOE_OK); }
  ~Ctx() { moe_context_destroy(c); }
};

std::vector<std::pair<std::string, int64_t>> params(moe_layer *l) {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < moe_layer_num_params(l); ++i) {
    moe_param_info info{};
    EXPECT_EQ(moe_layer_param_info(l, i, &info), MOE_OK);
    int64_t n = 1;
    for (int j = 0; j < info.ndim; ++j) n *= info.shape[j];
    out.emplace_back(info.name, info.trainable ? n : -n);
  }
  return out;
}

// max |a - b| <= tol * max |b| (and b is not all zeros: the comparison means something).
void expect_close(const std::vector<float> &a, const std::vector<float> &b, double tol, const std::string &what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double scale = 0.0, err = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << what << "[" << i << "]";
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  EXPECT_GT(scale, 0.0) << what;
  EXPECT_LE(err, tol * scale) << what << ": max error " << err << " against scale " << scale;
}

moe_config preset(const char *name, int dtype) {
  moe_config c;
  moe_config_init(&c);
  EXPECT_EQ(moe_config_preset(&c, name), MOE_OK);
  c.d_model = 48;
  c.d_ff = 64;
  if (c.num_experts > 16) {
    c.num_experts = 16;
    c.num_groups = c.num_groups > 1 ? 4 : 1;
    c.topk_groups = c.num_groups > 1 ? 2 : 1;
    c.top_k = std::min<int64_t>(c.top_k, 4);
  }
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
  Layer low(cl), f32(cf);
  ASSERT_TRUE(low.l && f32.l);
  // The float32 layer takes the low-precision layer's (rounded) parameters.
  for (const auto &p : params(low.l)) {
    std::vector<float> v(std::llabs(p.second));
    ASSERT_EQ(moe_layer_get_param(low.l, p.first.c_str(), v.data(), v.size()), MOE_OK);
    ASSERT_EQ(moe_layer_set_param(f32.l, p.first.c_str(), v.data(), v.size()), MOE_OK);
    moe_dtype pd;
    ASSERT_EQ(moe_layer_param_dtype(low.l, p.first.c_str(), &pd), MOE_OK);
    const bool expert = p.first.rfind("experts.", 0) == 0 || (p.first.rfind("shared.w", 0) == 0);
    EXPECT_EQ(pd, expert ? dt : MOE_DTYPE_F32) << p.first;
    if (expert) {
      for (float x : v) ASSERT_EQ(from_bits(dt, to_bits(dt, x)), x) << p.first << " holds rounded values";
    }
  }
  const int64_t T = 37, d = cl.d_model, k = cl.top_k;
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Lowp x(dt, random(T * d, 11 + step)), dy(dt, random(T * d, 21 + step));
    std::vector<float> x32 = x.wide(), dy32 = dy.wide();
    Ctx cl_ctx(low.l), cf_ctx(f32.l);
    Lowp y(dt, T * d), dx(dt, T * d);
    std::vector<float> y32(T * d), dx32(T * d);
    ASSERT_EQ(moe_layer_zero_grad(low.l), MOE_OK);
    ASSERT_EQ(moe_layer_zero_grad(f32.l), MOE_OK);
    ASSERT_EQ(moe_forward(low.l, x.bits.data(), T, y.bits.data(), cl_ctx.c), MOE_OK) << moe_last_error();
    ASSERT_EQ(moe_forward(f32.l, x32.data(), T, y32.data(), cf_ctx.c), MOE_OK) << moe_last_error();
    if (cl.routing == MOE_ROUTE_TOKEN_CHOICE) {
      std::vector<int32_t> ids(T * k), ids32(T * k);
      std::vector<float> w(T * k), w32(T * k);
      ASSERT_EQ(moe_context_topk(cl_ctx.c, ids.data(), w.data()), MOE_OK);
      ASSERT_EQ(moe_context_topk(cf_ctx.c, ids32.data(), w32.data()), MOE_OK);
      EXPECT_EQ(ids, ids32) << "the router is float32 on the same values";
      EXPECT_EQ(0, std::memcmp(w.data(), w32.data(), w.size() * 4));
    }
    moe_stats s{}, s32{};
    s.struct_size = s32.struct_size = sizeof(moe_stats);
    ASSERT_EQ(moe_context_stats(cl_ctx.c, &s), MOE_OK);
    ASSERT_EQ(moe_context_stats(cf_ctx.c, &s32), MOE_OK);
    EXPECT_EQ(s.aux_loss_total, s32.aux_loss_total);
    EXPECT_EQ(s.dropped_slots, s32.dropped_slots);
    expect_close(y.wide(), y32, tol, "y");
    ASSERT_EQ(moe_backward(low.l, cl_ctx.c, dy.bits.data(), dx.bits.data()), MOE_OK) << moe_last_error();
    ASSERT_EQ(moe_backward(f32.l, cf_ctx.c, dy32.data(), dx32.data()), MOE_OK) << moe_last_error();
    expect_close(dx.wide(), dx32, tol, "dx");
    for (const auto &p : params(low.l)) {
      if (p.second < 0) continue;
      std::vector<float> g(p.second), g32(p.second);
      ASSERT_EQ(moe_layer_get_grad(low.l, p.first.c_str(), g.data(), g.size()), MOE_OK);
      ASSERT_EQ(moe_layer_get_grad(f32.l, p.first.c_str(), g32.data(), g32.size()), MOE_OK);
      if (p.first == "router.noise_weight") continue;  // starts at zero: its gradient may be tiny
      expect_close(g, g32, tol, "grad " + p.first);
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
  moe_config c;
  moe_config_init(&c);
  c.d_model = 16;
  c.d_ff = 24;
  c.num_experts = 4;
  c.top_k = 2;
  c.dtype = static_cast<moe_dtype>(dtype);
  return c;
}

TEST(PrecisionApi, HostCopiesRoundToNearestEven) {
  Layer l(small(MOE_DTYPE_BF16));
  std::vector<float> w(4 * 24 * 16, 0.25f);
  // 1 + 2^-8 is halfway between two bfloat16 values: ties go to the even one, 1.0.
  w[0] = 1.00390625f;
  w[1] = 1.01171875f;  // 1 + 3*2^-8: halfway, to the even 1 + 2^-6
  w[2] = 0.1f;
  ASSERT_EQ(moe_layer_set_param(l.l, "experts.w1", w.data(), w.size()), MOE_OK);
  std::vector<float> back(w.size());
  ASSERT_EQ(moe_layer_get_param(l.l, "experts.w1", back.data(), back.size()), MOE_OK);
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.015625f);
  EXPECT_EQ(back[2], 0.10009765625f);
  EXPECT_EQ(back[3], 0.25f);
  // The router stays float32: no rounding.
  std::vector<float> r(4 * 16, 0.1f);
  ASSERT_EQ(moe_layer_set_param(l.l, "router.weight", r.data(), r.size()), MOE_OK);
  ASSERT_EQ(moe_layer_get_param(l.l, "router.weight", back.data(), r.size()), MOE_OK);
  EXPECT_EQ(back[0], 0.1f);
}

TEST(PrecisionApi, ParamDtypeErrors) {
  Layer l(small(MOE_DTYPE_F16));
  moe_dtype out = MOE_DTYPE_F32;
  EXPECT_EQ(moe_layer_param_dtype(l.l, "experts.w2", &out), MOE_OK);
  EXPECT_EQ(out, MOE_DTYPE_F16);
  EXPECT_EQ(moe_layer_param_dtype(l.l, "router.bias", &out), MOE_OK);
  EXPECT_EQ(out, MOE_DTYPE_F32);
  EXPECT_EQ(moe_layer_param_dtype(l.l, "experts.w9", &out), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("experts.w9"), std::string::npos) << moe_last_error();
  EXPECT_EQ(moe_layer_param_dtype(l.l, "experts.w1", nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_layer_param_dtype(nullptr, "experts.w1", &out), MOE_ERR_INVALID_ARGUMENT);
}

TEST(PrecisionApi, CheckFiniteKnowsTheDtype) {
  moe_config c = small(MOE_DTYPE_F16);
  c.check_finite = 1;
  Layer l(c);
  const int64_t n = 4 * 24 * 16;
  std::vector<float> before(n), w(n, 0.5f), after(n);
  ASSERT_EQ(moe_layer_get_param(l.l, "experts.w1", before.data(), n), MOE_OK);
  w[5] = 1e5f;  // finite in float32, infinite in float16
  EXPECT_EQ(moe_layer_set_param(l.l, "experts.w1", w.data(), n), MOE_ERR_NONFINITE);
  const std::string msg = moe_last_error();
  EXPECT_NE(msg.find("float16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("host[5]"), std::string::npos) << msg;
  ASSERT_EQ(moe_layer_get_param(l.l, "experts.w1", after.data(), n), MOE_OK);
  EXPECT_EQ(before, after) << "nothing changed";
  // The router is float32: 1e5 is fine there.
  std::vector<float> r(4 * 16, 1e5f);
  EXPECT_EQ(moe_layer_set_param(l.l, "router.weight", r.data(), r.size()), MOE_OK) << moe_last_error();

  const int64_t T = 3;
  Lowp x(MOE_DTYPE_F16, random(T * 16, 3)), y(MOE_DTYPE_F16, T * 16);
  x.bits[1 * 16 + 7] = 0x7c00;  // +inf
  EXPECT_EQ(moe_forward(l.l, x.bits.data(), T, y.bits.data(), nullptr), MOE_ERR_NONFINITE);
  EXPECT_NE(std::string(moe_last_error()).find("x[1][7]"), std::string::npos) << moe_last_error();
  x.bits[1 * 16 + 7] = 0x3c00;  // 1.0
  EXPECT_EQ(moe_forward(l.l, x.bits.data(), T, y.bits.data(), nullptr), MOE_OK) << moe_last_error();
}

TEST(PrecisionApi, BuffersAreSizedByTheDtype) {
  Layer l(small(MOE_DTYPE_BF16));
  const int64_t T = 5, d = 16;
  // x and y back to back in one allocation: distinct for 2-byte elements.
  std::vector<uint16_t> buf(2 * T * d);
  Lowp x(MOE_DTYPE_BF16, random(T * d, 4));
  std::copy(x.bits.begin(), x.bits.end(), buf.begin());
  EXPECT_EQ(moe_forward(l.l, buf.data(), T, buf.data() + T * d, nullptr), MOE_OK) << moe_last_error();
  // One element less apart: they overlap.
  EXPECT_EQ(moe_forward(l.l, buf.data(), T, buf.data() + T * d - 1, nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("overlap"), std::string::npos) << moe_last_error();
}

TEST(PrecisionApi, Deterministic) {
  for (int dt : {MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
    moe_config c = small(dt);
    c.num_shared_experts = 1;
    c.shared_gate = 1;
    Layer a(c), b(c);
    const int64_t T = 29, d = 16;
    Lowp x(dt, random(T * d, 5)), dy(dt, random(T * d, 6));
    Lowp ya(dt, T * d), yb(dt, T * d), dxa(dt, T * d), dxb(dt, T * d);
    Ctx ca(a.l), cb(b.l);
    ASSERT_EQ(moe_forward(a.l, x.bits.data(), T, ya.bits.data(), ca.c), MOE_OK);
    ASSERT_EQ(moe_forward(b.l, x.bits.data(), T, yb.bits.data(), cb.c), MOE_OK);
    ASSERT_EQ(moe_backward(a.l, ca.c, dy.bits.data(), dxa.bits.data()), MOE_OK);
    ASSERT_EQ(moe_backward(b.l, cb.c, dy.bits.data(), dxb.bits.data()), MOE_OK);
    EXPECT_EQ(ya.bits, yb.bits);
    EXPECT_EQ(dxa.bits, dxb.bits);
    for (uint16_t v : ya.bits) ASSERT_NE(v, 0x7fff) << "every y element written";
  }
}

}  // namespace
