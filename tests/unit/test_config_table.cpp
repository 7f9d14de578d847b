// The table of moe_config (src/core/config_table.cpp) is the struct: every field once, at its
// offset, with its size and type; its defaults are moe_config_init's; every value's text
// round-trips through moe_config_set / moe_config_get; bad names and values are refused with the
// field and the allowed values named and the struct unchanged; the presets enumerate and apply.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "moe/moe.h"

namespace {

struct Expected {
  const char *name;
  size_t offset, size;
  moe_config_type type;
};

// Written out by hand from moe.h: a field added to the struct without a row (or the reverse)
// fails StructIsCoveredWithoutGaps below, and a row that disagrees with the struct fails here.
#define F(field, type) {#field, offsetof(moe_config, field), sizeof(moe_config::field), type}
const std::vector<Expected> kExpected = {
    F(d_model, MOE_CONFIG_INT64),           F(d_ff, MOE_CONFIG_INT64),
    F(num_experts, MOE_CONFIG_INT64),       F(top_k, MOE_CONFIG_INT64),
    F(activation, MOE_CONFIG_ENUM),         F(routing, MOE_CONFIG_ENUM),
    F(score, MOE_CONFIG_ENUM),              F(normalize_topk, MOE_CONFIG_BOOL),
    F(routed_scale, MOE_CONFIG_FLOAT),      F(num_groups, MOE_CONFIG_INT64),
    F(topk_groups, MOE_CONFIG_INT64),       F(capacity_factor, MOE_CONFIG_FLOAT),
    F(drop_policy, MOE_CONFIG_ENUM),        F(noise, MOE_CONFIG_ENUM),
    F(noise_eps, MOE_CONFIG_FLOAT),         F(aux_loss_coef, MOE_CONFIG_FLOAT),
    F(z_loss_coef, MOE_CONFIG_FLOAT),       F(importance_loss_coef, MOE_CONFIG_FLOAT),
    F(load_loss_coef, MOE_CONFIG_FLOAT),    F(bias_update_rate, MOE_CONFIG_FLOAT),
    F(num_shared_experts, MOE_CONFIG_INT64), F(d_ff_shared, MOE_CONFIG_INT64),
    F(shared_gate, MOE_CONFIG_BOOL),        F(device, MOE_CONFIG_ENUM),
    F(device_index, MOE_CONFIG_INT),        F(dtype, MOE_CONFIG_ENUM),
    F(allow_tf32, MOE_CONFIG_BOOL),         F(seed, MOE_CONFIG_UINT64),
    F(check_finite, MOE_CONFIG_BOOL),       F(comm, MOE_CONFIG_POINTER),
    F(min_capacity, MOE_CONFIG_INT64),      F(capacity_group_size, MOE_CONFIG_INT64),
    F(router_logit_bias, MOE_CONFIG_BOOL),  F(expert_bias, MOE_CONFIG_BOOL),
    F(swiglu_alpha, MOE_CONFIG_FLOAT),      F(swiglu_limit, MOE_CONFIG_FLOAT),
};
#undef F

moe_config_field_info field(int i) {
  moe_config_field_info f;
  std::memset(&f, 0, sizeof f);
  f.struct_size = sizeof f;
  EXPECT_EQ(moe_config_field(i, &f), MOE_OK) << moe_last_error();
  return f;
}

std::vector<moe_config_field_info> all_fields() {
  std::vector<moe_config_field_info> out;
  for (int i = 0; i < moe_config_num_fields(); ++i) out.push_back(field(i));
  return out;
}

moe_config init() {
  moe_config c;
  std::memset(&c, 0x5A, sizeof c);  // moe_config_init must write every byte that matters
  moe_config_init(&c);
  return c;
}

std::string get(const moe_config &c, const char *name) {
  char buf[MOE_CONFIG_VALUE_MAX];
  std::memset(buf, 'x', sizeof buf);
  EXPECT_EQ(moe_config_get(&c, name, buf, sizeof buf), MOE_OK) << moe_last_error();
  return std::string(buf);
}

template <class T>
T at(const moe_config &c, const moe_config_field_info &f) {
  T v;
  std::memcpy(&v, reinterpret_cast<const unsigned char *>(&c) + f.offset, sizeof v);
  return v;
}

// set must fail with INVALID_ARGUMENT, name every `needles` in its message, and change nothing.
void expect_refused(const char *name, const char *value, const std::vector<std::string> &needles) {
  moe_config c = init();
  moe_config before;
  std::memcpy(&before, &c, sizeof c);
  EXPECT_EQ(moe_config_set(&c, name, value), MOE_ERR_INVALID_ARGUMENT) << name << "=" << (value ? value : "NULL");
  const std::string msg = moe_last_error();
  for (const std::string &n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0) << name << ": the struct changed on failure";
}

TEST(ConfigTable, EveryFieldOnceAtItsOffsetWithItsSizeAndType) {
  ASSERT_EQ(moe_config_num_fields(), static_cast<int>(kExpected.size()));
  std::set<std::string> names;
  for (size_t i = 0; i < kExpected.size(); ++i) {
    const moe_config_field_info f = field(static_cast<int>(i));
    SCOPED_TRACE(kExpected[i].name);
    EXPECT_STREQ(f.name, kExpected[i].name);
    EXPECT_EQ(f.offset, kExpected[i].offset);
    EXPECT_EQ(f.size, kExpected[i].size);
    EXPECT_EQ(f.type, kExpected[i].type);
    EXPECT_TRUE(names.insert(f.name).second) << "twice: " << f.name;
    ASSERT_NE(f.description, nullptr);
    EXPECT_GT(std::strlen(f.description), 10u);
    EXPECT_EQ(std::strchr(f.description, '\n'), nullptr) << "one line";
    ASSERT_NE(f.default_value, nullptr);
    if (f.type == MOE_CONFIG_ENUM) {
      ASSERT_GT(f.num_values, 1);
      ASSERT_NE(f.value_names, nullptr);
    } else {
      EXPECT_EQ(f.num_values, 0);
      EXPECT_EQ(f.value_names, nullptr);
    }
  }
}

// Independent of the hand list: the rows tile the struct after struct_size, leaving only the
// padding the compiler may add, so a field of moe.h without a row cannot go unnoticed.
TEST(ConfigTable, StructIsCoveredWithoutGaps) {
  std::vector<moe_config_field_info> f = all_fields();
  std::sort(f.begin(), f.end(), [](auto &a, auto &b) { return a.offset < b.offset; });
  size_t end = sizeof(size_t);  // struct_size comes first
  for (const moe_config_field_info &x : f) {
    ASSERT_GE(x.offset, end) << x.name << " overlaps the field before it";
    EXPECT_LT(x.offset - end, x.size) << "a gap of " << (x.offset - end) << " bytes before " << x.name
                                      << ": more than padding, a field without a row?";
    EXPECT_EQ(x.offset % x.size, 0u) << x.name;
    end = x.offset + x.size;
  }
  EXPECT_LT(sizeof(moe_config) - end, alignof(moe_config)) << "bytes after the last row: a field without a row?";
}

TEST(ConfigTable, DefaultsAreMoeConfigInit) {
  const moe_config c = init();
  EXPECT_EQ(c.struct_size, sizeof(moe_config));
  moe_config built;
  std::memset(&built, 0, sizeof built);
  built.struct_size = sizeof built;
  for (const moe_config_field_info &f : all_fields()) {
    EXPECT_EQ(get(c, f.name), f.default_value) << f.name;
    if (f.type != MOE_CONFIG_POINTER) {
      EXPECT_EQ(moe_config_set(&built, f.name, f.default_value), MOE_OK) << f.name;
    }
  }
  moe_config zeroed;
  std::memset(&zeroed, 0, sizeof zeroed);
  moe_config_init(&zeroed);
  EXPECT_EQ(std::memcmp(&built, &zeroed, sizeof built), 0) << "the rows' defaults, set one by one, are not moe_config_init";
  // The values moe.h documents beside each field.
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.noise_eps, 0.01f);
  EXPECT_EQ(c.aux_loss_coef, 0.01f);
  EXPECT_EQ(c.normalize_topk, 1);
  EXPECT_EQ(c.comm, nullptr);
}

TEST(ConfigTable, EnumNamesAreThePinnedValues) {
  struct Name {
    const char *field, *text;
    int value;
  };
  const Name names[] = {
      {"activation", "swiglu", MOE_ACT_SWIGLU},     {"activation", "geglu", MOE_ACT_GEGLU},
      {"activation", "relu", MOE_ACT_RELU},         {"activation", "gelu", MOE_ACT_GELU},
      {"activation", "silu", MOE_ACT_SILU},         {"activation", "swiglu_clamped", MOE_ACT_SWIGLU_CLAMPED},
      {"routing", "token_choice", MOE_ROUTE_TOKEN_CHOICE},
      {"routing", "expert_choice", MOE_ROUTE_EXPERT_CHOICE}, {"score", "softmax", MOE_SCORE_SOFTMAX},
      {"score", "sigmoid", MOE_SCORE_SIGMOID},      {"noise", "none", MOE_NOISE_NONE},
      {"noise", "gaussian", MOE_NOISE_GAUSSIAN},    {"noise", "jitter", MOE_NOISE_JITTER},
      {"drop_policy", "position", MOE_DROP_POSITION}, {"drop_policy", "probs", MOE_DROP_PROBS},
      {"device", "cpu", MOE_DEVICE_CPU},            {"device", "cuda", MOE_DEVICE_CUDA},
      {"dtype", "float32", MOE_DTYPE_F32},          {"dtype", "bfloat16", MOE_DTYPE_BF16},
      {"dtype", "float16", MOE_DTYPE_F16},
  };
  for (const Name &n : names) {
    moe_config c = init();
    ASSERT_EQ(moe_config_set(&c, n.field, n.text), MOE_OK) << moe_last_error();
    int stored = -1;
    for (const moe_config_field_info &f : all_fields())
      if (std::strcmp(f.name, n.field) == 0) {
        stored = at<int>(c, f);
        ASSERT_LT(n.value, f.num_values);
        EXPECT_STREQ(f.value_names[n.value], n.text);
      }
    EXPECT_EQ(stored, n.value) << n.field << "=" << n.text;
    EXPECT_EQ(get(c, n.field), n.text);
  }
  // The spellings the bindings and moe-bench accepted before: any case, '-' for '_', aliases.
  const Name aliases[] = {
      {"dtype", "bf16", MOE_DTYPE_BF16},  {"dtype", "BFloat16", MOE_DTYPE_BF16}, {"dtype", "f32", MOE_DTYPE_F32},
      {"dtype", "fp32", MOE_DTYPE_F32},   {"dtype", "f16", MOE_DTYPE_F16},       {"dtype", "fp16", MOE_DTYPE_F16},
      {"dtype", "half", MOE_DTYPE_F16},   {"routing", "expert-choice", MOE_ROUTE_EXPERT_CHOICE},
      {"routing", "token", MOE_ROUTE_TOKEN_CHOICE}, {"routing", "expert", MOE_ROUTE_EXPERT_CHOICE},
      {"activation", " GeGLU ", MOE_ACT_GEGLU}, {"device", "CUDA", MOE_DEVICE_CUDA},
  };
  for (const Name &n : aliases) {
    moe_config c = init();
    ASSERT_EQ(moe_config_set(&c, n.field, n.text), MOE_OK) << n.text << ": " << moe_last_error();
    for (const moe_config_field_info &f : all_fields())
      if (std::strcmp(f.name, n.field) == 0) {
        EXPECT_EQ(at<int>(c, f), n.value) << n.text;
        EXPECT_EQ(get(c, n.field), f.value_names[n.value]) << n.text;
      }
  }
}

TEST(ConfigTable, IntegersAndFlagsRoundTrip) {
  const char *int64s[] = {"0", "1", "-1", "8", "9223372036854775807", "-9223372036854775808"};
  for (const char *v : int64s) {
    moe_config c = init();
    ASSERT_EQ(moe_config_set(&c, "d_model", v), MOE_OK) << moe_last_error();
    EXPECT_EQ(c.d_model, std::strtoll(v, nullptr, 10));
    EXPECT_EQ(get(c, "d_model"), v);
  }
  moe_config c = init();
  ASSERT_EQ(moe_config_set(&c, "d_ff", "+42"), MOE_OK);  // read, though never written
  EXPECT_EQ(get(c, "d_ff"), "42");
  for (const char *v : {"0", "18446744073709551615", "12345678901234567890"}) {
    ASSERT_EQ(moe_config_set(&c, "seed", v), MOE_OK) << moe_last_error();
    EXPECT_EQ(c.seed, std::strtoull(v, nullptr, 10));
    EXPECT_EQ(get(c, "seed"), v);
  }
  for (const char *v : {"2147483647", "-2147483648", "3"}) {
    ASSERT_EQ(moe_config_set(&c, "device_index", v), MOE_OK) << moe_last_error();
    EXPECT_EQ(get(c, "device_index"), v);
  }
  const struct {
    const char *text;
    int value;
  } flags[] = {{"true", 1}, {"false", 0}, {"1", 1}, {"0", 0}, {"YES", 1}, {"no", 0}, {"on", 1}, {" off ", 0}};
  for (auto &f : flags) {
    ASSERT_EQ(moe_config_set(&c, "shared_gate", f.text), MOE_OK) << f.text;
    EXPECT_EQ(c.shared_gate, f.value) << f.text;
    EXPECT_EQ(get(c, "shared_gate"), f.value ? "true" : "false");
  }
  c.check_finite = 7;  // C callers may store any nonzero value
  EXPECT_EQ(get(c, "check_finite"), "true");
  c.activation = static_cast<moe_activation>(17);  // written as its number, which set refuses
  EXPECT_EQ(get(c, "activation"), "17");
  EXPECT_EQ(moe_config_set(&c, "activation", "17"), MOE_ERR_INVALID_ARGUMENT);
}

TEST(ConfigTable, FloatsRoundTripExactlyWithTheShortestText) {
  std::mt19937 rng(20240611);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, 0.01f, 0.001f, 1e-4f, 2.5f, 1.25f, 0.1f, 1e-5f, 100000.0f,
                               std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                               std::numeric_limits<float>::denorm_min(), -3.4028235e38f, 16777216.0f};
  for (int i = 0; i < 20000; ++i) {
    uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, sizeof f);
    if (std::isfinite(f)) values.push_back(f);
  }
  for (float f : values) {
    moe_config c = init();
    c.routed_scale = f;
    const std::string text = get(c, "routed_scale");
    moe_config d = init();
    ASSERT_EQ(moe_config_set(&d, "routed_scale", text.c_str()), MOE_OK) << text << ": " << moe_last_error();
    uint32_t a, b;
    std::memcpy(&a, &c.routed_scale, 4);
    std::memcpy(&b, &d.routed_scale, 4);
    ASSERT_EQ(a, b) << text << " does not read back as the same float32";
    // Shortest: no printf text of the fewest digits that read back as f (%.*g, the oracle) is
    // shorter. A large integral float may be written plainly with more digits ("-3781731840", not
    // "-3.7817318e+09"): fewer characters, the same bits.
    std::string oracle;
    for (int p = 1; p <= 9; ++p) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.*g", p, static_cast<double>(f));
      const float back = std::strtof(buf, nullptr);
      if (back == f && std::signbit(back) == std::signbit(f)) {
        oracle = buf;
        break;
      }
    }
    ASSERT_FALSE(oracle.empty()) << f;
    ASSERT_LE(text.size(), oracle.size()) << text << " is longer than " << oracle;
  }
  moe_config c = init();
  for (const char *pair : {"0.01=0.01", "1e-05=1e-05", "1.5=1.5", "+2=2", "0.02=0.02", "1E-3=0.001", "-0=-0",
                           "1e-50=0"}) {
    std::string p = pair;
    const std::string in = p.substr(0, p.find('=')), out = p.substr(p.find('=') + 1);
    ASSERT_EQ(moe_config_set(&c, "aux_loss_coef", in.c_str()), MOE_OK) << in << ": " << moe_last_error();
    EXPECT_EQ(get(c, "aux_loss_coef"), out) << in;
  }
  EXPECT_EQ(c.aux_loss_coef, 0.0f);
}

TEST(ConfigTable, BadNamesAndValuesAreRefusedNamingWhatIsAllowed) {
  expect_refused("d_modle", "8", {"d_modle", "the fields are: d_model, d_ff,", "check_finite"});
  expect_refused("", "8", {"no field ''"});
  expect_refused("activation", "swish",
                 {"activation='swish'", "'swiglu', 'geglu', 'relu', 'gelu', 'silu', 'swiglu_clamped'"});
  expect_refused("dtype", "f64", {"dtype='f64'", "'float32', 'bfloat16', 'float16'", "bf16"});
  expect_refused("routing", "", {"routing=''", "'token_choice', 'expert_choice'"});
  expect_refused("shared_gate", "maybe", {"shared_gate='maybe'", "'true', 'false'"});
  expect_refused("top_k", "two", {"top_k='two'", "not a decimal integer"});
  expect_refused("top_k", "2.0", {"top_k='2.0'", "integer"});
  expect_refused("top_k", "8 experts", {"top_k='8 experts'"});
  expect_refused("d_model", "9223372036854775808", {"d_model=", "out of range [-9223372036854775808, 9223372036854775807]"});
  expect_refused("device_index", "2147483648", {"device_index=", "out of range [-2147483648, 2147483647]"});
  expect_refused("seed", "-1", {"seed='-1'", "out of range [0, 18446744073709551615]"});
  expect_refused("seed", "18446744073709551616", {"seed=", "out of range"});
  expect_refused("aux_loss_coef", "abc", {"aux_loss_coef='abc'", "not a number"});
  expect_refused("aux_loss_coef", "0.01x", {"aux_loss_coef='0.01x'"});
  expect_refused("aux_loss_coef", "1e39", {"aux_loss_coef='1e39'", "float32 range"});
  expect_refused("aux_loss_coef", "nan", {"aux_loss_coef='nan'", "finite"});
  expect_refused("routed_scale", "inf", {"routed_scale='inf'", "finite"});
  expect_refused("comm", "0x1234", {"comm is a pointer"});
  expect_refused(nullptr, "8", {"name is NULL"});
  expect_refused("top_k", nullptr, {"value is NULL"});
  EXPECT_EQ(moe_config_set(nullptr, "top_k", "1"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("cfg is NULL"), std::string::npos);
  const std::string long_value(1000, '9');
  expect_refused("top_k", long_value.c_str(), {"top_k='999", "...'"});
}

TEST(ConfigTable, StructSizeBoundsWhatIsReadAndWritten) {
  moe_config c;
  std::memset(&c, 0, sizeof c);  // never initialised
  EXPECT_EQ(moe_config_set(&c, "top_k", "1"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("struct_size is 0"), std::string::npos) << moe_last_error();
  c = init();
  c.struct_size = offsetof(moe_config, seed);  // a caller built against a moe.h that ended before seed
  EXPECT_EQ(moe_config_set(&c, "d_model", "4"), MOE_OK);
  const uint64_t seed = c.seed;
  EXPECT_EQ(moe_config_set(&c, "seed", "5"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("past cfg->struct_size"), std::string::npos) << moe_last_error();
  EXPECT_EQ(c.seed, seed);
  char buf[MOE_CONFIG_VALUE_MAX] = "untouched";
  EXPECT_EQ(moe_config_get(&c, "seed", buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_STREQ(buf, "untouched");
}

TEST(ConfigTable, GetChecksItsBuffer) {
  moe_config c = init();
  char buf[8] = "keep";
  EXPECT_EQ(moe_config_get(&c, "dtype", buf, 7), MOE_ERR_INVALID_ARGUMENT);  // "float32" needs 8 bytes
  EXPECT_NE(std::string(moe_last_error()).find("needs 8 bytes"), std::string::npos) << moe_last_error();
  EXPECT_STREQ(buf, "keep");
  EXPECT_EQ(moe_config_get(&c, "dtype", buf, 8), MOE_OK);
  EXPECT_STREQ(buf, "float32");
  EXPECT_EQ(moe_config_get(&c, "dtype", nullptr, 8), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_config_get(&c, "nope", buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_config_get(nullptr, "dtype", buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(get(c, "comm"), "NULL");
  // The widest texts fit MOE_CONFIG_VALUE_MAX.
  c.seed = UINT64_MAX;
  c.d_model = INT64_MIN;
  c.routed_scale = -1.17549435e-38f;
  c.comm = reinterpret_cast<const moe_comm *>(~uintptr_t{0});
  for (const moe_config_field_info &f : all_fields()) EXPECT_LT(get(c, f.name).size(), size_t{MOE_CONFIG_VALUE_MAX});
}

TEST(ConfigTable, FieldInfoChecksItsArguments) {
  moe_config_field_info f;
  std::memset(&f, 0x33, sizeof f);
  f.struct_size = sizeof f;
  moe_config_field_info before = f;
  EXPECT_EQ(moe_config_field(-1, &f), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_config_field(moe_config_num_fields(), &f), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("index is"), std::string::npos);
  EXPECT_EQ(std::memcmp(&f, &before, sizeof f), 0);
  EXPECT_EQ(moe_config_field(0, nullptr), MOE_ERR_INVALID_ARGUMENT);
  f.struct_size = 0;
  EXPECT_EQ(moe_config_field(0, &f), MOE_ERR_INVALID_ARGUMENT);
  // A caller that knows only the first members gets those and nothing past them.
  unsigned char older[offsetof(moe_config_field_info, type) + 16];
  std::memset(older, 0x77, sizeof older);
  moe_config_field_info head{};
  head.struct_size = offsetof(moe_config_field_info, type);
  std::memcpy(older, &head, sizeof head.struct_size);
  ASSERT_EQ(moe_config_field(0, reinterpret_cast<moe_config_field_info *>(older)), MOE_OK);
  const char *name;
  std::memcpy(&name, older + offsetof(moe_config_field_info, name), sizeof name);
  EXPECT_STREQ(name, "d_model");
  for (size_t i = offsetof(moe_config_field_info, type); i < sizeof older; ++i) EXPECT_EQ(older[i], 0x77);
}

TEST(ConfigTable, PresetsEnumerateAndApply) {
  const std::vector<std::string> expected = {"mixtral", "switch", "shazeer", "expert-choice", "deepseek-v3",
                                             "qwen2-moe", "qwen3-moe", "olmoe", "gpt-oss"};
  ASSERT_EQ(moe_config_num_presets(), static_cast<int>(expected.size()));
  for (int i = 0; i < moe_config_num_presets(); ++i) {
    SCOPED_TRACE(expected[i]);
    ASSERT_NE(moe_config_preset_name(i), nullptr);
    EXPECT_EQ(moe_config_preset_name(i), expected[i]);
    ASSERT_NE(moe_config_preset_description(i), nullptr);
    EXPECT_GT(std::strlen(moe_config_preset_description(i)), 20u);
    moe_config c = init();
    ASSERT_EQ(moe_config_preset(&c, moe_config_preset_name(i)), MOE_OK) << moe_last_error();
    c.d_model = 16;
    c.d_ff = 32;
    moe_layer *layer = nullptr;
    ASSERT_EQ(moe_layer_create(&c, &layer), MOE_OK) << moe_last_error();
    moe_layer_destroy(layer);
  }
  EXPECT_EQ(moe_config_preset_name(-1), nullptr);
  EXPECT_NE(std::string(moe_last_error()).find("index is -1"), std::string::npos);
  EXPECT_EQ(moe_config_preset_description(moe_config_num_presets()), nullptr);
  // Each preset sets what moe.h says it does.
  moe_config c = init();
  ASSERT_EQ(moe_config_preset(&c, "switch"), MOE_OK);
  EXPECT_EQ(get(c, "top_k"), "1");
  EXPECT_EQ(get(c, "activation"), "relu");
  EXPECT_EQ(get(c, "capacity_factor"), "1.25");
  EXPECT_EQ(get(c, "noise"), "jitter");
  EXPECT_EQ(get(c, "z_loss_coef"), "0.001");
  EXPECT_EQ(get(c, "normalize_topk"), "false");
  ASSERT_EQ(moe_config_preset(&c, "deepseek-v3"), MOE_OK);
  EXPECT_EQ(c.num_experts, 256);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_EQ(c.score, MOE_SCORE_SIGMOID);
  EXPECT_EQ(c.routed_scale, 2.5f);
  EXPECT_EQ(c.num_groups, 8);
  EXPECT_EQ(c.topk_groups, 4);
  EXPECT_EQ(c.num_shared_experts, 1);
  EXPECT_EQ(c.bias_update_rate, 0.001f);
  EXPECT_EQ(c.aux_loss_coef, 0.0001f);
  EXPECT_EQ(c.noise, MOE_NOISE_NONE);  // the rest are the defaults
  ASSERT_EQ(moe_config_preset(&c, "qwen2-moe"), MOE_OK);
  EXPECT_EQ(c.num_experts, 60);
  EXPECT_EQ(c.shared_gate, 1);
  EXPECT_EQ(c.normalize_topk, 0);
  moe_config before = c;
  EXPECT_EQ(moe_config_preset(&c, "gpt5"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("known: mixtral, switch, shazeer, expert-choice, deepseek-v3, qwen2-moe"),
            std::string::npos)
      << moe_last_error();
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0);
}

// moe_layer_create checks every enum and float field the table lists, naming the field.
TEST(ConfigTable, CreateValidatesEveryEnumAndFloatRow) {
  for (const moe_config_field_info &f : all_fields()) {
    if (f.type != MOE_CONFIG_ENUM && f.type != MOE_CONFIG_FLOAT) continue;
    moe_config c = init();
    c.d_model = 8;
    c.d_ff = 16;
    unsigned char *p = reinterpret_cast<unsigned char *>(&c) + f.offset;
    if (f.type == MOE_CONFIG_ENUM) {
      const int bad = f.num_values;
      std::memcpy(p, &bad, sizeof bad);
    } else {
      const float bad = std::numeric_limits<float>::infinity();
      std::memcpy(p, &bad, sizeof bad);
    }
    moe_layer *layer = nullptr;
    EXPECT_EQ(moe_layer_create(&c, &layer), MOE_ERR_INVALID_ARGUMENT) << f.name;
    EXPECT_NE(std::string(moe_last_error()).find(std::string("cfg->") + f.name), std::string::npos)
        << f.name << ": " << moe_last_error();
    EXPECT_EQ(layer, nullptr);
  }
}

}  // namespace
