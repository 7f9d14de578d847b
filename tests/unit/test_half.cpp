// The host conversions between float32 and bfloat16/float16 (core/half.h) against independent
// references: the compiler's _Float16 for float16, and nearest-of-two-neighbours in double for
// bfloat16. Every 16-bit pattern, plus random and boundary float32 values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/half.h"

namespace {

uint32_t bits(float f) { return moe::float_bits(f); }
float from_bits(uint32_t u) { return moe::bits_float(u); }

// float32 inputs worth checking: every bf16/f16 value, the midpoints between neighbours (ties), a
// step either side of them, and random bit patterns.
std::vector<float> probe_values() {
  std::vector<float> v;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint32_t b = h << 16;
    for (int32_t delta : {-1, 0, 1, 0x8000 - 1, 0x8000, 0x8000 + 1}) v.push_back(from_bits(b + delta));
    _Float16 x;
    const uint16_t hh = static_cast<uint16_t>(h);
    std::memcpy(&x, &hh, 2);
    const float f = static_cast<float>(x);
    v.push_back(f);
    v.push_back(std::nextafter(f, 0.0f));
    v.push_back(std::nextafter(f, 1e30f));
    v.push_back(std::nextafter(f, -1e30f));
  }
  uint64_t s = 88172645463325252ULL;
  for (int i = 0; i < 1 << 20; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    v.push_back(from_bits(static_cast<uint32_t>(s)));
  }
  for (float f :
       {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 65536.0f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 6.097555e-5f,
        6.1035156e-5f, std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()})
    v.push_back(f);
  return v;
}

// bfloat16 by definition: the nearer of the two bf16 neighbours of f, ties to the even one.
uint16_t bf16_reference(float f) {
  const uint32_t u = bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // toward zero
  if ((u & 0xffffu) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // away from zero (may become infinity)
  const double a = std::fabs(static_cast<double>(moe::bf16_to_float(lo)));
  // Past the largest finite value the next step is 2^128 (IEEE rounds to infinity from there on).
  const double b =
      (hi & 0x7fffu) == 0x7f80u ? std::ldexp(1.0, 128) : std::fabs(static_cast<double>(moe::bf16_to_float(hi)));
  const double x = std::fabs(static_cast<double>(f));
  const double da = x - a, db = b - x;
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1u) ? hi : lo;
}

TEST(Half, Sizes) {
  EXPECT_EQ(moe::dtype_size(MOE_DTYPE_F32), 4u);
  EXPECT_EQ(moe::dtype_size(MOE_DTYPE_BF16), 2u);
  EXPECT_EQ(moe::dtype_size(MOE_DTYPE_F16), 2u);
  EXPECT_STREQ(moe::dtype_name(MOE_DTYPE_BF16), "bfloat16");
}

TEST(Half, F16WidenEveryPattern) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t hh = static_cast<uint16_t>(h);
    _Float16 x;
    std::memcpy(&x, &hh, 2);
    const float want = static_cast<float>(x), got = moe::f16_to_float(hh);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << h;
    } else {
      ASSERT_EQ(bits(got), bits(want)) << std::hex << h;
    }
  }
}

TEST(Half, F16NarrowMatchesTheCompiler) {
  for (float f : probe_values()) {
    const _Float16 want = static_cast<_Float16>(f);
    const uint16_t got = moe::float_to_f16(f);
    uint16_t wb;
    std::memcpy(&wb, &want, 2);
    if (std::isnan(f)) {
      EXPECT_EQ(got & 0x7c00u, 0x7c00u);
      EXPECT_NE(got & 0x03ffu, 0u) << "a NaN stays a NaN";
      EXPECT_NE(got & 0x0200u, 0u) << "quiet";
    } else {
      ASSERT_EQ(got, wb) << "f = " << f << " (bits " << std::hex << bits(f) << ")";
    }
  }
}

TEST(Half, Bf16WidenIsExact) {
  for (uint32_t h = 0; h < 0x10000u; ++h) EXPECT_EQ(bits(moe::bf16_to_float(static_cast<uint16_t>(h))), h << 16);
}

TEST(Half, Bf16NarrowIsNearestEven) {
  for (float f : probe_values()) {
    const uint16_t got = moe::float_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(moe::bf16_to_float(got)));
      EXPECT_NE(got & 0x0040u, 0u) << "quiet";
      EXPECT_EQ(got & 0x8000u, (bits(f) >> 16) & 0x8000u) << "sign kept";
    } else {
      ASSERT_EQ(got, bf16_reference(f)) << "f = " << f << " (bits " << std::hex << bits(f) << ")";
    }
  }
}

TEST(Half, RoundTripsAndRoundTo) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t hh = static_cast<uint16_t>(h);
    const float b = moe::bf16_to_float(hh), f = moe::f16_to_float(hh);
    if (!std::isnan(b)) {
      EXPECT_EQ(moe::float_to_bf16(b), hh);
      EXPECT_EQ(bits(moe::round_to(MOE_DTYPE_BF16, b)), bits(b));
    }
    if (!std::isnan(f)) {
      EXPECT_EQ(moe::float_to_f16(f), hh);
    }
  }
  EXPECT_EQ(moe::round_to(MOE_DTYPE_F32, 0.1f), 0.1f);
  EXPECT_TRUE(std::isinf(moe::round_to(MOE_DTYPE_F16, 1e5f)));
  EXPECT_EQ(moe::round_to(MOE_DTYPE_F16, 65504.0f), 65504.0f);
}

TEST(Half, ConvertHostArrays) {
  const std::vector<float> src = {1.0f, -2.5f, 3.14159f, 1e-3f, 70000.0f};
  std::vector<uint16_t> h(src.size());
  std::vector<float> back(src.size());
  moe::convert_host(h.data(), MOE_DTYPE_F16, src.data(), MOE_DTYPE_F32, static_cast<int64_t>(src.size()));
  moe::convert_host(back.data(), MOE_DTYPE_F32, h.data(), MOE_DTYPE_F16, static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) EXPECT_EQ(bits(back[i]), bits(moe::round_to(MOE_DTYPE_F16, src[i])));
  std::vector<uint16_t> b(src.size());
  moe::convert_host(b.data(), MOE_DTYPE_BF16, h.data(), MOE_DTYPE_F16, static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) EXPECT_EQ(b[i], moe::float_to_bf16(back[i]));
  EXPECT_EQ(moe::load_elem(b.data(), MOE_DTYPE_BF16, 1), -2.5f);
  EXPECT_EQ(moe::elem_at(static_cast<void *>(b.data()), MOE_DTYPE_BF16, 3), static_cast<void *>(&b[3]));
}

}  // namespace
