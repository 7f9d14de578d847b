// moe_layer_save and moe_layer_save_as: every parameter into one safetensors file, in libmoe's
// names or, by reversing a family's mapping (checkpoint_map.cpp), in that family's.
#include <sys/stat.h>

#include <cstring>
#include <map>

#include "core/checkpoint.h"
#include "core/error.h"
#include "core/half.h"
#include "core/safetensors.h"

namespace moe {
namespace {

constexpr const char *kSingleName = "model.safetensors";

bool ends_with(const std::string &s, const char *suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::string target_file(const std::string &path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    return path + (ends_with(path, "/") ? "" : "/") + kSingleName;
  return path;
}

// map_checkpoint picks a family's layout by the keys a checkpoint holds. A save answers as if the
// file held transformers 5's fused experts (experts.gate_up_proj / down_proj, the one layout every
// gated family shares), Switch's router bias (so a layer with router_logit_bias keeps it), and
// gpt-oss's plain tensors, never its MXFP4 blocks (a lossy quantisation).
struct SaveLayout : KeyLookup {
  bool has(const std::string &key) const override { return !ends_with(key, "_blocks"); }
};

std::vector<unsigned char> host_copy(const moe_layer &layer, const Param &p) {
  std::vector<unsigned char> h(static_cast<size_t>(p.numel) * dtype_size(p.dtype));  // a device pool may round p.data up
  layer.backend->download(h.data(), p.data.get(), h.size());
  return h;
}

void save_libmoe(const moe_layer &layer, const std::string &target, const std::string &prefix) {
  std::vector<std::vector<unsigned char>> host(layer.params.size());
  std::vector<TensorOut> out;
  for (size_t i = 0; i < layer.params.size(); ++i) {
    const Param &p = layer.params[i];
    host[i] = host_copy(layer, p);
    TensorOut t;
    t.name = prefix.empty() ? p.name : prefix + "." + p.name;
    t.dtype = p.dtype;
    t.shape.assign(p.shape, p.shape + p.ndim);
    t.data = host[i].data();
    t.nbytes = host[i].size();
    out.push_back(std::move(t));
  }
  write_safetensors(target, out, {{"format", "pt"}, {"producer", "libmoe"}});
}

// One checkpoint tensor being assembled from the pieces of one or more parameters.
struct Assembled {
  std::vector<int64_t> shape;
  int dtype = MOE_DTYPE_F32;
  int64_t numel = 1;
  std::vector<unsigned char> bytes;  // zeros where no piece writes
};

// The exact inverse of the load's copy: parameter element (r, c) of the piece goes where the load
// reads it from.
void write_piece(const Piece &pc, const Param &p, const unsigned char *src, Assembled &t) {
  const int64_t R = t.shape.size() == 1 ? 1 : t.shape[t.shape.size() - 2];
  const int64_t C = t.shape.back();
  for (int64_t r = 0; r < pc.rows; ++r)
    for (int64_t c = 0; c < pc.cols; ++c) {
      const int64_t i = pc.transpose ? c : r, j = pc.transpose ? r : c;
      const int64_t at = (pc.outer * R + pc.row0 + i * pc.row_step) * C + pc.col0 + j * pc.col_step;
      const int64_t from = pc.dst + r * pc.dst_ld + c;
      if (at < 0 || at >= t.numel || from < 0 || from >= p.numel)
        fail(MOE_ERR_INTERNAL, "save: the mapping of %s puts element %lld outside tensor \"%s\"", p.name.c_str(),
             (long long)from, pc.key.c_str());
      if (t.dtype == p.dtype)
        std::memcpy(elem_at(t.bytes.data(), t.dtype, at), elem_at(src, p.dtype, from), dtype_size(p.dtype));
      else
        store_elem(t.bytes.data(), t.dtype, at, load_elem(src, p.dtype, from));
    }
}

void save_family(const moe_layer &layer, const std::string &path, const std::string &target, const std::string &prefix,
                 const std::string &family) {
  const std::vector<Target> targets = map_checkpoint(layer, family, prefix, SaveLayout{});
  std::vector<std::string> order;  // tensors in the order the mapping first names them
  std::map<std::string, Assembled> tensors;
  for (const Target &t : targets) {
    const Param &p = *t.param;
    const std::vector<unsigned char> host = host_copy(layer, p);
    if (t.zero_reason) {
      // The family has no tensor for it: a load sets it to zero, so only zeros survive the trip.
      for (int64_t i = 0; i < p.numel; ++i) {
        const float v = load_elem(host.data(), p.dtype, i);
        if (v != 0.0f)
          fail(MOE_ERR_INVALID_ARGUMENT,
               "family: %s cannot hold the layer's %s (%s), but %s[%lld] is %g: saving \"%s\" in %s's names would "
               "lose it; set it to zero or save in libmoe's names",
               family.c_str(), p.name.c_str(), t.zero_reason, p.name.c_str(), (long long)i, v, path.c_str(),
               family.c_str());
      }
      continue;
    }
    for (const Piece &pc : t.pieces) {
      if (!pc.scales_key.empty())
        fail(MOE_ERR_INTERNAL, "save: family %s chose the MXFP4 tensor \"%s\" for %s", family.c_str(),
             pc.key.c_str(), p.name.c_str());
      auto it = tensors.find(pc.key);
      if (it == tensors.end()) {
        Assembled a;
        a.shape = pc.shape;
        a.dtype = p.dtype;
        for (int64_t n : a.shape) a.numel *= n;  // shapes from the layer's checked sizes
        a.bytes.assign(static_cast<size_t>(a.numel) * dtype_size(a.dtype), 0);
        it = tensors.emplace(pc.key, std::move(a)).first;
        order.push_back(pc.key);
      }
      write_piece(pc, p, host.data(), it->second);
    }
  }
  std::vector<TensorOut> out;
  for (const std::string &k : order) {
    const Assembled &a = tensors.at(k);
    TensorOut t;
    t.name = k;
    t.dtype = a.dtype;
    t.shape = a.shape;
    t.data = a.bytes.data();
    t.nbytes = a.bytes.size();
    out.push_back(std::move(t));
  }
  write_safetensors(target, out, {{"format", "pt"}, {"producer", "libmoe"}});
}

}  // namespace

void save_checkpoint(const moe_layer &layer, const std::string &path, const std::string &prefix,
                     const std::string &family) {
  if (layer.cfg.ranks > 1)
    fail(MOE_ERR_UNSUPPORTED,
         "layer: it holds %lld of %lld experts (a comm of %d ranks); saving an expert-parallel layer is not built "
         "yet: gather the experts into one layer",
         (long long)layer.cfg.E_local, (long long)layer.cfg.E, layer.cfg.ranks);
  const std::string target = target_file(path);
  if (family.empty() || family == "libmoe")
    save_libmoe(layer, target, prefix);
  else
    save_family(layer, path, target, prefix, family);
}

}  // namespace moe
