#include "safetensors.h"

#include <fstream>
#include <iterator>

#include "half.h"

namespace moe_test {

std::vector<unsigned char> safetensors_bytes(const std::string &header, const std::vector<unsigned char> &data,
                                             uint64_t header_len) {
  if (header_len == UINT64_MAX) header_len = header.size();
  std::vector<unsigned char> out;
  out.reserve(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(header_len >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::vector<unsigned char> SafetensorsWriter::bytes() const {
  std::string h = "{";
  std::vector<unsigned char> data;
  for (const Tensor &t : tensors) {
    const std::vector<unsigned char> b = encode(t.dtype, t.values);
    if (h.size() > 1) h.append(",");
    h.append("\"").append(t.name).append("\":{\"dtype\":\"");
    h.append(t.dtype == MOE_DTYPE_F32 ? "F32" : t.dtype == MOE_DTYPE_BF16 ? "BF16" : "F16");
    h.append("\",\"shape\":[");
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) h.append(",");
      h.append(std::to_string(t.shape[i]));
    }
    h.append("],\"data_offsets\":[").append(std::to_string(data.size())).append(",");
    h.append(std::to_string(data.size() + b.size())).append("]}");
    data.insert(data.end(), b.begin(), b.end());
  }
  h.append("}");
  return safetensors_bytes(h, data);
}

void write_bytes(const std::string &path, const std::vector<unsigned char> &bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char *>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<unsigned char> read_bytes(const std::string &path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

void SafetensorsWriter::write(const std::string &path) const { write_bytes(path, bytes()); }

}  // namespace moe_test
