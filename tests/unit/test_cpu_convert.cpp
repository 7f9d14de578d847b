// The CPU backend's array conversions (cpu/convert.h: F16C where the CPU has it, and the portable
// branch-free loops) against the scalar conversions of core/half.h, which test_half.cpp checks
// against independent references: the same bits for every 16-bit pattern and for float32 values
// at and around every rounding boundary, NaNs included, at lengths and offsets that leave vector
// tails.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/half.h"
#include "cpu/convert.h"
#include "moe/moe.h"

namespace {

uint32_t bits(float f) { return moe::float_bits(f); }
float from_bits(uint32_t u) { return moe::bits_float(u); }

uint16_t narrow_one(int dtype, float f) { return dtype == MOE_DTYPE_BF16 ? moe::float_to_bf16(f) : moe::float_to_f16(f); }
float widen_one(int dtype, uint16_t h) { return dtype == MOE_DTYPE_BF16 ? moe::bf16_to_float(h) : moe::f16_to_float(h); }

// Every value of the dtype, the float32 values one step either side of it, the midpoints between
// neighbours (the ties) and a step either side of those, float32 subnormals, and random patterns.
std::vector<float> probes(int dtype) {
  std::vector<float> v;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float a = widen_one(dtype, static_cast<uint16_t>(h)), b = widen_one(dtype, static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);  // exact: 8 or 11 bits of 24
    for (float f : {a, mid})
      for (int32_t d : {-1, 0, 1}) v.push_back(from_bits(bits(f) + d));
  }
  for (uint32_t u = 1; u < 0x800000u; u += 4093) v.push_back(from_bits(u)), v.push_back(from_bits(u | 0x80000000u));
  uint64_t s = 0x9e3779b97f4a7c15ULL;
  for (int i = 0; i < 1 << 18; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    v.push_back(from_bits(static_cast<uint32_t>(s)));
  }
  return v;
}

using moe::cpu::ConvertPath;

class CpuConvert : public ::testing::TestWithParam<std::tuple<int, ConvertPath>> {
 protected:
  int dt() const { return std::get<0>(GetParam()); }
  ConvertPath path() const { return std::get<1>(GetParam()); }
};

TEST_P(CpuConvert, WidenGivesHalfHBitsForEveryPattern) {
  const int dt = this->dt();
  std::vector<uint16_t> h(0x10000 + 1);
  for (uint32_t i = 0; i < 0x10000u; ++i) h[i + 1] = static_cast<uint16_t>(i);
  for (int64_t offset : {1, 4}) {  // the second start leaves a head and a tail outside whole vectors
    const int64_t n = static_cast<int64_t>(h.size()) - offset;
    std::vector<float> out(n);
    moe::cpu::widen(out.data(), h.data() + offset, dt, n, path());
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(bits(out[i]), bits(widen_one(dt, h[offset + i]))) << "pattern " << std::hex << h[offset + i];
  }
}

TEST_P(CpuConvert, NarrowGivesHalfHBitsForEveryProbe) {
  const int dt = this->dt();
  const std::vector<float> v = probes(dt);
  for (int64_t offset : {0, 3}) {
    const int64_t n = static_cast<int64_t>(v.size()) - offset;
    std::vector<uint16_t> out(n), kept(n);
    std::vector<float> rounded(v.begin() + offset, v.end()), in_place(v.begin() + offset, v.end());
    moe::cpu::narrow(out.data(), dt, v.data() + offset, n, path());
    moe::cpu::narrow_rounded(kept.data(), dt, rounded.data(), n, path());
    moe::cpu::round_in_place(in_place.data(), dt, n, path());
    for (int64_t i = 0; i < n; ++i) {
      const float f = v[offset + i];
      const uint16_t want = narrow_one(dt, f);
      ASSERT_EQ(out[i], want) << "narrow of " << f << " (bits " << std::hex << bits(f) << ")";
      ASSERT_EQ(kept[i], want) << "narrow_rounded of " << f << " (bits " << std::hex << bits(f) << ")";
      ASSERT_EQ(bits(rounded[i]), bits(widen_one(dt, want))) << "narrow_rounded's value of bits " << std::hex << bits(f);
      ASSERT_EQ(bits(in_place[i]), bits(widen_one(dt, want))) << "round_in_place of bits " << std::hex << bits(f);
    }
  }
}

// transpose_narrow against narrow_one element by element: shapes that leave no, some and only
// remainders outside its blocks of eight, strides wider than the shapes, and every probe somewhere.
// The elements of dst between rows (its wider stride) stay as they were.
void expect_transposed(int dt, ConvertPath path, const std::vector<float> &values) {
  const size_t es = dt == MOE_DTYPE_F32 ? 4 : 2;
  size_t next = 0;
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {8, 8}, {16, 24}, {7, 9}, {13, 37}, {130, 67}, {24, 2048}}) {
    const int64_t lds = rows + 3, ld = cols + 5;
    std::vector<float> src(static_cast<size_t>(cols * lds));
    for (float &f : src) f = values[next++ % values.size()];
    std::vector<unsigned char> dst(static_cast<size_t>(rows * ld) * es, 0xA5);
    moe::cpu::transpose_narrow(dst.data(), dt, ld, src.data(), lds, rows, cols, path);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < ld; ++j) {
        const unsigned char *got = dst.data() + (i * ld + j) * es;
        if (j >= cols) {
          for (size_t b = 0; b < es; ++b) ASSERT_EQ(got[b], 0xA5) << "stride padding written at " << i << ", " << j;
          continue;
        }
        const float f = src[j * lds + i];
        if (dt == MOE_DTYPE_F32) {
          float v;
          std::memcpy(&v, got, 4);
          ASSERT_EQ(bits(v), bits(f)) << rows << " x " << cols << " at " << i << ", " << j;
        } else {
          uint16_t h;
          std::memcpy(&h, got, 2);
          ASSERT_EQ(h, narrow_one(dt, f)) << rows << " x " << cols << " at " << i << ", " << j << " of bits " << std::hex
                                          << bits(f);
        }
      }
  }
}

TEST_P(CpuConvert, TransposeNarrowGivesNarrowBitsTransposed) { expect_transposed(dt(), path(), probes(dt())); }

TEST(CpuConvertF32, TransposeNarrowCopiesFloat32Exactly) {
  std::vector<float> values;
  uint64_t s = 0x2545f4914f6cdd1dULL;
  for (int i = 0; i < 1 << 16; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    values.push_back(from_bits(static_cast<uint32_t>(s)));
  }
  for (ConvertPath path : {ConvertPath::best, ConvertPath::portable}) expect_transposed(MOE_DTYPE_F32, path, values);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CpuConvert,
                         ::testing::Combine(::testing::Values(MOE_DTYPE_BF16, MOE_DTYPE_F16),
                                            ::testing::Values(ConvertPath::best, ConvertPath::portable)),
                         [](const auto &i) {
                           return std::string(std::get<0>(i.param) == MOE_DTYPE_BF16 ? "bfloat16" : "float16") +
                                  (std::get<1>(i.param) == ConvertPath::best ? "_best" : "_portable");
                         });

}  // namespace
