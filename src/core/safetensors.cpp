#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moe {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host needs byte swaps here");

namespace {

using nlohmann::json;

// The safetensors project's own limit: a header above it is refused before it is parsed.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// A file descriptor closed by the destructor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd &) = delete;
  Fd &operator=(const Fd &) = delete;
  int get() const { return fd_; }
  // Closes now, so that a failing close (NFS, a full disk) is seen; returns close's result.
  int close_now() {
    int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

// Byte sizes of every safetensors dtype, so that offsets are checked even for tensors libmoe does
// not convert (a whole-model file holds other dtypes beside the MoE block's).
size_t dtype_bytes(const std::string &d) {
  static const std::pair<const char *, size_t> kSizes[] = {
      {"F64", 8}, {"F32", 4},  {"F16", 2},  {"BF16", 2}, {"I64", 8},     {"I32", 4},     {"I16", 2},
      {"I8", 1},  {"U64", 8},  {"U32", 4},  {"U16", 2},  {"U8", 1},      {"BOOL", 1},    {"F8_E4M3", 1},
      {"F8_E5M2", 1}, {"F8_E8M0", 1}};
  for (const auto &[name, size] : kSizes)
    if (d == name) return size;
  return 0;
}

int64_t as_index(const json &v, bool *ok) {
  *ok = v.is_number_unsigned() && v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  return *ok ? static_cast<int64_t>(v.get<uint64_t>()) : 0;
}

std::string dims_text(const std::vector<int64_t> &s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

MappedFile::MappedFile(const std::string &path) {
  // O_NONBLOCK: a FIFO at path must not block the open (it is refused below as not a regular file).
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": cannot open: %s", path.c_str(), std::strerror(errno));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": cannot stat: %s", path.c_str(), std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": not a regular file", path.c_str());
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) return;  // mmap refuses length 0; the header check reports the file as too short
  void *p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (p == MAP_FAILED)
    fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": cannot map %zu bytes: %s", path.c_str(), size_,
         std::strerror(errno));
  data_ = static_cast<const unsigned char *>(p);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<unsigned char *>(data_), size_);
}

int safetensors_dtype(const std::string &name) {
  if (name == "F32") return MOE_DTYPE_F32;
  if (name == "BF16") return MOE_DTYPE_BF16;
  if (name == "F16") return MOE_DTYPE_F16;
  return -1;
}

const char *safetensors_dtype_name(int d) {
  switch (d) {
    case MOE_DTYPE_BF16:
      return "BF16";
    case MOE_DTYPE_F16:
      return "F16";
    default:
      return "F32";
  }
}

json parse_json_strictly(const char *begin, const char *end, const std::string &what, int max_depth) {
  // nlohmann keeps the last of two equal keys; a checkpoint that names a tensor twice is ambiguous,
  // so the parser's events are watched for it.
  std::vector<std::set<std::string>> keys;
  std::string problem;
  auto watch = [&](int depth, json::parse_event_t ev, json &parsed) {
    if (!problem.empty()) return true;
    if (depth > max_depth) {
      problem = format("nested deeper than %d levels", max_depth);
    } else if (ev == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (ev == json::parse_event_t::key && !keys.empty()) {
      const std::string &k = parsed.get_ref<const std::string &>();
      if (!keys.back().insert(k).second) problem = format("key \"%s\" appears twice in one object", k.c_str());
    }
    return true;
  };
  json j;
  try {
    j = json::parse(begin, end, watch);
  } catch (const json::exception &e) {
    // The parser quotes the bytes it stopped at, which may not be UTF-8: escape them so that the
    // message stays valid text for every binding.
    std::string msg;
    for (const char *c = e.what(); *c; ++c) {
      const unsigned char u = static_cast<unsigned char>(*c);
      msg += (u < 0x20 || u >= 0x7f) ? format("\\x%02x", u) : std::string(1, *c);
    }
    fail(MOE_ERR_INVALID_ARGUMENT, "%s: not valid JSON: %s", what.c_str(), msg.c_str());
  }
  if (!problem.empty()) fail(MOE_ERR_INVALID_ARGUMENT, "%s: %s", what.c_str(), problem.c_str());
  return j;
}

SafetensorsFile::SafetensorsFile(const std::string &path) : path_(path), map_(path) {
  const char *p = path.c_str();
  const size_t size = map_.size();
  if (size < 8)
    fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": truncated: %zu bytes, but a safetensors file starts with an 8-byte header length",
         p, size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | map_.data()[i];
  if (n > kMaxHeaderBytes)
    fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": header length %llu is over the limit of %llu bytes", p,
         (unsigned long long)n, (unsigned long long)kMaxHeaderBytes);
  if (n > size - 8)
    fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": truncated: the header length is %llu but only %zu bytes follow it", p,
         (unsigned long long)n, size - 8);
  const char *hb = reinterpret_cast<const char *>(map_.data() + 8);
  json h = parse_json_strictly(hb, hb + n, format("file \"%s\": header", p), 3);
  if (!h.is_object()) fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": the header is not a JSON object", p);

  const unsigned char *data = map_.data() + 8 + n;
  const uint64_t data_size = size - 8 - n;
  struct Span {
    uint64_t begin, end;
    const std::string *name;
  };
  std::vector<Span> spans;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string &name = it.key();
    const json &e = it.value();
    const char *nm = name.c_str();
    if (name == "__metadata__") {
      if (!e.is_object()) fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": __metadata__ is not an object", p);
      for (auto m = e.begin(); m != e.end(); ++m)
        if (!m.value().is_string())
          fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": __metadata__ entry \"%s\" is not a string", p, m.key().c_str());
      continue;
    }
    if (!e.is_object()) fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": its entry is not an object", p, nm);
    auto dt = e.find("dtype");
    auto sh = e.find("shape");
    auto off = e.find("data_offsets");
    if (dt == e.end() || !dt->is_string())
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": \"dtype\" is missing or not a string", p, nm);
    if (sh == e.end() || !sh->is_array())
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": \"shape\" is missing or not an array", p, nm);
    if (off == e.end() || !off->is_array() || off->size() != 2)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": \"data_offsets\" is missing or not [begin, end]", p,
           nm);
    TensorInfo t;
    t.dtype = dt->get<std::string>();
    int64_t numel = 1;
    bool overflow = false;
    for (const json &d : *sh) {
      bool ok;
      int64_t v = as_index(d, &ok);
      if (!ok)
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": shape %s holds %s, not a dimension", p, nm,
             sh->dump().c_str(), d.dump().c_str());
      t.shape.push_back(v);
      overflow = overflow || __builtin_mul_overflow(numel, v, &numel);
    }
    bool ok0, ok1;
    const int64_t b = as_index((*off)[0], &ok0), en = as_index((*off)[1], &ok1);
    if (!ok0 || !ok1)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": data_offsets %s are not byte offsets", p, nm,
           off->dump().c_str());
    if (b > en)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": data_offsets [%lld, %lld] end before they begin", p,
           nm, (long long)b, (long long)en);
    if (static_cast<uint64_t>(en) > data_size)
      fail(MOE_ERR_INVALID_ARGUMENT,
           "file \"%s\": tensor \"%s\": data_offsets [%lld, %lld] run past the end of the data (%llu bytes): the "
           "file is truncated or the offsets are wrong",
           p, nm, (long long)b, (long long)en, (unsigned long long)data_size);
    const size_t item = dtype_bytes(t.dtype);
    int64_t want = 0;
    if (item != 0) {
      if (overflow || __builtin_mul_overflow(numel, static_cast<int64_t>(item), &want))
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": shape %s is too large", p, nm,
             dims_text(t.shape).c_str());
      if (want != en - b)
        fail(MOE_ERR_INVALID_ARGUMENT,
             "file \"%s\": tensor \"%s\": %s %s needs %lld bytes but data_offsets [%lld, %lld] hold %lld", p, nm,
             t.dtype.c_str(), dims_text(t.shape).c_str(), (long long)want, (long long)b, (long long)en,
             (long long)(en - b));
    }
    t.data = data + b;
    t.nbytes = static_cast<size_t>(en - b);
    auto [slot, fresh] = tensors_.emplace(name, std::move(t));
    if (b < en) spans.push_back({static_cast<uint64_t>(b), static_cast<uint64_t>(en), &slot->first});
  }
  std::sort(spans.begin(), spans.end(), [](const Span &a, const Span &b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensors \"%s\" [%llu, %llu) and \"%s\" [%llu, %llu) overlap", p,
           spans[i - 1].name->c_str(), (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end,
           spans[i].name->c_str(), (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
}

const TensorInfo *SafetensorsFile::find(const std::string &name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

namespace {

// The temporary file of a save: removed by the destructor unless the rename happened.
class TempFile {
 public:
  explicit TempFile(const std::string &target) : name_(target + ".tmp.XXXXXX") {
    fd_ = ::mkostemp(name_.data(), O_CLOEXEC);
    if (fd_ < 0)
      fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": cannot create a file beside it: %s", target.c_str(),
           std::strerror(errno));
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!renamed_) ::unlink(name_.c_str());
  }
  TempFile(const TempFile &) = delete;
  TempFile &operator=(const TempFile &) = delete;
  int fd() const { return fd_; }
  const std::string &name() const { return name_; }
  int close_now() {
    int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }
  void renamed() { renamed_ = true; }

 private:
  std::string name_;
  int fd_ = -1;
  bool renamed_ = false;
};

void write_all(const TempFile &f, const std::string &target, const void *data, size_t n) {
  const char *p = static_cast<const char *>(data);
  while (n > 0) {
    ssize_t w = ::write(f.fd(), p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0)
      fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": writing failed: %s (the previous file, if any, is unchanged)",
           target.c_str(), w < 0 ? std::strerror(errno) : "no progress");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

void write_safetensors(const std::string &path, const std::vector<TensorOut> &tensors,
                       const std::map<std::string, std::string> &metadata) {
  json h = json::object();
  uint64_t offset = 0;
  for (const TensorOut &t : tensors) {
    h[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                 {"shape", t.shape},
                 {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::string header = h.dump();
  // The data starts 8-byte aligned (as the safetensors writer does), padded with spaces.
  header.append((8 - header.size() % 8) % 8, ' ');
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(header.size()) >> (8 * i));

  TempFile tmp(path);
  ::fchmod(tmp.fd(), 0644);  // mkstemp's 0600 would hide the checkpoint from other users
  write_all(tmp, path, len, sizeof len);
  write_all(tmp, path, header.data(), header.size());
  for (const TensorOut &t : tensors) write_all(tmp, path, t.data, t.nbytes);
  if (::fsync(tmp.fd()) != 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": fsync failed: %s", path.c_str(), std::strerror(errno));
  if (tmp.close_now() != 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": close failed: %s", path.c_str(), std::strerror(errno));
  if (::rename(tmp.name().c_str(), path.c_str()) != 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": cannot rename the finished file over it: %s", path.c_str(),
         std::strerror(errno));
  tmp.renamed();
  // The rename itself reaches the disk only with the directory.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d.get() >= 0) ::fsync(d.get());
}

}  // namespace moe
