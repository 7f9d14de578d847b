// The table of moe_config's fields and of the presets, and the one text form of every value.
// Adding a field to moe_config means adding its row here (and documenting it in moe.h): the
// defaults, the API by name, the bindings and moe-bench's flags follow from the row.
#include "core/config_table.h"

#include <cctype>
#include <charconv>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <type_traits>

#include "core/error.h"

namespace moe {
namespace {

// ---- enum names: names[v] is C value v (the values are pinned by moe.h) --------------------------
constexpr const char *kActivation[] = {"swiglu", "geglu", "relu", "gelu", "silu", "swiglu_clamped"};
constexpr const char *kRouting[] = {"token_choice", "expert_choice"};
constexpr EnumAlias kRoutingAliases[] = {{"token", MOE_ROUTE_TOKEN_CHOICE}, {"expert", MOE_ROUTE_EXPERT_CHOICE}};
constexpr const char *kScore[] = {"softmax", "sigmoid"};
constexpr const char *kNoise[] = {"none", "gaussian", "jitter"};
constexpr const char *kDropPolicy[] = {"position", "probs"};
constexpr const char *kDevice[] = {"cpu", "cuda"};
constexpr const char *kDtype[] = {"float32", "bfloat16", "float16"};
constexpr EnumAlias kDtypeAliases[] = {{"f32", MOE_DTYPE_F32},  {"fp32", MOE_DTYPE_F32}, {"bf16", MOE_DTYPE_BF16},
                                       {"f16", MOE_DTYPE_F16},  {"fp16", MOE_DTYPE_F16}, {"half", MOE_DTYPE_F16}};

template <size_t N>
constexpr EnumNames names(const char *c_type, const char *const (&n)[N]) {
  return {c_type, n, static_cast<int>(N), nullptr, 0};
}
template <size_t N, size_t A>
constexpr EnumNames names(const char *c_type, const char *const (&n)[N], const EnumAlias (&a)[A]) {
  return {c_type, n, static_cast<int>(N), a, static_cast<int>(A)};
}

// The names of each C enum type, found from the field's declared type so that a row cannot point
// at another enum's names.
template <class E>
struct enum_of;
template <>
struct enum_of<moe_activation> {
  static constexpr EnumNames value = names("moe_activation", kActivation);
};
template <>
struct enum_of<moe_routing> {
  static constexpr EnumNames value = names("moe_routing", kRouting, kRoutingAliases);
};
template <>
struct enum_of<moe_score> {
  static constexpr EnumNames value = names("moe_score", kScore);
};
template <>
struct enum_of<moe_noise> {
  static constexpr EnumNames value = names("moe_noise", kNoise);
};
template <>
struct enum_of<moe_drop_policy> {
  static constexpr EnumNames value = names("moe_drop_policy", kDropPolicy);
};
template <>
struct enum_of<moe_device> {
  static constexpr EnumNames value = names("moe_device", kDevice);
};
template <>
struct enum_of<moe_dtype> {
  static constexpr EnumNames value = names("moe_dtype", kDtype, kDtypeAliases);
};

template <class T>
constexpr const EnumNames *values_of() {
  if constexpr (std::is_enum_v<T>)
    return &enum_of<T>::value;
  else
    return nullptr;
}

// The row's type must be how the field is stored: checked when this file compiles.
template <class T>
constexpr bool stored_as(moe_config_type t) {
  switch (t) {
    case MOE_CONFIG_INT64: return std::is_same_v<T, int64_t>;
    case MOE_CONFIG_INT:
    case MOE_CONFIG_BOOL: return std::is_same_v<T, int>;
    case MOE_CONFIG_FLOAT: return std::is_same_v<T, float>;
    case MOE_CONFIG_UINT64: return std::is_same_v<T, uint64_t>;
    case MOE_CONFIG_ENUM: return std::is_enum_v<T> && sizeof(T) == sizeof(int);
    case MOE_CONFIG_POINTER: return std::is_pointer_v<T>;
  }
  return false;
}
template <class T, moe_config_type t>
constexpr moe_config_type checked_type() {
  static_assert(stored_as<T>(t), "a row's type does not match its moe_config field");
  return t;
}

#define MOE_FIELD(field, type, def, description)                                                            \
  FieldRow {                                                                                               \
    #field, checked_type<decltype(moe_config::field), type>(), offsetof(moe_config, field),               \
        sizeof(moe_config::field), def, values_of<decltype(moe_config::field)>(), description               \
  }

// One row per field, in the struct's order; the defaults are moe_config_init's.
constexpr FieldRow kFields[] = {
    MOE_FIELD(d_model, MOE_CONFIG_INT64, "0", "model (token) width d, > 0; no default"),
    MOE_FIELD(d_ff, MOE_CONFIG_INT64, "0", "hidden width of each routed expert, > 0; no default"),
    MOE_FIELD(num_experts, MOE_CONFIG_INT64, "8", "E, routed experts over all ranks, >= 1"),
    MOE_FIELD(top_k, MOE_CONFIG_INT64, "2", "k, experts per token, 1 <= k <= num_experts"),
    MOE_FIELD(activation, MOE_CONFIG_ENUM, "swiglu",
              "expert FFN: swiglu, geglu, swiglu_clamped (gated, with w3), relu, gelu or silu"),
    MOE_FIELD(routing, MOE_CONFIG_ENUM, "token_choice",
              "token_choice (each token picks k experts) or expert_choice (each expert picks its C tokens)"),
    MOE_FIELD(score, MOE_CONFIG_ENUM, "softmax", "router score of the logits: softmax or sigmoid"),
    MOE_FIELD(normalize_topk, MOE_CONFIG_BOOL, "true", "divide the k weights of a token by their sum"),
    MOE_FIELD(routed_scale, MOE_CONFIG_FLOAT, "1", "multiplies every routed weight"),
    MOE_FIELD(num_groups, MOE_CONFIG_INT64, "1", "G, expert groups for group-limited routing, divides E; 1 = off"),
    MOE_FIELD(topk_groups, MOE_CONFIG_INT64, "1", "groups kept per token, 1 <= topk_groups <= num_groups"),
    MOE_FIELD(capacity_factor, MOE_CONFIG_FLOAT, "0",
              "> 0: C = ceil(capacity_factor * T * k / E) slots per expert (T: the call's or a capacity group's "
              "tokens); <= 0: dropless"),
    MOE_FIELD(drop_policy, MOE_CONFIG_ENUM, "position",
              "which slots an over-full expert keeps: position (first come) or probs (largest weight)"),
    MOE_FIELD(noise, MOE_CONFIG_ENUM, "none", "router noise in training: none, gaussian (Shazeer) or jitter (Switch)"),
    MOE_FIELD(noise_eps, MOE_CONFIG_FLOAT, "0.01", "jitter half-width eps in [0, 1): router input times U(1-eps, 1+eps)"),
    MOE_FIELD(aux_loss_coef, MOE_CONFIG_FLOAT, "0.01", "load-balance loss coefficient"),
    MOE_FIELD(z_loss_coef, MOE_CONFIG_FLOAT, "0", "router z-loss coefficient"),
    MOE_FIELD(importance_loss_coef, MOE_CONFIG_FLOAT, "0", "importance loss coefficient (Shazeer et al. 2017)"),
    MOE_FIELD(load_loss_coef, MOE_CONFIG_FLOAT, "0", "smooth load loss coefficient (needs noise gaussian)"),
    MOE_FIELD(bias_update_rate, MOE_CONFIG_FLOAT, "0",
              "aux-loss-free balancing: router.bias step u >= 0 after each training forward; 0 = off"),
    MOE_FIELD(num_shared_experts, MOE_CONFIG_INT64, "0", "S, always-on shared experts, >= 0"),
    MOE_FIELD(d_ff_shared, MOE_CONFIG_INT64, "0", "hidden width of each shared expert; 0 = d_ff"),
    MOE_FIELD(shared_gate, MOE_CONFIG_BOOL, "false", "scale the shared output by sigmoid(x . shared.gate)"),
    MOE_FIELD(device, MOE_CONFIG_ENUM, "cpu", "where the layer computes: cpu or cuda"),
    MOE_FIELD(device_index, MOE_CONFIG_INT, "0", "CUDA device ordinal"),
    MOE_FIELD(dtype, MOE_CONFIG_ENUM, "float32",
              "storage of activations and expert weights: float32, bfloat16 or float16"),
    MOE_FIELD(allow_tf32, MOE_CONFIG_BOOL, "false", "CUDA float32 GEMMs may use TF32"),
    MOE_FIELD(seed, MOE_CONFIG_UINT64, "0", "seed of the parameter initialisation and of the router noise"),
    MOE_FIELD(check_finite, MOE_CONFIG_BOOL, "false", "refuse NaN/Inf in x and dy with MOE_ERR_NONFINITE"),
    MOE_FIELD(comm, MOE_CONFIG_POINTER, "NULL",
              "expert-parallel communicator (not owned); NULL: this process holds every expert"),
    MOE_FIELD(min_capacity, MOE_CONFIG_INT64, "0",
              "with capacity_factor > 0, at least this many slots per expert (DeepSpeed's min_capacity), >= 0"),
    MOE_FIELD(capacity_group_size, MOE_CONFIG_INT64, "0",
              "with capacity_factor > 0, tokens per capacity group (e.g. the sequence length: Switch's capacity "
              "per sequence), each group with its own C; 0 = the whole call, >= 0"),
    MOE_FIELD(router_logit_bias, MOE_CONFIG_BOOL, "false",
              "a trainable router.logit_bias [E] added to the logits before scoring (nn.Linear router with bias)"),
    MOE_FIELD(expert_bias, MOE_CONFIG_BOOL, "false",
              "routed experts have trainable biases experts.b1, b3 (GLU) [E, d_ff] and b2 [E, d]; b2 is scaled by "
              "the routing weight"),
    MOE_FIELD(swiglu_alpha, MOE_CONFIG_FLOAT, "1.702",
              "swiglu_clamped: a = (clamp(u, -l, l) + 1) * hc * sigmoid(alpha * hc), hc = min(h, l); alpha > 0"),
    MOE_FIELD(swiglu_limit, MOE_CONFIG_FLOAT, "7", "swiglu_clamped: the clamp limit l > 0"),
};
#undef MOE_FIELD

// One row per preset, applied over the defaults (moe.h lists them with their sources).
constexpr PresetRow kPresets[] = {
    {"mixtral", "Mixtral 8x7B (Jiang et al. 2024): E 8, k 2, SwiGLU, softmax, normalized top-k, dropless, aux 0.02",
     // router_aux_loss_coef of Mixtral-8x7B's config
     "num_experts=8 top_k=2 aux_loss_coef=0.02"},
    {"switch",
     "Switch Transformer (Fedus et al. 2021): E 8, k 1, ReLU FFN, capacity 1.25 with position dropping, "
     "jitter 0.01, aux 0.01, router z-loss 0.001 (Zoph et al. 2022); set capacity_group_size to the sequence "
     "length for its capacity per sequence",
     // The top-1 gate value is the router probability itself (not normalized); dropped tokens pass
     // through the residual.
     "num_experts=8 top_k=1 activation=relu normalize_topk=false capacity_factor=1.25 drop_policy=position "
     "noise=jitter noise_eps=0.01 aux_loss_coef=0.01 z_loss_coef=0.001"},
    {"shazeer",
     "Shazeer et al. 2017: E 8, k 2, ReLU FFN, softmax over the k noisy logits, Gaussian noise, importance and "
     "load losses 0.01, no load-balance loss",
     "num_experts=8 top_k=2 activation=relu noise=gaussian aux_loss_coef=0 importance_loss_coef=0.01 "
     "load_loss_coef=0.01"},
    {"expert-choice",
     "Expert choice (Zhou et al. 2022): E 8, k 2, capacity factor 1 (C = 2T/E), each expert picks its tokens",
     // C = T*k/E: on average k experts per token; balanced by construction, so no aux loss.
     "num_experts=8 top_k=2 routing=expert_choice capacity_factor=1 normalize_topk=false aux_loss_coef=0"},
    {"deepseek-v3",
     "DeepSeek-V3 (DeepSeek-AI 2024): E 256, k 8, sigmoid scores, 8 groups keep 4, routed_scale 2.5, one shared "
     "expert, bias-based balancing u 0.001, aux 0.0001",
     // aux_loss_coef is the complementary sequence-wise loss's alpha.
     "num_experts=256 top_k=8 score=sigmoid normalize_topk=true routed_scale=2.5 num_groups=8 topk_groups=4 "
     "num_shared_experts=1 bias_update_rate=0.001 aux_loss_coef=0.0001"},
    {"qwen2-moe",
     "Qwen2-MoE (Qwen team 2024): E 60, k 4, softmax, not normalized, 4 shared experts behind a sigmoid gate, "
     "aux 0.001",
     "num_experts=60 top_k=4 normalize_topk=false num_shared_experts=4 shared_gate=true aux_loss_coef=0.001"},
    {"qwen3-moe",
     "Qwen3-MoE (Qwen3-30B-A3B's config.json): E 128, k 8, softmax, normalized top-k, no shared expert, aux 0.001",
     "num_experts=128 top_k=8 normalize_topk=true aux_loss_coef=0.001"},
    {"olmoe",
     "OLMoE-1B-7B (Muennighoff et al. 2024): E 64, k 8, softmax, not normalized, aux 0.01, router z-loss 0.001",
     // z-loss 0.001 as in its training; its config.json carries router_aux_loss_coef 0.01.
     "num_experts=64 top_k=8 normalize_topk=false aux_loss_coef=0.01 z_loss_coef=0.001"},
    {"gpt-oss",
     "gpt-oss-20b (OpenAI 2025; transformers' GptOssConfig and the model's config.json): E 32, k 4, router "
     "logit bias, softmax over the k largest logits, expert biases, clamped SwiGLU (alpha 1.702, limit 7), "
     "dropless, aux 0.9; gpt-oss-120b: set num_experts 128",
     // Softmax over the k largest logits equals softmax, top-k, then normalisation over the k (in
     // value and gradient). router_aux_loss_coef 0.9 is in both models' config.json.
     "num_experts=32 top_k=4 normalize_topk=true router_logit_bias=true expert_bias=true "
     "activation=swiglu_clamped swiglu_alpha=1.702 swiglu_limit=7 aux_loss_coef=0.9"},
};

// ---- text -----------------------------------------------------------------------------------------
std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Names compare in any case, with '-' for '_' and without surrounding spaces (no allocation:
// moe_config_init reads its defaults through here).
bool same_name(std::string_view text, const char *name) {
  text = trim(text);
  if (text.size() != std::strlen(name)) return false;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
    if (c == '-') c = '_';
    if (c != name[i]) return false;
  }
  return true;
}

// The caller's text as it appears in a message: quoted, cut after 80 bytes.
std::string quoted(std::string_view s) {
  if (s.size() > 80) return "'" + std::string(s.substr(0, 80)) + "...'";
  return "'" + std::string(s) + "'";
}

[[noreturn]] void bad_value(const FieldRow &row, std::string_view text, const std::string &why) {
  fail(MOE_ERR_INVALID_ARGUMENT, "%s=%s %s", row.name, quoted(text).c_str(), why.c_str());
}

template <class T>
T parse_integer(const FieldRow &row, std::string_view text) {
  std::string_view t = trim(text);
  const char *first = t.data(), *last = t.data() + t.size();
  if (!t.empty() && t.front() == '+') ++first;
  auto out_of_range = [&] {
    bad_value(row, text, "is out of range [" + std::to_string(std::numeric_limits<T>::min()) + ", " +
                             std::to_string(std::numeric_limits<T>::max()) + "]");
  };
  if (std::is_unsigned_v<T> && t.size() > 1 && t.front() == '-' && std::isdigit(static_cast<unsigned char>(t[1])))
    out_of_range();
  T v{};
  auto [end, ec] = std::from_chars(first, last, v, 10);
  if (ec == std::errc::result_out_of_range && end == last) out_of_range();
  if (ec != std::errc() || end != last || first == last)
    bad_value(row, text, std::is_unsigned_v<T> ? "is not an unsigned decimal integer" : "is not a decimal integer");
  return v;
}

float parse_float(const FieldRow &row, std::string_view text) {
  std::string_view t = trim(text);
  const char *first = t.data(), *last = t.data() + t.size();
  if (!t.empty() && t.front() == '+') ++first;
  float v = 0;
  auto [end, ec] = std::from_chars(first, last, v, std::chars_format::general);
  if (ec == std::errc::result_out_of_range && end == last) {
    // from_chars reports underflow the same way: a magnitude below the smallest subnormal reads as 0.
    double d = 0;
    auto [dend, dec] = std::from_chars(first, last, d, std::chars_format::general);
    if (dec == std::errc() && dend == last && std::fabs(d) < 1.0) return std::signbit(d) ? -0.0f : 0.0f;
    bad_value(row, text, "is out of the float32 range (magnitude up to 3.4028235e+38)");
  }
  if (ec != std::errc() || end != last || first == last) bad_value(row, text, "is not a number");
  if (!std::isfinite(v)) bad_value(row, text, "is not finite: a finite float32 is needed");
  return v;
}

int parse_bool(const FieldRow &row, std::string_view text) {
  for (const char *yes : {"true", "1", "yes", "on"})
    if (same_name(text, yes)) return 1;
  for (const char *no : {"false", "0", "no", "off"})
    if (same_name(text, no)) return 0;
  bad_value(row, text, "is not one of 'true', 'false' (or 1, 0, yes, no, on, off)");
}

int parse_enum(const FieldRow &row, std::string_view text) {
  const EnumNames &e = *row.values;
  for (int v = 0; v < e.count; ++v)
    if (same_name(text, e.names[v])) return v;
  for (int i = 0; i < e.num_aliases; ++i)
    if (same_name(text, e.aliases[i].alias)) return e.aliases[i].value;
  std::string allowed = "is not one of ";
  for (int v = 0; v < e.count; ++v) allowed += (v ? ", '" : "'") + std::string(e.names[v]) + "'";
  if (e.num_aliases > 0) {
    allowed += " (or ";
    for (int i = 0; i < e.num_aliases; ++i) allowed += (i ? ", " : "") + std::string(e.aliases[i].alias);
    allowed += ")";
  }
  bad_value(row, text, allowed);
}

// Reads the field's bytes; C callers may store any int in an enum field, so enums are read as int.
template <class T>
T load(const moe_config *cfg, const FieldRow &row) {
  T v;
  std::memcpy(&v, reinterpret_cast<const unsigned char *>(cfg) + row.offset, sizeof v);
  return v;
}
template <class T>
void store(moe_config *cfg, const FieldRow &row, T v) {
  std::memcpy(reinterpret_cast<unsigned char *>(cfg) + row.offset, &v, sizeof v);
}

template <class T>
std::string decimal(T v) {
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, ec == std::errc() ? end : buf);
}

}  // namespace

int num_fields() { return static_cast<int>(std::size(kFields)); }
const FieldRow &field_row(int index) { return kFields[index]; }

const FieldRow *find_field(std::string_view name) {
  for (const FieldRow &row : kFields)
    if (name == row.name) return &row;
  return nullptr;
}

int num_presets() { return static_cast<int>(std::size(kPresets)); }
const PresetRow &preset_row(int index) { return kPresets[index]; }

std::string field_names() {
  std::string out;
  for (const FieldRow &row : kFields) out += (out.empty() ? "" : ", ") + std::string(row.name);
  return out;
}

void set_field(moe_config *cfg, const FieldRow &row, std::string_view text) {
  switch (row.type) {
    case MOE_CONFIG_INT64: store(cfg, row, parse_integer<int64_t>(row, text)); return;
    case MOE_CONFIG_INT: store(cfg, row, parse_integer<int>(row, text)); return;
    case MOE_CONFIG_UINT64: store(cfg, row, parse_integer<uint64_t>(row, text)); return;
    case MOE_CONFIG_BOOL: store(cfg, row, parse_bool(row, text)); return;
    case MOE_CONFIG_FLOAT: store(cfg, row, parse_float(row, text)); return;
    case MOE_CONFIG_ENUM: store(cfg, row, parse_enum(row, text)); return;
    case MOE_CONFIG_POINTER:
      fail(MOE_ERR_INVALID_ARGUMENT, "%s is a pointer: it cannot be set from text (assign cfg->%s)", row.name,
           row.name);
  }
  fail(MOE_ERR_INTERNAL, "field %s has no type", row.name);
}

std::string get_field(const moe_config *cfg, const FieldRow &row) {
  switch (row.type) {
    case MOE_CONFIG_INT64: return decimal(load<int64_t>(cfg, row));
    case MOE_CONFIG_INT: return decimal(load<int>(cfg, row));
    case MOE_CONFIG_UINT64: return decimal(load<uint64_t>(cfg, row));
    case MOE_CONFIG_BOOL: return load<int>(cfg, row) ? "true" : "false";
    case MOE_CONFIG_FLOAT: {
      // std::to_chars without a format or precision writes the shortest text that reads back as
      // the same float, in plain or exponent form, whichever is shorter.
      char buf[32];
      auto [end, ec] = std::to_chars(buf, buf + sizeof buf, load<float>(cfg, row));
      return std::string(buf, ec == std::errc() ? end : buf);
    }
    case MOE_CONFIG_ENUM: {
      const int v = load<int>(cfg, row);
      return v >= 0 && v < row.values->count ? row.values->names[v] : decimal(v);
    }
    case MOE_CONFIG_POINTER: {
      const void *p = load<const void *>(cfg, row);
      if (!p) return "NULL";
      char buf[32];
      std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, reinterpret_cast<uintptr_t>(p));
      return buf;
    }
  }
  return "";
}

void apply_field_defaults(moe_config *cfg) {
  for (const FieldRow &row : kFields) {
    if (row.type == MOE_CONFIG_POINTER) {
      store<const void *>(cfg, row, nullptr);
      continue;
    }
    set_field(cfg, row, row.default_value);
  }
}

}  // namespace moe
