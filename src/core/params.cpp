// The parameter registry: names, shapes, storage and deterministic initialisation.
#include <cmath>
#include <cstring>
#include <vector>

#include "core/checked.h"
#include "core/half.h"
#include "core/layer.h"
#include "core/rng.h"

namespace moe {
namespace {

// A stable number per parameter name, so that a parameter's initial values do not depend on
// which other parameters the configuration has.
uint64_t name_stream(const std::string &name) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ULL;
  return kStreamInit + (h << 8);
}

// The router's parameters (and shared.gate) are float32; the experts' are stored in `dtype`.
Param &add(moe_layer &l, const char *name, std::initializer_list<int64_t> shape, bool trainable,
           int dtype = MOE_DTYPE_F32) {
  Param p;
  p.name = name;
  p.ndim = static_cast<int>(shape.size());
  int64_t n = 1, i = 0;
  for (int64_t s : shape) {
    p.shape[i++] = s;
    n = checked_mul(n, s, name);
  }
  p.numel = n;
  p.trainable = trainable;
  p.dtype = dtype;
  size_t bytes = checked_bytes(n, dtype_size(dtype), name);
  p.data = l.backend->alloc(bytes);
  if (trainable) {
    p.grad = l.backend->alloc(bytes);
    l.backend->zero(p.grad);
  }
  l.params.push_back(std::move(p));
  return l.params.back();
}

// Uniform in +-bound, counter = the element's global index (first_elem offsets a rank's slice),
// so an expert-parallel rank initialises its experts exactly as one rank holding all would.
void init_uniform(moe_layer &l, Param &p, float bound, int64_t first_elem) {
  std::vector<float> host(static_cast<size_t>(p.numel));
  const uint64_t stream = name_stream(p.name);
  const uint64_t seed = l.cfg.c.seed;
  // Counter-based: the same values for any thread count.
#pragma omp parallel for schedule(static) if (p.numel >= (1 << 16))
  for (int64_t i = 0; i < p.numel; ++i)
    host[i] = bound * (2.0f * rng_uniform(seed, stream, static_cast<uint64_t>(first_elem + i)) - 1.0f);
  upload_param(l, p, host.data());
}

}  // namespace

void upload_param(const moe_layer &l, const Param &p, const float *host) {
  const size_t n = static_cast<size_t>(p.numel);
  if (p.dtype == MOE_DTYPE_F32) {
    l.backend->upload(p.data.get(), host, n * sizeof(float));
    return;
  }
  std::vector<uint16_t> narrow(n);
  convert_host(narrow.data(), p.dtype, host, MOE_DTYPE_F32, p.numel);
  l.backend->upload(p.data.get(), narrow.data(), n * sizeof(uint16_t));
}

void download_param(const moe_layer &l, const Param &p, const Buffer &src, float *host) {
  const size_t n = static_cast<size_t>(p.numel);
  if (p.dtype == MOE_DTYPE_F32) {
    l.backend->download(host, src.get(), n * sizeof(float));
    return;
  }
  std::vector<uint16_t> narrow(n);
  l.backend->download(narrow.data(), src.get(), n * sizeof(uint16_t));
  convert_host(host, MOE_DTYPE_F32, narrow.data(), p.dtype, p.numel);
}

void create_params(moe_layer &l) {
  const Config &c = l.cfg;
  // Pointers into the vector must stay valid: reserve the most it can hold.
  l.params.reserve(14);
  const int64_t El = c.E_local;
  const float bd = 1.0f / std::sqrt(static_cast<float>(c.d));
  const float bff = 1.0f / std::sqrt(static_cast<float>(c.ff));

  l.router_w = &add(l, "router.weight", {c.E, c.d}, true);
  init_uniform(l, *l.router_w, bd, 0);
  if (c.c.noise == MOE_NOISE_GAUSSIAN) {
    l.noise_w = &add(l, "router.noise_weight", {c.E, c.d}, true);
    l.backend->zero(l.noise_w->data);  // Shazeer et al.: the noise starts off
  }
  l.router_bias = &add(l, "router.bias", {c.E}, false);
  l.backend->zero(l.router_bias->data);
  // Biases start at zero, as transformers initialises gpt-oss's: a layer with them starts as one without.
  if (c.c.router_logit_bias) {
    l.logit_bias = &add(l, "router.logit_bias", {c.E}, true);
    l.backend->zero(l.logit_bias->data);
  }

  const int64_t off1 = c.expert_begin * c.ff * c.d;
  const int dt = c.c.dtype;
  l.w1 = &add(l, "experts.w1", {El, c.ff, c.d}, true, dt);
  init_uniform(l, *l.w1, bd, off1);
  if (c.glu) {
    l.w3 = &add(l, "experts.w3", {El, c.ff, c.d}, true, dt);
    init_uniform(l, *l.w3, bd, off1);
  }
  l.w2 = &add(l, "experts.w2", {El, c.d, c.ff}, true, dt);
  init_uniform(l, *l.w2, bff, c.expert_begin * c.d * c.ff);
  if (c.c.expert_bias) {
    l.b1 = &add(l, "experts.b1", {El, c.ff}, true, dt);
    l.backend->zero(l.b1->data);
    if (c.glu) {
      l.b3 = &add(l, "experts.b3", {El, c.ff}, true, dt);
      l.backend->zero(l.b3->data);
    }
    l.b2 = &add(l, "experts.b2", {El, c.d}, true, dt);
    l.backend->zero(l.b2->data);
  }

  if (c.S > 0) {
    const float bffs = 1.0f / std::sqrt(static_cast<float>(c.ffs));
    l.sw1 = &add(l, "shared.w1", {c.S, c.ffs, c.d}, true, dt);
    init_uniform(l, *l.sw1, bd, 0);
    if (c.glu) {
      l.sw3 = &add(l, "shared.w3", {c.S, c.ffs, c.d}, true, dt);
      init_uniform(l, *l.sw3, bd, 0);
    }
    l.sw2 = &add(l, "shared.w2", {c.S, c.d, c.ffs}, true, dt);
    init_uniform(l, *l.sw2, bffs, 0);
    if (c.c.shared_gate) {
      l.sgate = &add(l, "shared.gate", {1, c.d}, true);
      init_uniform(l, *l.sgate, bd, 0);
    }
  }
}

Param *moe_layer_find_impl(moe_layer &l, const char *name) {
  for (Param &p : l.params)
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace moe

moe::Param *moe_layer::find(const char *name) { return moe::moe_layer_find_impl(*this, name); }
