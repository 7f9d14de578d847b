// extern "C" entry points for contexts, forward, backward, routing and what a context reports.
#include <algorithm>
#include <cmath>
#include <climits>
#include <cstring>
#include <memory>
#include <vector>

#include "api/guard.h"
#include "core/checked.h"
#include "core/half.h"
#include "core/layer.h"

using moe::fail;
using moe::require;

namespace {

using State = moe_context::State;

void check_context(const moe_layer *layer, const moe_context *ctx) {
  if (ctx && ctx->layer != layer)
    fail(MOE_ERR_INVALID_ARGUMENT, "ctx belongs to another layer (created from %p, used with %p)",
         static_cast<const void *>(ctx->layer), static_cast<const void *>(layer));
}

bool overlap(const void *a, const void *b, size_t bytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return bytes > 0 && pa < pb + bytes && pb < pa + bytes;
}

// Shared checks of the tensors a call reads or writes: [T, d_model] each.
struct Tensor {
  const void *p;
  const char *name;
  bool optional;
};

void check_tensors(const moe_layer *layer, int64_t T, std::initializer_list<Tensor> ts) {
  if (T < 0) fail(MOE_ERR_INVALID_ARGUMENT, "num_tokens is %lld, must be >= 0", (long long)T);
  // Routing indices are int32: refuse the count before sizing any buffer from it.
  const int64_t per_token = std::max(layer->cfg.k, layer->cfg.E);
  if (T > INT32_MAX / per_token)
    fail(MOE_ERR_INVALID_ARGUMENT, "num_tokens is %lld: at most %lld tokens per call for %lld experts, top_k %lld",
         (long long)T, (long long)(INT32_MAX / per_token), (long long)layer->cfg.E, (long long)layer->cfg.k);
  const size_t bytes = moe::checked_bytes(moe::checked_mul(T, layer->cfg.d, "num_tokens * d_model"),
                                          moe::dtype_size(layer->cfg.c.dtype), "num_tokens * d_model");
  for (const Tensor &t : ts) {
    if (!t.p) {
      if (T > 0 && !t.optional) fail(MOE_ERR_INVALID_ARGUMENT, "%s is NULL with num_tokens %lld", t.name, (long long)T);
      continue;
    }
    const moe::Backend &be = *layer->backend;
    if (T > 0 && be.ops()->check_pointer(be.state(), t.p) != MOE_OK)
      fail(MOE_ERR_INVALID_ARGUMENT, "%s: %s", t.name, be.ops()->last_error(be.state()));
  }
  for (const Tensor &a : ts)
    for (const Tensor &b : ts)
      if (&a < &b && a.p && b.p && overlap(a.p, b.p, bytes))
        fail(MOE_ERR_INVALID_ARGUMENT, "%s and %s overlap; they must be distinct buffers", a.name, b.name);
}

void check_finite(const moe_layer *layer, const void *p, int64_t T, const char *name) {
  if (!layer->cfg.c.check_finite || T == 0) return;
  const moe::Backend &be = *layer->backend;
  int64_t first = -1;
  const int64_t n = T * layer->cfg.d;
  be.check(be.ops()->find_nonfinite(be.state(), p, layer->cfg.c.dtype, n, &first), "find_nonfinite");
  if (first >= 0)
    fail(MOE_ERR_NONFINITE, "%s[%lld][%lld] is not finite (check_finite is on)", name,
         (long long)(first / layer->cfg.d), (long long)(first % layer->cfg.d));
}

const moe_context &filled(const moe_context *ctx) {
  require(ctx != nullptr, "ctx is NULL");
  if (ctx->state == State::kEmpty)
    fail(MOE_ERR_STATE, "ctx holds no forward: call moe_forward with this context or moe_route first");
  return *ctx;
}

}  // namespace

extern "C" {

MOE_API moe_status moe_context_create(moe_layer *layer, moe_context **out) {
  return moe::call("moe_context_create", [&] {
    require(layer != nullptr, "layer is NULL");
    require(out != nullptr, "out is NULL");
    if (layer->destroyed) fail(MOE_ERR_STATE, "layer was destroyed");
    auto ctx = std::make_unique<moe_context>();
    ctx->layer = layer;
    ++layer->live_contexts;
    *out = ctx.release();
  });
}

MOE_API void moe_context_destroy(moe_context *ctx) {
  if (!ctx) return;
  moe_layer *layer = ctx->layer;
  delete ctx;  // NOLINT: owned by the caller through the C handle
  if (--layer->live_contexts == 0 && layer->destroyed) {
    delete layer;  // NOLINT: deferred moe_layer_destroy
    return;
  }
  // The context's workspace went back to the layer's device memory pool: give it to the device.
  layer->backend->trim(true);
}

MOE_API moe_status moe_forward(moe_layer *layer, const void *x, int64_t num_tokens, void *y, moe_context *ctx) {
  return moe::call("moe_forward", [&] {
    require(layer != nullptr, "layer is NULL");
    check_context(layer, ctx);
    check_tensors(layer, num_tokens, {{x, "x", false}, {y, "y", false}});
    check_finite(layer, x, num_tokens, "x");
    moe::forward(*layer, x, num_tokens, y, ctx, ctx ? moe::Mode::kTraining : moe::Mode::kInference);
    layer->backend->trim(false);
  });
}

MOE_API moe_status moe_backward(moe_layer *layer, moe_context *ctx, const void *dy, void *dx) {
  return moe::call("moe_backward", [&] {
    require(layer != nullptr, "layer is NULL");
    require(ctx != nullptr, "ctx is NULL");
    check_context(layer, ctx);
    if (ctx->state != State::kTrained)
      fail(MOE_ERR_STATE, "ctx holds no training forward (%s): call moe_forward with this context first",
           ctx->state == State::kEmpty ? "it is empty" : "it was filled by moe_route");
    if (ctx->param_version != layer->param_version)
      fail(MOE_ERR_STATE,
           "moe_layer_set_param or moe_layer_load changed the layer's parameters (last: %s) after the training forward held by ctx; "
           "its saved activations no longer match them: run moe_forward again",
           layer->last_set ? layer->last_set->name.c_str() : "?");
    const int64_t T = ctx->route.T;
    check_tensors(layer, T, {{dy, "dy", false}, {dx, "dx", true}});
    check_finite(layer, dy, T, "dy");
    moe::backward(*layer, *ctx, dy, dx);
    layer->backend->trim(false);
  });
}

MOE_API moe_status moe_context_set_aux_grad_scale(moe_context *ctx, float scale) {
  return moe::call("moe_context_set_aux_grad_scale", [&] {
    require(ctx != nullptr, "ctx is NULL");
    if (!std::isfinite(scale)) fail(MOE_ERR_INVALID_ARGUMENT, "scale is %g, must be finite", (double)scale);
    ctx->aux_grad_scale = scale;
  });
}

MOE_API moe_status moe_route(moe_layer *layer, const void *x, int64_t num_tokens, moe_context *ctx) {
  return moe::call("moe_route", [&] {
    require(layer != nullptr, "layer is NULL");
    require(ctx != nullptr, "ctx is NULL");
    check_context(layer, ctx);
    check_tensors(layer, num_tokens, {{x, "x", false}});
    check_finite(layer, x, num_tokens, "x");
    moe::forward(*layer, x, num_tokens, nullptr, ctx, moe::Mode::kRouteOnly);
    layer->backend->trim(false);
  });
}

MOE_API moe_status moe_context_stats(const moe_context *ctx, moe_stats *out) {
  return moe::call("moe_context_stats", [&] {
    require(out != nullptr, "out is NULL");
    if (out->struct_size < sizeof(size_t) || out->struct_size > 4096)
      fail(MOE_ERR_INVALID_ARGUMENT, "out->struct_size is %zu, expected %zu", out->struct_size, sizeof(moe_stats));
    const moe_context &c = filled(ctx);
    size_t n = out->struct_size < sizeof(moe_stats) ? out->struct_size : sizeof(moe_stats);
    moe_stats s = c.route.stats;
    s.struct_size = n;
    std::memcpy(out, &s, n);
  });
}

MOE_API moe_status moe_context_expert_counts(const moe_context *ctx, int64_t *counts) {
  return moe::call("moe_context_expert_counts", [&] {
    require(counts != nullptr, "counts is NULL");
    const moe_context &c = filled(ctx);
    std::memcpy(counts, c.route.kept.data(), c.route.kept.size() * sizeof(int64_t));
  });
}

MOE_API moe_status moe_context_topk(const moe_context *ctx, int32_t *expert_ids, float *weights) {
  return moe::call("moe_context_topk", [&] {
    const moe_context &c = filled(ctx);
    const moe_layer &l = *c.layer;
    if (l.cfg.c.routing == MOE_ROUTE_EXPERT_CHOICE)
      fail(MOE_ERR_UNSUPPORTED, "expert-choice routing has no per-token top-k: use moe_context_assignments");
    const int64_t n = moe::checked_mul(c.route.T, l.cfg.k, "num_tokens * top_k");
    if (n == 0) return;  // no tokens: nothing to write (and memcpy from an empty vector's NULL is UB)
    const size_t ibytes = moe::checked_bytes(n, sizeof(int32_t), "top-k ids");
    const size_t fbytes = moe::checked_bytes(n, sizeof(float), "top-k weights");
    std::vector<int32_t> ids(n), rows(n);
    std::vector<float> w(n);
    const moe::Backend &be = *l.backend;
    be.download(ids.data(), c.ws.topk_ids.get(), ibytes);
    be.download(w.data(), c.ws.topk_w.get(), fbytes);
    be.download(rows.data(), c.ws.row_of_slot.get(), ibytes);
    for (int64_t i = 0; i < n; ++i)
      if (rows[i] < 0) {
        ids[i] = -1;
        w[i] = 0.0f;
      }
    if (expert_ids) std::memcpy(expert_ids, ids.data(), ibytes);
    if (weights) std::memcpy(weights, w.data(), fbytes);
  });
}

MOE_API moe_status moe_context_memory(const moe_context *ctx, size_t *bytes) {
  return moe::call("moe_context_memory", [&] {
    require(ctx != nullptr, "ctx is NULL");
    require(bytes != nullptr, "bytes is NULL");
    *bytes = ctx->ws.bytes();
  });
}

MOE_API moe_status moe_context_assignments(const moe_context *ctx, int64_t capacity, int32_t *token,
                                           int32_t *expert, float *weight, int64_t *count) {
  return moe::call("moe_context_assignments", [&] {
    require(count != nullptr, "count is NULL");
    if (capacity < 0) fail(MOE_ERR_INVALID_ARGUMENT, "capacity is %lld, must be >= 0", (long long)capacity);
    const moe_context &c = filled(ctx);
    const int64_t R = c.route.R;
    if (!token && !expert && !weight) {
      *count = R;
      return;
    }
    if (capacity < R)
      fail(MOE_ERR_INVALID_ARGUMENT, "capacity is %lld but there are %lld assignments", (long long)capacity,
           (long long)R);
    if (R == 0) {  // nothing to write (and memcpy from an empty vector's NULL is UB)
      *count = 0;
      return;
    }
    const moe::Backend &be = *c.layer->backend;
    const size_t ibytes = moe::checked_bytes(R, sizeof(int32_t), "assignments");
    const size_t fbytes = moe::checked_bytes(R, sizeof(float), "assignments");
    std::vector<int32_t> tok(R);
    std::vector<float> w(R);
    be.download(tok.data(), c.ws.row_token.get(), ibytes);
    be.download(w.data(), c.ws.row_weight.get(), fbytes);
    if (token) std::memcpy(token, tok.data(), ibytes);
    if (weight) std::memcpy(weight, w.data(), fbytes);
    if (expert)
      for (size_t e = 0; e + 1 < c.route.offsets.size(); ++e)
        for (int64_t r = c.route.offsets[e]; r < c.route.offsets[e + 1]; ++r) expert[r] = static_cast<int32_t>(e);
    *count = R;
  });
}

}  // extern "C"
