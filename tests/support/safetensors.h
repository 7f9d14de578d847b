// Safetensors files written by hand for the checkpoint tests: named float32 values stored in a
// dtype, and raw (header text, data) files for the malformed-file cases.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe_test {

// 8-byte little-endian header length (header.size() unless given), the header text, the data.
std::vector<unsigned char> safetensors_bytes(const std::string &header, const std::vector<unsigned char> &data,
                                             uint64_t header_len = UINT64_MAX);

struct SafetensorsWriter {
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
    int dtype;  // moe_dtype the values are stored in (rounded to nearest even)
  };
  std::vector<Tensor> tensors;
  void add(const std::string &name, std::vector<int64_t> shape, std::vector<float> values, int dtype = 0) {
    tensors.push_back({name, std::move(shape), std::move(values), dtype});
  }
  // The file's bytes: tensors in the order added, no padding.
  std::vector<unsigned char> bytes() const;
  void write(const std::string &path) const;
};

void write_bytes(const std::string &path, const std::vector<unsigned char> &bytes);
// A whole file's bytes (empty when it cannot be read).
std::vector<unsigned char> read_bytes(const std::string &path);

}  // namespace moe_test
