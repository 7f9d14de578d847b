#include "core/config.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>

#include "core/checked.h"
#include "core/config_table.h"
#include "core/error.h"

namespace moe {

bool is_glu(moe_activation a) { return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU || a == MOE_ACT_SWIGLU_CLAMPED; }

void config_defaults(moe_config *cfg) {
  std::memset(cfg, 0, sizeof(*cfg));
  cfg->struct_size = sizeof(moe_config);
  apply_field_defaults(cfg);
}

static const PresetRow *find_preset(const char *name) {
  for (int i = 0; i < num_presets(); ++i)
    if (std::strcmp(name, preset_row(i).name) == 0) return &preset_row(i);
  return nullptr;
}

void config_preset(moe_config *cfg, size_t size, const char *name) {
  const PresetRow *preset = find_preset(name);
  if (!preset) {
    std::string known;
    for (int i = 0; i < num_presets(); ++i) known += (i ? ", " : "") + std::string(preset_row(i).name);
    fail(MOE_ERR_INVALID_ARGUMENT, "name: unknown preset \"%s\" (known: %s)", name, known.c_str());
  }
  moe_config c;
  config_defaults(&c);
  // "name=value name=value ...": each setting through the same parser as moe_config_set.
  std::string_view rest = preset->settings;
  while (!rest.empty()) {
    const size_t space = std::min(rest.find(' '), rest.size());
    const std::string_view setting = rest.substr(0, space);
    rest.remove_prefix(std::min(space + 1, rest.size()));
    if (setting.empty()) continue;
    const size_t eq = setting.find('=');
    const FieldRow *row = eq == std::string_view::npos ? nullptr : find_field(setting.substr(0, eq));
    if (!row)
      fail(MOE_ERR_INTERNAL, "preset %s: bad setting \"%.*s\"", name, static_cast<int>(setting.size()),
           setting.data());
    set_field(&c, *row, setting.substr(eq + 1));
  }
  // A caller built against an older moe.h holds only the first size bytes.
  c.struct_size = std::min(size, sizeof c);
  std::memcpy(cfg, &c, c.struct_size);
}

static void check_finite_field(float v, const char *name) {
  if (!std::isfinite(v)) fail(MOE_ERR_INVALID_ARGUMENT, "cfg->%s is %g, must be finite", name, (double)v);
}

Config make_config(const moe_config *user) {
  // A shorter struct comes from the moe.h of an older release (its missing fields take their
  // defaults); a longer one from a newer header, accepted when the fields this library does not
  // know are all zero.
  if (user->struct_size < MOE_CONFIG_SIZE_0_1)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->struct_size is %zu, expected %zu (call moe_config_init first)",
         user->struct_size, sizeof(moe_config));
  if (user->struct_size > sizeof(moe_config)) {
    if (user->struct_size > 4096)
      fail(MOE_ERR_INVALID_ARGUMENT, "cfg->struct_size is %zu, expected %zu (call moe_config_init first)",
           user->struct_size, sizeof(moe_config));
    const unsigned char *tail = reinterpret_cast<const unsigned char *>(user) + sizeof(moe_config);
    for (size_t i = 0; i < user->struct_size - sizeof(moe_config); ++i)
      if (tail[i] != 0)
        fail(MOE_ERR_INVALID_ARGUMENT,
             "cfg->struct_size is %zu, larger than this libmoe's %zu, and sets fields it does not know",
             user->struct_size, sizeof(moe_config));
  }

  Config cf{};
  config_defaults(&cf.c);
  // Whole fields only: a struct_size that ends inside a field leaves that field its default.
  size_t n = std::min(user->struct_size, sizeof(moe_config));
  for (int i = 0; i < num_fields(); ++i)
    if (field_row(i).offset < n && n < field_row(i).offset + field_row(i).size) n = field_row(i).offset;
  std::memcpy(&cf.c, user, n);
  cf.c.struct_size = sizeof(moe_config);
  const moe_config &c = cf.c;

  auto positive = [](int64_t v, const char *name) {
    if (v <= 0) fail(MOE_ERR_INVALID_ARGUMENT, "cfg->%s is %lld, must be > 0", name, (long long)v);
  };
  positive(c.d_model, "d_model");
  positive(c.d_ff, "d_ff");
  positive(c.num_experts, "num_experts");
  positive(c.top_k, "top_k");
  if (c.top_k > c.num_experts)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->top_k is %lld, larger than num_experts %lld", (long long)c.top_k,
         (long long)c.num_experts);
  // Every enum holds one of its values and every float is finite (the table knows which fields).
  for (int i = 0; i < num_fields(); ++i) {
    const FieldRow &row = field_row(i);
    const unsigned char *at = reinterpret_cast<const unsigned char *>(&c) + row.offset;
    if (row.type == MOE_CONFIG_ENUM) {
      int v;
      std::memcpy(&v, at, sizeof v);
      if (v < 0 || v >= row.values->count)
        fail(MOE_ERR_INVALID_ARGUMENT, "cfg->%s is %d, not a %s", row.name, v, row.values->c_type);
    } else if (row.type == MOE_CONFIG_FLOAT) {
      float v;
      std::memcpy(&v, at, sizeof v);
      check_finite_field(v, row.name);
    }
  }
  if (c.bias_update_rate < 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->bias_update_rate is %g, must be >= 0", (double)c.bias_update_rate);
  if (c.noise == MOE_NOISE_JITTER && !(c.noise_eps >= 0 && c.noise_eps < 1))
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->noise_eps is %g, must be in [0, 1) for jitter", (double)c.noise_eps);
  if (c.num_groups <= 0 || c.num_experts % c.num_groups != 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->num_groups is %lld, must be > 0 and divide num_experts %lld",
         (long long)c.num_groups, (long long)c.num_experts);
  if (c.topk_groups <= 0 || c.topk_groups > c.num_groups)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->topk_groups is %lld, must be in [1, num_groups %lld]",
         (long long)c.topk_groups, (long long)c.num_groups);
  if (c.num_groups > 1 && c.top_k > c.topk_groups * (c.num_experts / c.num_groups))
    fail(MOE_ERR_INVALID_ARGUMENT,
         "cfg->top_k is %lld, more than the %lld experts in the topk_groups %lld kept groups", (long long)c.top_k,
         (long long)(c.topk_groups * (c.num_experts / c.num_groups)), (long long)c.topk_groups);
  if (c.num_groups > 1 && c.routing == MOE_ROUTE_EXPERT_CHOICE)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->num_groups is %lld: group-limited routing applies to token choice only",
         (long long)c.num_groups);
  if (c.routing == MOE_ROUTE_EXPERT_CHOICE && !(c.capacity_factor > 0))
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->capacity_factor is %g: expert-choice routing needs a capacity > 0",
         (double)c.capacity_factor);
  if (c.load_loss_coef != 0.0f && c.noise != MOE_NOISE_GAUSSIAN)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->load_loss_coef is %g: the smooth load loss needs noise = MOE_NOISE_GAUSSIAN",
         (double)c.load_loss_coef);
  if (c.num_shared_experts < 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->num_shared_experts is %lld, must be >= 0", (long long)c.num_shared_experts);
  if (c.d_ff_shared < 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->d_ff_shared is %lld, must be >= 0", (long long)c.d_ff_shared);
  if (c.min_capacity < 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->min_capacity is %lld, must be >= 0", (long long)c.min_capacity);
  if (c.capacity_group_size < 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->capacity_group_size is %lld, must be >= 0 (0: the whole call)",
         (long long)c.capacity_group_size);
  if (!(c.swiglu_alpha > 0))
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->swiglu_alpha is %g, must be > 0", (double)c.swiglu_alpha);
  if (!(c.swiglu_limit > 0))
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->swiglu_limit is %g, must be > 0", (double)c.swiglu_limit);
  if (c.shared_gate && c.num_shared_experts == 0)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->shared_gate is %d but num_shared_experts is 0", c.shared_gate);

  cf.d = c.d_model;
  cf.ff = c.d_ff;
  cf.E = c.num_experts;
  cf.k = c.top_k;
  cf.S = c.num_shared_experts;
  cf.ffs = c.d_ff_shared > 0 ? c.d_ff_shared : c.d_ff;
  cf.c.d_ff_shared = cf.S > 0 ? cf.ffs : c.d_ff_shared;
  cf.glu = is_glu(c.activation);
  cf.ranks = 1;
  cf.rank = 0;
  if (c.comm) {
    const moe_comm *m = c.comm;
    // A comm built against a moe.h that predates last_error stops just before it.
    if (m->struct_size != sizeof(moe_comm) && m->struct_size != kCommSizeWithoutLastError)
      fail(MOE_ERR_INVALID_ARGUMENT, "cfg->comm->struct_size is %zu, expected %zu (or %zu, without last_error)",
           m->struct_size, sizeof(moe_comm), kCommSizeWithoutLastError);
    if (m->size < 1 || m->rank < 0 || m->rank >= m->size)
      fail(MOE_ERR_INVALID_ARGUMENT, "cfg->comm has size %d and rank %d; need 0 <= rank < size", m->size, m->rank);
    if (!m->exchange_counts || !m->exchange_rows)
      fail(MOE_ERR_INVALID_ARGUMENT, "cfg->comm->exchange_counts and exchange_rows must not be NULL");
    if (c.num_experts % m->size != 0)
      fail(MOE_ERR_INVALID_ARGUMENT, "cfg->num_experts %lld does not divide evenly over comm->size %d ranks",
           (long long)c.num_experts, m->size);
    cf.ranks = m->size;
    cf.rank = m->rank;
  }
  cf.E_local = cf.E / cf.ranks;
  cf.expert_begin = cf.E_local * cf.rank;

  // Every parameter size must be addressable before anything is allocated.
  int64_t w = checked_mul(cf.E, cf.ff, cf.d, "cfg: num_experts * d_ff * d_model");
  checked_bytes(w, sizeof(float) * 2, "cfg: expert weights");
  checked_bytes(checked_mul(cf.S, cf.ffs, cf.d, "cfg: num_shared_experts * d_ff_shared * d_model"),
                sizeof(float) * 2, "cfg: shared expert weights");
  checked_bytes(checked_mul(cf.E, cf.d, "cfg: num_experts * d_model"), sizeof(float) * 2, "cfg: router weights");
  return cf;
}

}  // namespace moe
