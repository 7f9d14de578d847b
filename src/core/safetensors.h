// The safetensors file format, read through a memory mapping and written atomically.
// A file is an 8-byte little-endian header length N, N bytes of a JSON object
// {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
// and the tensors' bytes, offsets counted from the end of the header. Everything in a file is
// untrusted: open() checks every entry before any tensor is handed out.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moe {

// A read-only mapping of a whole file, unmapped by the destructor.
class MappedFile {
 public:
  explicit MappedFile(const std::string &path);  // throws moe::Error (MOE_ERR_INVALID_ARGUMENT)
  ~MappedFile();
  MappedFile(const MappedFile &) = delete;
  MappedFile &operator=(const MappedFile &) = delete;
  const unsigned char *data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const unsigned char *data_ = nullptr;
  size_t size_ = 0;
};

// Safetensors dtype names libmoe converts from and to ("F32", "BF16", "F16"): a moe_dtype, or -1.
int safetensors_dtype(const std::string &name);
const char *safetensors_dtype_name(int moe_dtype);

struct TensorInfo {
  std::string dtype;            // as written in the file
  std::vector<int64_t> shape;
  const unsigned char *data = nullptr;  // inside the mapping; bytes() of them
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Maps path and validates the header: its length, JSON (valid UTF-8, no duplicate keys), each
  // entry's fields, dtype sizes against offsets, every offset inside the file, no two tensors
  // overlapping. Throws moe::Error(MOE_ERR_INVALID_ARGUMENT) naming the file and the tensor.
  explicit SafetensorsFile(const std::string &path);
  const std::string &path() const { return path_; }
  const std::map<std::string, TensorInfo> &tensors() const { return tensors_; }
  const TensorInfo *find(const std::string &name) const;

 private:
  std::string path_;
  MappedFile map_;
  std::map<std::string, TensorInfo> tensors_;
};

// Parses untrusted JSON text: valid UTF-8, no key twice in one object, nesting at most max_depth.
// Throws moe::Error(MOE_ERR_INVALID_ARGUMENT) starting with `what`.
nlohmann::json parse_json_strictly(const char *begin, const char *end, const std::string &what, int max_depth);

// A tensor to write: name, moe_dtype, shape and its bytes (host memory, little-endian).
struct TensorOut {
  std::string name;
  int dtype = 0;
  std::vector<int64_t> shape;
  const void *data = nullptr;
  size_t nbytes = 0;
};

// Writes a safetensors file atomically: a temporary file beside path, written, flushed and
// fsync'ed, renamed over path, and the directory fsync'ed. On failure the temporary file is removed
// and path is left as it was. Throws moe::Error(MOE_ERR_INVALID_ARGUMENT) with errno's text when
// the file cannot be created or written (a missing directory, no permission, a full disk).
void write_safetensors(const std::string &path, const std::vector<TensorOut> &tensors,
                       const std::map<std::string, std::string> &metadata);

}  // namespace moe
