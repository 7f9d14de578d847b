// extern "C" entry points for layers and parameters: argument checks first,
// then the core. Nothing is changed before every check has passed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "api/guard.h"
#include "core/checked.h"
#include "core/half.h"
#include "core/layer.h"
#include "core/module.h"

using moe::fail;
using moe::require;

namespace {

// Features of the design this build does not have yet are refused, never silently ignored.
void refuse_unbuilt(const moe::Config &c) {
  if (c.c.comm != nullptr && c.c.routing == MOE_ROUTE_EXPERT_CHOICE)
    fail(MOE_ERR_UNSUPPORTED,
         "cfg->comm is set with expert-choice routing: experts choosing among every rank's tokens is not built yet");
}

moe::Param &param_by_name(const moe_layer *layer, const char *name) {
  require(layer != nullptr, "layer is NULL");
  require(name != nullptr, "name is NULL");
  moe::Param *p = const_cast<moe_layer *>(layer)->find(name);
  if (!p) {
    std::string known;
    for (const moe::Param &q : layer->params) known += (known.empty() ? "" : ", ") + q.name;
    fail(MOE_ERR_INVALID_ARGUMENT, "name: this layer has no parameter \"%s\" (it has %s)", name, known.c_str());
  }
  return *p;
}

void check_count(const moe::Param &p, const void *host, int64_t count) {
  require(host != nullptr, "host is NULL");
  if (count != p.numel)
    fail(MOE_ERR_INVALID_ARGUMENT, "count is %lld but %s has %lld elements", (long long)count, p.name.c_str(),
         (long long)p.numel);
}

}  // namespace

extern "C" {

MOE_API moe_status moe_layer_create(const moe_config *cfg, moe_layer **out) {
  return moe::call("moe_layer_create", [&] {
    require(cfg != nullptr, "cfg is NULL");
    require(out != nullptr, "out is NULL");
    moe::Config c = moe::make_config(cfg);
    refuse_unbuilt(c);
    auto layer = std::make_unique<moe_layer>();
    layer->cfg = c;
    const moe_backend_ops *ops = moe_cpu_backend();
    if (c.c.device == MOE_DEVICE_CUDA) ops = moe::cuda_backend_ops();
    layer->backend = std::make_unique<moe::Backend>(ops, layer->cfg.c);
    moe::create_params(*layer);
    *out = layer.release();
  });
}

MOE_API void moe_layer_destroy(moe_layer *layer) {
  if (!layer) return;
  // Contexts still alive keep the layer's memory until the last of them is destroyed.
  if (layer->live_contexts > 0) {
    layer->destroyed = true;
    return;
  }
  std::unique_ptr<moe_layer> owned(layer);
}

MOE_API moe_status moe_layer_get_config(const moe_layer *layer, moe_config *out) {
  return moe::call("moe_layer_get_config", [&] {
    require(layer != nullptr, "layer is NULL");
    require(out != nullptr, "out is NULL");
    if (out->struct_size < sizeof(size_t) || out->struct_size > 4096)
      fail(MOE_ERR_INVALID_ARGUMENT, "out->struct_size is %zu, expected %zu", out->struct_size, sizeof(moe_config));
    size_t n = out->struct_size < sizeof(moe_config) ? out->struct_size : sizeof(moe_config);
    size_t keep = out->struct_size;
    std::memcpy(out, &layer->cfg.c, n);
    out->struct_size = keep < sizeof(moe_config) ? keep : sizeof(moe_config);
  });
}

MOE_API moe_status moe_layer_set_stream(moe_layer *layer, void *cuda_stream) {
  return moe::call("moe_layer_set_stream", [&] {
    require(layer != nullptr, "layer is NULL");
    layer->backend->check(layer->backend->ops()->set_stream(layer->backend->state(), cuda_stream), "set_stream");
  });
}

MOE_API int moe_layer_num_params(const moe_layer *layer) {
  if (!layer) {
    moe::set_last_error(MOE_ERR_INVALID_ARGUMENT, "moe_layer_num_params: layer is NULL");
    return -1;
  }
  return static_cast<int>(layer->params.size());
}

MOE_API moe_status moe_layer_param_info(const moe_layer *layer, int index, moe_param_info *out) {
  return moe::call("moe_layer_param_info", [&] {
    require(layer != nullptr, "layer is NULL");
    require(out != nullptr, "out is NULL");
    if (index < 0 || index >= static_cast<int>(layer->params.size()))
      fail(MOE_ERR_INVALID_ARGUMENT, "index is %d, must be in [0, %zu)", index, layer->params.size());
    const moe::Param &p = layer->params[static_cast<size_t>(index)];
    moe_param_info info{};
    info.name = p.name.c_str();
    info.ndim = p.ndim;
    for (int i = 0; i < 3; ++i) info.shape[i] = p.shape[i];
    info.trainable = p.trainable ? 1 : 0;
    *out = info;
  });
}

MOE_API moe_status moe_layer_set_param(moe_layer *layer, const char *name, const float *host, int64_t count) {
  return moe::call("moe_layer_set_param", [&] {
    moe::Param &p = param_by_name(layer, name);
    check_count(p, host, count);
    if (layer->cfg.c.check_finite)
      for (int64_t i = 0; i < count; ++i) {
        if (!std::isfinite(host[i]))
          fail(MOE_ERR_NONFINITE, "host[%lld] is %g: %s must be finite (check_finite is on)", (long long)i,
               (double)host[i], name);
        // A finite float32 may still overflow a float16 parameter.
        if (!std::isfinite(moe::round_to(p.dtype, host[i])))
          fail(MOE_ERR_NONFINITE,
               "host[%lld] is %g: %s is stored as %s, where it is not finite "
               "(check_finite is on)",
               (long long)i, (double)host[i], name, moe::dtype_name(p.dtype));
      }
    moe::upload_param(*layer, p, host);
    if (p.trainable) {  // router.bias only steers selection; backward never reads it
      ++layer->param_version;
      layer->last_set = &p;
    }
  });
}

MOE_API moe_status moe_layer_get_param(const moe_layer *layer, const char *name, float *host, int64_t count) {
  return moe::call("moe_layer_get_param", [&] {
    moe::Param &p = param_by_name(layer, name);
    check_count(p, host, count);
    moe::download_param(*layer, p, p.data, host);
  });
}

MOE_API moe_status moe_layer_get_grad(const moe_layer *layer, const char *name, float *host, int64_t count) {
  return moe::call("moe_layer_get_grad", [&] {
    moe::Param &p = param_by_name(layer, name);
    if (!p.trainable) fail(MOE_ERR_INVALID_ARGUMENT, "name: %s is not trainable and has no gradient", name);
    check_count(p, host, count);
    moe::download_param(*layer, p, p.grad, host);
  });
}

MOE_API moe_status moe_layer_zero_grad(moe_layer *layer) {
  return moe::call("moe_layer_zero_grad", [&] {
    require(layer != nullptr, "layer is NULL");
    for (moe::Param &p : layer->params)
      if (p.trainable) layer->backend->zero(p.grad);
  });
}

MOE_API moe_status moe_layer_param_dtype(const moe_layer *layer, const char *name, moe_dtype *out) {
  return moe::call("moe_layer_param_dtype", [&] {
    const moe::Param &p = param_by_name(layer, name);
    require(out != nullptr, "out is NULL");
    *out = static_cast<moe_dtype>(p.dtype);
  });
}

MOE_API moe_status moe_layer_memory(const moe_layer *layer, moe_memory *out) {
  return moe::call("moe_layer_memory", [&] {
    require(layer != nullptr, "layer is NULL");
    require(out != nullptr, "out is NULL");
    if (out->struct_size < sizeof(size_t) || out->struct_size > 4096)
      fail(MOE_ERR_INVALID_ARGUMENT, "out->struct_size is %zu, expected %zu", out->struct_size, sizeof(moe_memory));
    moe_memory m{};
    m.struct_size = std::min(out->struct_size, sizeof(moe_memory));
    for (const moe::Param &p : layer->params) {
      m.parameters += p.data.bytes();
      m.gradients += p.grad.bytes();
    }
    m.workspace = layer->ws.bytes();
    m.device_pool = layer->backend->reserved();
    std::memcpy(out, &m, m.struct_size);
  });
}

MOE_API moe_status moe_layer_param_buffers(moe_layer *layer, const char *name, void **data, void **grad) {
  return moe::call("moe_layer_param_buffers", [&] {
    moe::Param &p = param_by_name(layer, name);
    if (data) *data = p.data.get();
    if (grad) *grad = p.trainable ? p.grad.get() : nullptr;
  });
}

}  // extern "C"
