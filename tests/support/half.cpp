#include "half.h"

#include <cstring>

namespace moe_test {

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

uint16_t f32_to_bf16(float f) {
  uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}
float bf16_to_f32(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

uint16_t f32_to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}
float f16_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, sizeof h);
  return static_cast<float>(h);
}

size_t dtype_size(int dtype) { return dtype == MOE_DTYPE_F32 ? 4 : 2; }

float round_to(int dtype, float v) {
  if (dtype == MOE_DTYPE_BF16) return bf16_to_f32(f32_to_bf16(v));
  if (dtype == MOE_DTYPE_F16) return f16_to_f32(f32_to_f16(v));
  return v;
}
std::vector<float> rounded(int dtype, std::vector<float> v) {
  for (float &x : v) x = round_to(dtype, x);
  return v;
}

std::vector<unsigned char> encode(int dtype, const std::vector<float> &v) {
  std::vector<unsigned char> out(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == MOE_DTYPE_F32) {
      std::memcpy(&out[i * 4], &v[i], 4);
    } else {
      const uint16_t h = dtype == MOE_DTYPE_BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}
std::vector<float> decode(int dtype, const std::vector<unsigned char> &bytes) {
  const size_t n = bytes.size() / dtype_size(dtype);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == MOE_DTYPE_F32) {
      std::memcpy(&out[i], &bytes[i * 4], 4);
    } else {
      uint16_t h;
      std::memcpy(&h, &bytes[i * 2], 2);
      out[i] = dtype == MOE_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return out;
}

Lowp::Lowp(int dt, const std::vector<float> &v) : dtype(dt), bits(v.size()) {
  for (size_t i = 0; i < v.size(); ++i) bits[i] = dt == MOE_DTYPE_BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
}
std::vector<float> Lowp::wide() const {
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = dtype == MOE_DTYPE_BF16 ? bf16_to_f32(bits[i]) : f16_to_f32(bits[i]);
  return v;
}

}  // namespace moe_test
