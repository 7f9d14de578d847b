// bfloat16 and float16 on the host, independent of the library's conversions: float32 rounded to
// nearest even (bfloat16 from its bits, float16 by the compiler's _Float16), and tensors of a
// moe_dtype as the bytes a layer or a stage reads.
#pragma once

#include <moe/moe.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe_test {

uint16_t f32_to_bf16(float f);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// dtype is a moe_dtype: float32, bfloat16 or float16.
size_t dtype_size(int dtype);
float round_to(int dtype, float v);
std::vector<float> rounded(int dtype, std::vector<float> v);
// Host float32 values as the bytes of a tensor of that dtype, and back.
std::vector<unsigned char> encode(int dtype, const std::vector<float> &v);
std::vector<float> decode(int dtype, const std::vector<unsigned char> &bytes);

// A tensor in a 16-bit dtype: its bits, and their float32 widening.
struct Lowp {
  int dtype;
  std::vector<uint16_t> bits;
  Lowp(int dt, const std::vector<float> &v);
  Lowp(int dt, size_t n) : dtype(dt), bits(n, 0x7fff) {}  // NaN in both formats: an output must overwrite it
  std::vector<float> wide() const;
  void *data() { return bits.data(); }
};

// float32 values rounded to a 16-bit dtype, as its bits.
inline std::vector<uint16_t> narrow(int dtype, const std::vector<float> &v) { return Lowp(dtype, v).bits; }

}  // namespace moe_test
