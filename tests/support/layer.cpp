#include "layer.h"

#include <cstring>
#include <limits>

namespace moe_test {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The failure text of a call that returned s.
std::string failed(const std::string &call, moe_status s) {
  return call + ": " + moe_status_name(s) + ": " + moe_last_error();
}

}  // namespace

LayerPtr make_layer(const moe_config &cfg) {
  moe_status s;
  LayerPtr l = make_layer(cfg, &s);
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_layer_create", s);
  return l;
}

LayerPtr make_layer(const moe_config &cfg, moe_status *status) {
  moe_layer *l = nullptr;
  *status = moe_layer_create(&cfg, &l);
  return LayerPtr(*status == MOE_OK ? l : nullptr);
}

ContextPtr make_context(moe_layer *layer) {
  moe_context *c = nullptr;
  const moe_status s = moe_context_create(layer, &c);
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_context_create", s);
  return ContextPtr(s == MOE_OK ? c : nullptr);
}

moe_config config(int64_t d_model, int64_t d_ff, int64_t num_experts, int64_t top_k, uint64_t seed) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = d_model;
  c.d_ff = d_ff;
  c.num_experts = num_experts;
  c.top_k = top_k;
  c.seed = seed;
  return c;
}

moe_config preset(const char *name, int64_t d_model, int64_t d_ff) {
  moe_config c;
  moe_config_init(&c);
  const moe_status s = moe_config_preset(&c, name);
  if (s != MOE_OK) ADD_FAILURE() << failed(std::string("moe_config_preset(\"") + name + "\")", s);
  c.d_model = d_model;
  c.d_ff = d_ff;
  return c;
}

void at_most_16_experts(moe_config &cfg) {
  if (cfg.num_experts <= 16) return;
  cfg.num_experts = 16;
  if (cfg.num_groups > 1) {
    cfg.num_groups = 4;
    cfg.topk_groups = 2;
  }
  if (cfg.top_k > 4) cfg.top_k = 4;
}

std::vector<Param> params(const moe_layer *layer) {
  std::vector<Param> out;
  const int n = moe_layer_num_params(layer);
  for (int i = 0; i < n; ++i) {
    moe_param_info info{};
    const moe_status s = moe_layer_param_info(layer, i, &info);
    if (s != MOE_OK) {
      ADD_FAILURE() << failed("moe_layer_param_info(" + std::to_string(i) + ")", s);
      continue;
    }
    Param p;
    p.name = info.name;
    p.trainable = info.trainable != 0;
    p.numel = 1;
    for (int j = 0; j < info.ndim; ++j) {
      p.shape.push_back(info.shape[j]);
      p.numel *= info.shape[j];
    }
    out.push_back(p);
  }
  return out;
}

namespace {

// The Param of name; numel 0 (and a test failure) when the layer has none.
Param param_named(const moe_layer *layer, const std::string &name) {
  for (const Param &p : params(layer))
    if (p.name == name) return p;
  ADD_FAILURE() << "the layer has no parameter " << name;
  Param none;
  none.name = name;
  return none;
}

using Reader = moe_status (*)(const moe_layer *, const char *, float *, int64_t);

std::vector<float> read(const moe_layer *layer, const Param &p, Reader fn, const char *fn_name) {
  std::vector<float> v(static_cast<size_t>(p.numel), kNaN);
  const moe_status s = fn(layer, p.name.c_str(), v.data(), p.numel);
  if (s != MOE_OK) ADD_FAILURE() << failed(std::string(fn_name) + "(" + p.name + ")", s);
  return v;
}

}  // namespace

std::vector<float> get_param(const moe_layer *layer, const Param &p) {
  return read(layer, p, moe_layer_get_param, "moe_layer_get_param");
}
std::vector<float> get_param(const moe_layer *layer, const std::string &name) {
  return get_param(layer, param_named(layer, name));
}
std::vector<float> get_grad(const moe_layer *layer, const Param &p) {
  return read(layer, p, moe_layer_get_grad, "moe_layer_get_grad");
}
std::vector<float> get_grad(const moe_layer *layer, const std::string &name) {
  return get_grad(layer, param_named(layer, name));
}

void set_param(moe_layer *layer, const std::string &name, const std::vector<float> &v) {
  const moe_status s = moe_layer_set_param(layer, name.c_str(), v.data(), static_cast<int64_t>(v.size()));
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_layer_set_param(" + name + ")", s);
}

std::vector<std::vector<float>> all_params(const moe_layer *layer) {
  std::vector<std::vector<float>> out;
  for (const Param &p : params(layer)) out.push_back(get_param(layer, p));
  return out;
}

std::map<std::string, std::vector<float>> params_by_name(const moe_layer *layer) {
  std::map<std::string, std::vector<float>> out;
  for (const Param &p : params(layer)) out[p.name] = get_param(layer, p);
  return out;
}

bool bitwise_equal(const std::vector<std::vector<float>> &a, const std::vector<std::vector<float>> &b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0)
      return false;
  return true;
}

std::vector<float> expert_block(const std::vector<float> &v, int64_t e, int64_t R, int64_t C, int64_t r0, int64_t n) {
  auto first = v.begin() + (e * R + r0) * C;
  return std::vector<float>(first, first + n * C);
}

GptOssExperts gpt_oss_experts(const std::map<std::string, std::vector<float>> &w, int64_t E, int64_t d, int64_t ff) {
  const std::vector<float> &w1 = w.at("experts.w1"), &w3 = w.at("experts.w3"), &w2 = w.at("experts.w2");
  const std::vector<float> &b1 = w.at("experts.b1"), &b3 = w.at("experts.b3");
  GptOssExperts g{std::vector<float>(E * d * 2 * ff), std::vector<float>(E * 2 * ff), std::vector<float>(E * ff * d)};
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < ff; ++j) {
      for (int64_t i = 0; i < d; ++i) {
        g.gate_up[(e * d + i) * 2 * ff + 2 * j] = w1[(e * ff + j) * d + i];
        g.gate_up[(e * d + i) * 2 * ff + 2 * j + 1] = w3[(e * ff + j) * d + i];
        g.down[(e * ff + j) * d + i] = w2[(e * d + i) * ff + j];
      }
      g.gate_up_bias[e * 2 * ff + 2 * j] = b1[e * ff + j];
      g.gate_up_bias[e * 2 * ff + 2 * j + 1] = b3[e * ff + j];
    }
  return g;
}

int param_dtype(const moe_layer *layer, const std::string &name) {
  moe_dtype d = MOE_DTYPE_F32;
  const moe_status s = moe_layer_param_dtype(layer, name.c_str(), &d);
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_layer_param_dtype(" + name + ")", s);
  return d;
}

int stored_dtype(const std::string &name, int layer_dtype) {
  const bool low = is_expert_param(name) || name.rfind("shared.w", 0) == 0;
  return low ? layer_dtype : MOE_DTYPE_F32;
}

bool is_expert_param(const std::string &name) { return name.rfind("experts.", 0) == 0; }

moe_stats stats(moe_context *ctx) {
  moe_stats st;
  std::memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  const moe_status s = moe_context_stats(ctx, &st);
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_context_stats", s);
  return st;
}

std::vector<double> stats_fields(const moe_stats &s) {
  return {static_cast<double>(s.num_tokens), static_cast<double>(s.num_slots), static_cast<double>(s.dropped_slots),
          s.load_balance_loss, s.z_loss, s.importance_loss, s.load_loss, s.aux_loss_total, s.load_cv,
          s.max_load_ratio};
}
const char *const kStatNames[10] = {"num_tokens", "num_slots",  "dropped_slots",  "load_balance_loss", "z_loss",
                                    "importance_loss", "load_loss", "aux_loss_total", "load_cv", "max_load_ratio"};

std::vector<int64_t> expert_counts(moe_context *ctx, int64_t num_experts) {
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), -7);
  const moe_status s = moe_context_expert_counts(ctx, counts.data());
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_context_expert_counts", s);
  return counts;
}

TopK topk(moe_context *ctx, int64_t T, int64_t k) {
  TopK r;
  r.ids.assign(static_cast<size_t>(T * k), -7);
  r.weights.assign(static_cast<size_t>(T * k), kNaN);
  const moe_status s = moe_context_topk(ctx, r.ids.data(), r.weights.data());
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_context_topk", s);
  return r;
}

Assignments assignments(moe_context *ctx) {
  Assignments r;
  int64_t count = -1;
  moe_status s = moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count);
  if (s != MOE_OK || count < 0) {
    ADD_FAILURE() << failed("moe_context_assignments (count)", s) << " (count " << count << ")";
    return r;
  }
  r.tokens.assign(static_cast<size_t>(count), -7);
  r.experts.assign(static_cast<size_t>(count), -7);
  r.weights.assign(static_cast<size_t>(count), kNaN);
  s = moe_context_assignments(ctx, count, r.tokens.data(), r.experts.data(), r.weights.data(), &count);
  if (s != MOE_OK) ADD_FAILURE() << failed("moe_context_assignments", s);
  return r;
}

}  // namespace moe_test
