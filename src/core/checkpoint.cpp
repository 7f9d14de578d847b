// moe_layer_load: checkpoint files (one safetensors file, or the shards of an index) read into
// staging copies of every parameter, then committed (saving: checkpoint_save.cpp).
#include "core/checkpoint.h"

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "core/checked.h"
#include "core/error.h"
#include "core/half.h"
#include "core/safetensors.h"

namespace moe {
namespace {

constexpr const char *kSingleName = "model.safetensors";
constexpr const char *kIndexName = "model.safetensors.index.json";
// An index names each tensor once; the largest published ones are a few MB.
constexpr size_t kMaxIndexBytes = 100'000'000;

bool ends_with(const std::string &s, const char *suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

bool is_dir(const std::string &p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string &p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// The files of a checkpoint and which one holds each tensor. Shards are opened (and checked) when
// a tensor of theirs is first needed.
class Checkpoint : public KeyLookup {
 public:
  explicit Checkpoint(const std::string &path) {
    std::string p = path;
    if (is_dir(p)) {
      const std::string dir = p + (ends_with(p, "/") ? "" : "/");
      if (exists(dir + kIndexName))
        p = dir + kIndexName;
      else if (exists(dir + kSingleName))
        p = dir + kSingleName;
      else
        fail(MOE_ERR_INVALID_ARGUMENT, "path \"%s\": a directory with neither %s nor %s", path.c_str(), kIndexName,
             kSingleName);
    }
    if (ends_with(p, ".json"))
      read_index(p);
    else
      single_ = std::make_unique<SafetensorsFile>(p);
  }

  bool has(const std::string &key) const override {
    return single_ ? single_->find(key) != nullptr : weight_map_.count(key) != 0;
  }

  // Every tensor name the checkpoint holds.
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    if (single_)
      for (const auto &kv : single_->tensors()) out.push_back(kv.first);
    else
      for (const auto &kv : weight_map_) out.push_back(kv.first);
    return out;
  }

  // The tensor and the file it is in; fails naming where it was looked for.
  const TensorInfo &get(const std::string &key, const std::string &why, const SafetensorsFile **file) {
    if (single_) {
      const TensorInfo *t = single_->find(key);
      if (!t)
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\" is missing (%s)", single_->path().c_str(),
             key.c_str(), why.c_str());
      *file = single_.get();
      return *t;
    }
    auto it = weight_map_.find(key);
    if (it == weight_map_.end())
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\" is missing from weight_map (%s)", index_.c_str(),
           key.c_str(), why.c_str());
    auto &shard = shards_[it->second];
    if (!shard) shard = std::make_unique<SafetensorsFile>(dir_ + it->second);
    const TensorInfo *t = shard->find(key);
    if (!t)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\" is missing, though \"%s\" maps it to this file",
           shard->path().c_str(), key.c_str(), index_.c_str());
    *file = shard.get();
    return *t;
  }

 private:
  void read_index(const std::string &path) {
    index_ = path;
    const size_t slash = path.find_last_of('/');
    dir_ = slash == std::string::npos ? "" : path.substr(0, slash + 1);
    MappedFile f(path);
    if (f.size() > kMaxIndexBytes)
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": %zu bytes, over the limit of %zu for an index", path.c_str(),
           f.size(), kMaxIndexBytes);
    const char *b = reinterpret_cast<const char *>(f.data());
    nlohmann::json j = parse_json_strictly(b, b + f.size(), format("file \"%s\"", path.c_str()), 3);
    auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (!j.is_object() || wm == j.end() || !wm->is_object())
      fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": not a safetensors index (no \"weight_map\" object)", path.c_str());
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string())
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": its weight_map entry is not a file name",
             path.c_str(), it.key().c_str());
      const std::string shard = it.value().get<std::string>();
      // Shards live beside the index: a name that leaves the directory is refused.
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": shard name \"%s\" is not a file name in the index's directory",
             path.c_str(), it.key().c_str(), shard.c_str());
      weight_map_[it.key()] = shard;
    }
  }

  std::unique_ptr<SafetensorsFile> single_;
  std::string index_, dir_;
  std::map<std::string, std::string> weight_map_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

std::string dims(const std::vector<int64_t> &s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

float load_elem(const unsigned char *p, int dt) {
  if (dt == MOE_DTYPE_F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return dt == MOE_DTYPE_BF16 ? bf16_to_float(h) : f16_to_float(h);
}

void store_elem(unsigned char *p, int dt, float v) {
  if (dt == MOE_DTYPE_F32) {
    std::memcpy(p, &v, 4);
    return;
  }
  const uint16_t h = dt == MOE_DTYPE_BF16 ? float_to_bf16(v) : float_to_f16(v);
  std::memcpy(p, &h, 2);
}

// Copies one piece into staging (the parameter's storage dtype), converting dtypes.
void copy_piece(const Piece &pc, const TensorInfo &t, int src_dt, unsigned char *staging, int dst_dt) {
  const int64_t R = t.shape.size() == 1 ? 1 : t.shape[t.shape.size() - 2];
  const int64_t C = t.shape.back();
  const size_t ss = dtype_size(src_dt), ds = dtype_size(dst_dt);
  if (pc.transpose || pc.row_step != 1 || pc.col_step != 1) {
    // The map built these views inside the tensor's checked shape.
    for (int64_t r = 0; r < pc.rows; ++r)
      for (int64_t c = 0; c < pc.cols; ++c) {
        const int64_t i = pc.transpose ? c : r, j = pc.transpose ? r : c;
        const int64_t at = (pc.outer * R + pc.row0 + i * pc.row_step) * C + pc.col0 + j * pc.col_step;
        const unsigned char *src = t.data + at * static_cast<int64_t>(ss);
        unsigned char *dst = staging + (pc.dst + r * pc.dst_ld + c) * static_cast<int64_t>(ds);
        if (src_dt == dst_dt)
          std::memcpy(dst, src, ss);
        else
          store_elem(dst, dst_dt, load_elem(src, src_dt));
      }
    return;
  }
  for (int64_t r = 0; r < pc.rows; ++r) {
    const unsigned char *src = t.data + ((pc.outer * R + pc.row0 + r) * C + pc.col0) * static_cast<int64_t>(ss);
    unsigned char *dst = staging + (pc.dst + r * pc.dst_ld) * static_cast<int64_t>(ds);
    if (src_dt == dst_dt) {
      std::memcpy(dst, src, static_cast<size_t>(pc.cols) * ss);  // bit for bit, NaN payloads included
    } else {
      for (int64_t c = 0; c < pc.cols; ++c) store_elem(dst + c * ds, dst_dt, load_elem(src + c * ss, src_dt));
    }
  }
}

// The 16 values of a 4-bit e2m1 code (OCP Microscaling Formats v1.0): sign, 2 exponent bits, 1
// mantissa bit.
constexpr float kE2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// Copies one MXFP4 piece into staging, dequantised: value = e2m1 * 2^(scale - 127) (scale 255 is
// NaN, as e8m0 defines it). blocks and scales have the shapes the caller checked.
void copy_mxfp4_piece(const Piece &pc, const TensorInfo &blocks, const TensorInfo &scales, unsigned char *staging,
                      int dst_dt) {
  const int64_t R = blocks.shape[1], G = blocks.shape[2];
  const size_t ds = dtype_size(dst_dt);
  for (int64_t r = 0; r < pc.rows; ++r)
    for (int64_t c = 0; c < pc.cols; ++c) {
      const int64_t i = pc.transpose ? c : r, j = pc.transpose ? r : c;
      const int64_t row = pc.outer * R + pc.row0 + i * pc.row_step, col = pc.col0 + j * pc.col_step;
      const int64_t block = row * G + col / 32, within = col % 32;
      const unsigned char byte = blocks.data[block * 16 + within / 2];
      const int code = within % 2 == 0 ? byte & 0x0F : byte >> 4;
      const int e8m0 = scales.data[block];
      const float v = e8m0 == 255 ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(kE2m1[code], e8m0 - 127);
      store_elem(staging + (pc.dst + r * pc.dst_ld + c) * static_cast<int64_t>(ds), dst_dt, v);
    }
}

}  // namespace

void load_checkpoint(moe_layer &layer, const std::string &path, const std::string &prefix, const std::string &family) {
  Checkpoint ck(path);
  std::vector<Target> targets = map_checkpoint(layer, family, prefix, ck);
  const std::string fam = family.empty() ? "libmoe" : family;

  // Staging: every parameter is read in full before any is changed.
  std::vector<std::vector<unsigned char>> staging(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const Target &t = targets[i];
    const Param &p = *t.param;
    staging[i].assign(checked_bytes(p.numel, dtype_size(p.dtype), p.name.c_str()), 0);
    for (const Piece &pc : t.pieces) {
      if (!pc.read) continue;
      const SafetensorsFile *file = nullptr;
      const std::string why = format("family %s, for %s", fam.c_str(), p.name.c_str());
      const TensorInfo &ti = ck.get(pc.key, why, &file);
      const char *fp = file->path().c_str();
      if (!pc.scales_key.empty()) {
        const SafetensorsFile *sfile = nullptr;
        const TensorInfo &ts = ck.get(pc.scales_key, why, &sfile);
        const std::vector<int64_t> sshape(pc.shape.begin(), pc.shape.end() - 1);
        for (const auto &[t, f, k, want] :
             {std::tuple{&ti, file, &pc.key, &pc.shape}, std::tuple{&ts, sfile, &pc.scales_key, &sshape}}) {
          if (t->dtype != "U8")
            fail(MOE_ERR_INVALID_ARGUMENT,
                 "file \"%s\": tensor \"%s\": dtype %s, but an MXFP4 tensor for %s must be U8", f->path().c_str(),
                 k->c_str(), t->dtype.c_str(), p.name.c_str());
          if (t->shape != *want)
            fail(MOE_ERR_INVALID_ARGUMENT,
                 "file \"%s\": tensor \"%s\": shape %s, but %s of this layer (d_model %lld, d_ff %lld, %lld experts) "
                 "needs %s",
                 f->path().c_str(), k->c_str(), dims(t->shape).c_str(), p.name.c_str(), (long long)layer.cfg.d,
                 (long long)layer.cfg.ff, (long long)layer.cfg.E, dims(*want).c_str());
        }
        copy_mxfp4_piece(pc, ti, ts, staging[i].data(), p.dtype);
        continue;
      }
      const int src_dt = safetensors_dtype(ti.dtype);
      if (src_dt < 0)
        fail(MOE_ERR_INVALID_ARGUMENT, "file \"%s\": tensor \"%s\": dtype %s, but %s must be F32, BF16 or F16", fp,
             pc.key.c_str(), ti.dtype.c_str(), p.name.c_str());
      if (ti.shape != pc.shape)
        fail(MOE_ERR_INVALID_ARGUMENT,
             "file \"%s\": tensor \"%s\": shape %s, but %s of this layer (d_model %lld, d_ff %lld, %lld experts) "
             "needs %s",
             fp, pc.key.c_str(), dims(ti.shape).c_str(), p.name.c_str(), (long long)layer.cfg.d,
             (long long)layer.cfg.ff, (long long)layer.cfg.E, dims(pc.shape).c_str());
      copy_piece(pc, ti, src_dt, staging[i].data(), p.dtype);
    }
    if (layer.cfg.c.check_finite) {
      const size_t es = dtype_size(p.dtype);
      for (int64_t j = 0; j < p.numel; ++j)
        if (!std::isfinite(load_elem(staging[i].data() + j * es, p.dtype)))
          fail(MOE_ERR_NONFINITE, "path \"%s\": %s[%lld] is not finite as stored in %s (check_finite is on)",
               path.c_str(), p.name.c_str(), (long long)j, dtype_name(p.dtype));
    }
  }

  // Everything under the prefix must have a place in the layer: a tensor left over means the
  // layer's configuration does not match the checkpoint (a shared expert, a gate, a GLU half).
  // Checked after reading, so that a wrong family is reported as the tensor it lacks.
  std::set<std::string> known;
  for (const Target &t : targets)
    for (const Piece &pc : t.pieces) {
      known.insert(pc.key);
      if (!pc.scales_key.empty()) known.insert(pc.scales_key);
    }
  const std::string under = prefix.empty() ? "" : prefix + ".";
  for (const std::string &k : ck.keys())
    if (k.compare(0, under.size(), under) == 0 && !known.count(k))
      fail(MOE_ERR_INVALID_ARGUMENT,
           "path \"%s\": tensor \"%s\" is under prefix \"%s\" but has no place in this layer with family %s (does "
           "the layer's configuration match the checkpoint's?)",
           path.c_str(), k.c_str(), prefix.c_str(), fam.c_str());

  // Commit: host copies into the layer's storage.
  bool trainable_changed = false;
  for (size_t i = 0; i < targets.size(); ++i) {
    Param &p = *targets[i].param;
    layer.backend->upload(p.data.get(), staging[i].data(), staging[i].size());
    if (p.trainable) {
      trainable_changed = true;
      layer.last_set = &p;
    }
  }
  if (trainable_changed) ++layer.param_version;
}

}  // namespace moe
