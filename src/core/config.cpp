#include "core/config.h"

#include <cmath>
#include <cstring>

#include "core/checked.h"
#include "core/error.h"

namespace moe {

bool is_glu(moe_activation a) { return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU; }

void config_defaults(moe_config *cfg) {
  std::memset(cfg, 0, sizeof(*cfg));
  cfg->struct_size = sizeof(moe_config);
  cfg->num_experts = 8;
  cfg->top_k = 2;
  cfg->activation = MOE_ACT_SWIGLU;
  cfg->routing = MOE_ROUTE_TOKEN_CHOICE;
  cfg->score = MOE_SCORE_SOFTMAX;
  cfg->normalize_topk = 1;
  cfg->routed_scale = 1.0f;
  cfg->num_groups = 1;
  cfg->topk_groups = 1;
  cfg->capacity_factor = 0.0f;
  cfg->drop_policy = MOE_DROP_POSITION;
  cfg->noise = MOE_NOISE_NONE;
  cfg->noise_eps = 0.01f;
  cfg->aux_loss_coef = 0.01f;
  cfg->device = MOE_DEVICE_CPU;
  cfg->dtype = MOE_DTYPE_F32;
}

void config_preset(moe_config *cfg, const char *name) {
  moe_config c;
  config_defaults(&c);
  if (std::strcmp(name, "mixtral") == 0) {
    c.num_experts = 8;
    c.top_k = 2;
    c.aux_loss_coef = 0.02f;  // router_aux_loss_coef of Mixtral-8x7B's config
  } else if (std::strcmp(name, "switch") == 0) {
    // Switch Transformer: top-1, ReLU FFN, capacity factor 1.25 (training), dropped tokens pass
    // through the residual, multiplicative jitter 1e-2, aux alpha 1e-2, router z-loss 1e-3 (ST-MoE).
    c.num_experts = 8;
    c.top_k = 1;
    c.activation = MOE_ACT_RELU;
    c.normalize_topk = 0;  // the top-1 gate value is the router probability itself
    c.capacity_factor = 1.25f;
    c.drop_policy = MOE_DROP_POSITION;
    c.noise = MOE_NOISE_JITTER;
    c.noise_eps = 0.01f;
    c.aux_loss_coef = 0.01f;
    c.z_loss_coef = 0.001f;
  } else if (std::strcmp(name, "shazeer") == 0) {
    c.num_experts = 8;
    c.top_k = 2;
    c.activation = MOE_ACT_RELU;
    c.noise = MOE_NOISE_GAUSSIAN;
    c.aux_loss_coef = 0.0f;
    c.importance_loss_coef = 0.01f;
    c.load_loss_coef = 0.01f;
  } else if (std::strcmp(name, "expert-choice") == 0) {
    c.num_experts = 8;
    c.top_k = 2;
    c.routing = MOE_ROUTE_EXPERT_CHOICE;
    c.capacity_factor = 1.0f;  // C = T*k/E: on average k experts per token
    c.normalize_topk = 0;
    c.aux_loss_coef = 0.0f;  // balanced by construction
  } else if (std::strcmp(name, "deepseek-v3") == 0) {
    c.num_experts = 256;
    c.top_k = 8;
    c.score = MOE_SCORE_SIGMOID;
    c.normalize_topk = 1;
    c.routed_scale = 2.5f;
    c.num_groups = 8;
    c.topk_groups = 4;
    c.num_shared_experts = 1;
    c.bias_update_rate = 0.001f;
    c.aux_loss_coef = 0.0001f;  // the complementary sequence-wise loss's alpha
  } else if (std::strcmp(name, "qwen2-moe") == 0) {
    c.num_experts = 60;
    c.top_k = 4;
    c.normalize_topk = 0;
    c.num_shared_experts = 4;
    c.shared_gate = 1;
    c.aux_loss_coef = 0.001f;
  } else if (std::strcmp(name, "qwen3-moe") == 0) {
    // Qwen3-30B-A3B's config.json: 128 experts, 8 per token, norm_topk_prob true, no shared
    // expert, router_aux_loss_coef 0.001.
    c.num_experts = 128;
    c.top_k = 8;
    c.normalize_topk = 1;
    c.aux_loss_coef = 0.001f;
  } else if (std::strcmp(name, "olmoe") == 0) {
    // OLMoE-1B-7B's config.json: 64 experts, 8 per token, norm_topk_prob false, router_aux_loss_coef
    // 0.01; router z-loss 0.001 as in its training (Muennighoff et al. 2024).
    c.num_experts = 64;
    c.top_k = 8;
    c.normalize_topk = 0;
    c.aux_loss_coef = 0.01f;
    c.z_loss_coef = 0.001f;
  } else {
    fail(MOE_ERR_INVALID_ARGUMENT,
         "name: unknown preset \"%s\" (known: mixtral, switch, shazeer, expert-choice, deepseek-v3, qwen2-moe, "
         "qwen3-moe, olmoe)",
         name);
  }
  *cfg = c;
}

// Enum fields come from C callers and may hold any int: read them as ints, never as the enum type
// (a value outside the enumeration is undefined behaviour in C++).
template <class Enum>
static int raw(const Enum &e) {
  int v;
  static_assert(sizeof(Enum) == sizeof(int), "C enums are int-sized");
  std::memcpy(&v, &e, sizeof v);
  return v;
}

static void check_finite_field(float v, const char *name) {
  if (!std::isfinite(v)) fail(MOE_ERR_INVALID_ARGUMENT, "cfg->%s is %g, must be finite", name, (double)v);
}

Config make_config(const moe_config *user) {
  // 0.1 is the first release, so no shorter struct exists yet; a longer one comes from a newer
  // header and is accepted when the fields this library does not know are all zero.
  if (user->struct_size < sizeof(moe_config))
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
  std::memcpy(&cf.c, user, sizeof(moe_config));
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
  if (raw(c.activation) < 0 || raw(c.activation) > MOE_ACT_SILU)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->activation is %d, not a moe_activation", raw(c.activation));
  if (raw(c.routing) < 0 || raw(c.routing) > MOE_ROUTE_EXPERT_CHOICE)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->routing is %d, not a moe_routing", raw(c.routing));
  if (raw(c.score) < 0 || raw(c.score) > MOE_SCORE_SIGMOID)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->score is %d, not a moe_score", raw(c.score));
  if (raw(c.noise) < 0 || raw(c.noise) > MOE_NOISE_JITTER)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->noise is %d, not a moe_noise", raw(c.noise));
  if (raw(c.drop_policy) < 0 || raw(c.drop_policy) > MOE_DROP_PROBS)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->drop_policy is %d, not a moe_drop_policy", raw(c.drop_policy));
  if (raw(c.device) < 0 || raw(c.device) > MOE_DEVICE_CUDA)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->device is %d, not a moe_device", raw(c.device));
  if (raw(c.dtype) < 0 || raw(c.dtype) > MOE_DTYPE_F16)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->dtype is %d, not a moe_dtype", raw(c.dtype));
  check_finite_field(c.routed_scale, "routed_scale");
  check_finite_field(c.capacity_factor, "capacity_factor");
  check_finite_field(c.noise_eps, "noise_eps");
  check_finite_field(c.aux_loss_coef, "aux_loss_coef");
  check_finite_field(c.z_loss_coef, "z_loss_coef");
  check_finite_field(c.importance_loss_coef, "importance_loss_coef");
  check_finite_field(c.load_loss_coef, "load_loss_coef");
  check_finite_field(c.bias_update_rate, "bias_update_rate");
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
