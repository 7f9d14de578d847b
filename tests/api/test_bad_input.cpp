// Bad input through the public C API only (libmoe.so): for every public function and each of its
// bad arguments, the documented status (include/moe/moe.h), a fresh moe_last_error() message that
// names the argument, out-parameters untouched, and a layer that still works afterwards: an
// inference forward gives the same bytes as before the bad call (shared/DESIGN.md section 7).
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cctype>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "support/layer.h"
#include "support/random.h"

namespace {

using moe_test::all_params;
using moe_test::inputs;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr const char *kMarker = "zz-previous-error-marker";

// True when msg contains word with no identifier character on either side.
bool names(const std::string &msg, const std::string &word) {
  auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t pos = msg.find(word); pos != std::string::npos; pos = msg.find(word, pos + 1)) {
    const bool left = pos == 0 || !ident(msg[pos - 1]);
    const bool right = pos + word.size() >= msg.size() || !ident(msg[pos + word.size()]);
    if (left && right) return true;
  }
  return false;
}

// Leaves a known message as this thread's last error, so that a test can tell whether the next
// failed call replaced it (successful calls do not clear it).
void mark_last_error() {
  moe_config c;
  moe_config_init(&c);
  ASSERT_EQ(moe_config_preset(&c, kMarker), MOE_ERR_INVALID_ARGUMENT);
  ASSERT_NE(std::string(moe_last_error()).find(kMarker), std::string::npos);
}

std::string sname(moe_status s) { return moe_status_name(s); }

moe_config small_config() { return moe_test::config(8, 16, 4, 2, 3); }

template <class T>
T *sentinel_ptr() {
  return reinterpret_cast<T *>(static_cast<uintptr_t>(0x5eed0));
}

class BadInput : public ::testing::Test {
 protected:
  static constexpr int64_t T = 9;

  void SetUp() override {
    cfg = small_config();
    ASSERT_EQ(moe_layer_create(&cfg, &layer), MOE_OK) << moe_last_error();
    d = cfg.d_model;
    x = inputs(T * d, 1);
    dy = inputs(T * d, 2);
    y_ref.assign(T * d, 0.0f);
    ASSERT_EQ(moe_forward(layer, x.data(), T, y_ref.data(), nullptr), MOE_OK) << moe_last_error();
    params_ref = all_params(layer);
  }
  void TearDown() override { moe_layer_destroy(layer); }

  // The layer is usable and unchanged: same parameters, and an inference forward gives the
  // same bytes as before the bad call.
  void expect_layer_unchanged(const std::string &what) {
    std::vector<float> y(T * d, kNaN);
    ASSERT_EQ(moe_forward(layer, x.data(), T, y.data(), nullptr), MOE_OK) << what << ": " << moe_last_error();
    EXPECT_EQ(std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)), 0)
        << what << ": forward changed after the bad call";
    EXPECT_TRUE(all_params(layer) == params_ref) << what << ": parameters changed";
  }

  // Runs a call that must fail with `want` and a fresh message naming every word in `words`.
  void bad(int line, const char *text, const std::function<moe_status()> &call, moe_status want,
           std::initializer_list<std::string> words) {
    SCOPED_TRACE(testing::Message() << "line " << line << ": " << text);
    mark_last_error();
    const moe_status got = call();
    EXPECT_EQ(sname(got), sname(want));
    const std::string msg = moe_last_error();
    EXPECT_FALSE(msg.empty());
    EXPECT_EQ(msg.find(kMarker), std::string::npos) << "the failed call left the previous message: " << msg;
    for (const std::string &w : words) EXPECT_TRUE(names(msg, w)) << "message does not name '" << w << "': " << msg;
    expect_layer_unchanged(text);
  }

  moe_config cfg{};
  moe_layer *layer = nullptr;
  int64_t d = 0;
  std::vector<float> x, dy, y_ref;
  std::vector<std::vector<float>> params_ref;
};

#define BAD(call, status, ...) bad(__LINE__, #call, [&]() -> moe_status { return (call); }, status, {__VA_ARGS__})

// ---- status, version, errors ------------------------------------------------------------------

TEST(Status, NamesOfEveryValue) {
  const std::pair<moe_status, const char *> all[] = {
      {MOE_OK, "MOE_OK"},
      {MOE_ERR_INVALID_ARGUMENT, "MOE_ERR_INVALID_ARGUMENT"},
      {MOE_ERR_OUT_OF_MEMORY, "MOE_ERR_OUT_OF_MEMORY"},
      {MOE_ERR_UNSUPPORTED, "MOE_ERR_UNSUPPORTED"},
      {MOE_ERR_DEVICE, "MOE_ERR_DEVICE"},
      {MOE_ERR_COMM, "MOE_ERR_COMM"},
      {MOE_ERR_STATE, "MOE_ERR_STATE"},
      {MOE_ERR_NONFINITE, "MOE_ERR_NONFINITE"},
      {MOE_ERR_INTERNAL, "MOE_ERR_INTERNAL"},
  };
  for (const auto &p : all) {
    ASSERT_NE(moe_status_name(p.first), nullptr);
    EXPECT_STREQ(moe_status_name(p.first), p.second);
  }
  // Pinned values (the enum never changes between versions).
  EXPECT_EQ(MOE_OK, 0);
  EXPECT_EQ(MOE_ERR_INVALID_ARGUMENT, 1);
  EXPECT_EQ(MOE_ERR_INTERNAL, 8);
  for (int v : {9, 10, 100, -1, INT_MAX, INT_MIN}) {
    const char *n = moe_status_name(static_cast<moe_status>(v));
    ASSERT_NE(n, nullptr) << v;
    EXPECT_STREQ(n, "MOE_ERR_UNKNOWN") << v;
  }
}

TEST(Status, Version) {
  EXPECT_EQ(moe_version(), static_cast<uint32_t>(MOE_VERSION_NUMBER));
  EXPECT_EQ(MOE_VERSION_NUMBER, MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH);
}

TEST(Status, LastErrorIsPerThreadAndNotClearedBySuccess) {
  std::string fresh = "unset";
  std::thread([&] { fresh = moe_last_error(); }).join();
  EXPECT_EQ(fresh, "") << "a thread that never failed must read \"\"";

  mark_last_error();
  moe_config c = small_config();
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK);
  EXPECT_NE(std::string(moe_last_error()).find(kMarker), std::string::npos) << "a success cleared the message";
  moe_layer_destroy(l);

  // An error in another thread does not show in this one.
  std::string other;
  std::thread([&] {
    moe_layer *o = nullptr;
    EXPECT_EQ(moe_layer_create(nullptr, &o), MOE_ERR_INVALID_ARGUMENT);
    other = moe_last_error();
  }).join();
  EXPECT_FALSE(other.empty());
  EXPECT_NE(std::string(moe_last_error()).find(kMarker), std::string::npos);
}

TEST(Destroy, NullIsANoOp) {
  moe_layer_destroy(nullptr);
  moe_context_destroy(nullptr);
  moe_config_init(nullptr);
}

TEST(Destroy, LayerBeforeItsContextsIsSafe) {
  moe_config c = small_config();
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK);
  moe_context *a = nullptr, *b = nullptr;
  ASSERT_EQ(moe_context_create(l, &a), MOE_OK);
  ASSERT_EQ(moe_context_create(l, &b), MOE_OK);
  std::vector<float> x = inputs(5 * c.d_model, 4), y(5 * c.d_model);
  ASSERT_EQ(moe_forward(l, x.data(), 5, y.data(), a), MOE_OK);
  moe_layer_destroy(l);
  moe_context_destroy(a);
  moe_context_destroy(b);
  // And once more with a single, empty context.
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK);
  ASSERT_EQ(moe_context_create(l, &a), MOE_OK);
  moe_layer_destroy(l);
  moe_context_destroy(a);
}

// ---- configuration ----------------------------------------------------------------------------

TEST(ConfigInit, SetsStructSizeAndDefaults) {
  moe_config c;
  std::memset(&c, 0x7f, sizeof c);
  moe_config_init(&c);
  EXPECT_EQ(c.struct_size, sizeof(moe_config));
  EXPECT_EQ(c.d_model, 0);
  EXPECT_EQ(c.d_ff, 0);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.comm, nullptr);
}

TEST_F(BadInput, ConfigPreset) {
  moe_config c = small_config();
  const moe_config before = c;
  BAD(moe_config_preset(nullptr, "mixtral"), MOE_ERR_INVALID_ARGUMENT, "cfg");
  BAD(moe_config_preset(&c, nullptr), MOE_ERR_INVALID_ARGUMENT, "name");
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0);
  for (const char *n : {"", "MIXTRAL", "deepseek", "no-such-preset"}) {
    BAD(moe_config_preset(&c, n), MOE_ERR_INVALID_ARGUMENT, "name");
    EXPECT_NE(std::string(moe_last_error()).find(std::string("\"") + n + "\""), std::string::npos)
        << "the message should quote the unknown name: " << moe_last_error();
    EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0) << "cfg changed by a failed preset \"" << n << "\"";
  }
}

TEST_F(BadInput, ConfigByName) {
  moe_config c = small_config();
  const moe_config before = c;
  char buf[MOE_CONFIG_VALUE_MAX] = "keep";
  BAD(moe_config_set(nullptr, "top_k", "1"), MOE_ERR_INVALID_ARGUMENT, "cfg");
  BAD(moe_config_set(&c, nullptr, "1"), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_config_set(&c, "top_k", nullptr), MOE_ERR_INVALID_ARGUMENT, "value");
  BAD(moe_config_set(&c, "no_such_field", "1"), MOE_ERR_INVALID_ARGUMENT, "no_such_field");
  BAD(moe_config_set(&c, "top_k", "1x"), MOE_ERR_INVALID_ARGUMENT, "top_k");
  BAD(moe_config_set(&c, "noise", "loud"), MOE_ERR_INVALID_ARGUMENT, "noise");
  BAD(moe_config_set(&c, "comm", "NULL"), MOE_ERR_INVALID_ARGUMENT, "comm");
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0) << "cfg changed by a failed moe_config_set";
  BAD(moe_config_get(nullptr, "top_k", buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT, "cfg");
  BAD(moe_config_get(&c, nullptr, buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_config_get(&c, "top_k", nullptr, sizeof buf), MOE_ERR_INVALID_ARGUMENT, "buf");
  BAD(moe_config_get(&c, "top_k", buf, 1), MOE_ERR_INVALID_ARGUMENT, "size");
  BAD(moe_config_get(&c, "topk", buf, sizeof buf), MOE_ERR_INVALID_ARGUMENT, "topk");
  EXPECT_STREQ(buf, "keep") << "buf changed by a failed moe_config_get";
  moe_config_field_info f{};
  f.struct_size = sizeof f;
  BAD(moe_config_field(-1, &f), MOE_ERR_INVALID_ARGUMENT, "index");
  BAD(moe_config_field(moe_config_num_fields(), &f), MOE_ERR_INVALID_ARGUMENT, "index");
  BAD(moe_config_field(0, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
  EXPECT_EQ(f.name, nullptr) << "out changed by a failed moe_config_field";
  mark_last_error();
  EXPECT_EQ(moe_config_preset_name(moe_config_num_presets()), nullptr);
  EXPECT_TRUE(names(moe_last_error(), "index")) << moe_last_error();
  mark_last_error();
  EXPECT_EQ(moe_config_preset_description(-1), nullptr);
  EXPECT_TRUE(names(moe_last_error(), "index")) << moe_last_error();
}

// A preset that returns MOE_OK is one this build provides: with its widths set, a layer must be
// created from it (moe.h: MOE_ERR_UNSUPPORTED for a known preset whose routing this build lacks).
TEST(Preset, EveryAcceptedPresetMakesALayer) {
  ASSERT_GE(moe_config_num_presets(), 6);
  for (int i = 0; i < moe_config_num_presets(); ++i) {
    const char *name = moe_config_preset_name(i);
    ASSERT_NE(name, nullptr);
    SCOPED_TRACE(name);
    moe_config c;
    moe_config_init(&c);
    const moe_status s = moe_config_preset(&c, name);
    ASSERT_TRUE(s == MOE_OK || s == MOE_ERR_UNSUPPORTED) << sname(s) << ": " << moe_last_error();
    if (s == MOE_ERR_UNSUPPORTED) {
      EXPECT_FALSE(std::string(moe_last_error()).empty());
      continue;
    }
    EXPECT_EQ(c.struct_size, sizeof(moe_config));
    EXPECT_EQ(c.d_model, 0);
    EXPECT_EQ(c.d_ff, 0);
    c.d_model = 8;
    c.d_ff = 16;
    moe_layer *l = nullptr;
    const moe_status cs = moe_layer_create(&c, &l);
    EXPECT_EQ(sname(cs), "MOE_OK") << "moe_config_preset(\"" << name
                                   << "\") returned MOE_OK but moe_layer_create refuses it: " << moe_last_error();
    if (cs != MOE_OK) continue;
    const int64_t T = 16;
    std::vector<float> x = inputs(T * 8, 5), y(T * 8, kNaN), dx(T * 8, kNaN);
    moe_context *ctx = nullptr;
    ASSERT_EQ(moe_context_create(l, &ctx), MOE_OK);
    EXPECT_EQ(moe_forward(l, x.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
    EXPECT_EQ(moe_backward(l, ctx, x.data(), dx.data()), MOE_OK) << moe_last_error();
    for (float v : y) EXPECT_TRUE(std::isfinite(v));
    for (float v : dx) EXPECT_TRUE(std::isfinite(v));
    moe_context_destroy(ctx);
    moe_layer_destroy(l);
  }
}

// ---- moe_layer_create ---------------------------------------------------------------------------

struct BadCfg {
  const char *label;
  std::function<void(moe_config &)> apply;
  moe_status want;
  std::vector<std::string> words;
};

TEST_F(BadInput, LayerCreateNullArguments) {
  moe_layer *out = sentinel_ptr<moe_layer>();
  BAD(moe_layer_create(nullptr, &out), MOE_ERR_INVALID_ARGUMENT, "cfg");
  EXPECT_EQ(out, sentinel_ptr<moe_layer>());
  moe_config c = small_config();
  BAD(moe_layer_create(&c, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
}

TEST_F(BadInput, LayerCreateBadFields) {
  const std::vector<BadCfg> cases = {
      {"struct_size 0", [](moe_config &c) { c.struct_size = 0; }, MOE_ERR_INVALID_ARGUMENT, {"struct_size"}},
      {"struct_size 3", [](moe_config &c) { c.struct_size = 3; }, MOE_ERR_INVALID_ARGUMENT, {"struct_size", "3"}},
      {"struct_size huge", [](moe_config &c) { c.struct_size = size_t{1} << 30; }, MOE_ERR_INVALID_ARGUMENT,
       {"struct_size"}},
      {"d_model 0", [](moe_config &c) { c.d_model = 0; }, MOE_ERR_INVALID_ARGUMENT, {"d_model", "0"}},
      {"d_model -5", [](moe_config &c) { c.d_model = -5; }, MOE_ERR_INVALID_ARGUMENT, {"d_model", "-5"}},
      {"d_ff 0", [](moe_config &c) { c.d_ff = 0; }, MOE_ERR_INVALID_ARGUMENT, {"d_ff"}},
      {"d_ff -1", [](moe_config &c) { c.d_ff = -1; }, MOE_ERR_INVALID_ARGUMENT, {"d_ff", "-1"}},
      {"num_experts 0", [](moe_config &c) { c.num_experts = 0; }, MOE_ERR_INVALID_ARGUMENT, {"num_experts"}},
      {"num_experts -2", [](moe_config &c) { c.num_experts = -2; }, MOE_ERR_INVALID_ARGUMENT, {"num_experts", "-2"}},
      {"top_k 0", [](moe_config &c) { c.top_k = 0; }, MOE_ERR_INVALID_ARGUMENT, {"top_k"}},
      {"top_k -1", [](moe_config &c) { c.top_k = -1; }, MOE_ERR_INVALID_ARGUMENT, {"top_k"}},
      {"k > E", [](moe_config &c) { c.top_k = 5; }, MOE_ERR_INVALID_ARGUMENT, {"top_k", "5"}},
      {"groups do not divide E", [](moe_config &c) { c.num_groups = 3; }, MOE_ERR_INVALID_ARGUMENT,
       {"num_groups", "3"}},
      {"num_groups 0", [](moe_config &c) { c.num_groups = 0; }, MOE_ERR_INVALID_ARGUMENT, {"num_groups"}},
      {"num_groups -4", [](moe_config &c) { c.num_groups = -4; }, MOE_ERR_INVALID_ARGUMENT, {"num_groups"}},
      {"num_groups > E", [](moe_config &c) { c.num_groups = 8; }, MOE_ERR_INVALID_ARGUMENT, {"num_groups"}},
      {"topk_groups 0",
       [](moe_config &c) {
         c.num_groups = 2;
         c.topk_groups = 0;
       },
       MOE_ERR_INVALID_ARGUMENT, {"topk_groups"}},
      {"topk_groups > num_groups",
       [](moe_config &c) {
         c.num_groups = 2;
         c.topk_groups = 3;
       },
       MOE_ERR_INVALID_ARGUMENT, {"topk_groups", "3"}},
      {"topk_groups -1",
       [](moe_config &c) {
         c.num_groups = 2;
         c.topk_groups = -1;
       },
       MOE_ERR_INVALID_ARGUMENT, {"topk_groups"}},
      {"d_model*d_ff*E overflows int64",
       [](moe_config &c) {
         c.d_model = int64_t{1} << 31;
         c.d_ff = int64_t{1} << 31;
         c.num_experts = 8;
       },
       MOE_ERR_INVALID_ARGUMENT, {"d_model", "d_ff", "num_experts"}},
      {"d_model*d_ff overflows int64 by itself",
       [](moe_config &c) {
         c.d_model = int64_t{1} << 40;
         c.d_ff = int64_t{1} << 40;
       },
       MOE_ERR_INVALID_ARGUMENT, {"d_model", "d_ff"}},
      {"activation 99", [](moe_config &c) { c.activation = static_cast<moe_activation>(99); },
       MOE_ERR_INVALID_ARGUMENT, {"activation", "99"}},
      {"activation -1", [](moe_config &c) { c.activation = static_cast<moe_activation>(-1); },
       MOE_ERR_INVALID_ARGUMENT, {"activation"}},
      {"routing 2", [](moe_config &c) { c.routing = static_cast<moe_routing>(2); }, MOE_ERR_INVALID_ARGUMENT,
       {"routing"}},
      {"score 7", [](moe_config &c) { c.score = static_cast<moe_score>(7); }, MOE_ERR_INVALID_ARGUMENT, {"score"}},
      {"noise 3", [](moe_config &c) { c.noise = static_cast<moe_noise>(3); }, MOE_ERR_INVALID_ARGUMENT, {"noise"}},
      {"drop_policy 2", [](moe_config &c) { c.drop_policy = static_cast<moe_drop_policy>(2); },
       MOE_ERR_INVALID_ARGUMENT, {"drop_policy"}},
      {"device 9", [](moe_config &c) { c.device = static_cast<moe_device>(9); }, MOE_ERR_INVALID_ARGUMENT,
       {"device"}},
      {"dtype 3", [](moe_config &c) { c.dtype = static_cast<moe_dtype>(3); }, MOE_ERR_INVALID_ARGUMENT, {"dtype"}},
      {"routed_scale NaN", [](moe_config &c) { c.routed_scale = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"routed_scale"}},
      {"routed_scale inf", [](moe_config &c) { c.routed_scale = kInf; }, MOE_ERR_INVALID_ARGUMENT,
       {"routed_scale"}},
      {"capacity_factor NaN", [](moe_config &c) { c.capacity_factor = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"capacity_factor"}},
      {"capacity_factor inf", [](moe_config &c) { c.capacity_factor = kInf; }, MOE_ERR_INVALID_ARGUMENT,
       {"capacity_factor"}},
      {"noise_eps NaN", [](moe_config &c) { c.noise_eps = kNaN; }, MOE_ERR_INVALID_ARGUMENT, {"noise_eps"}},
      {"aux_loss_coef NaN", [](moe_config &c) { c.aux_loss_coef = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"aux_loss_coef"}},
      {"aux_loss_coef inf", [](moe_config &c) { c.aux_loss_coef = kInf; }, MOE_ERR_INVALID_ARGUMENT,
       {"aux_loss_coef"}},
      {"z_loss_coef -inf", [](moe_config &c) { c.z_loss_coef = -kInf; }, MOE_ERR_INVALID_ARGUMENT,
       {"z_loss_coef"}},
      {"importance_loss_coef NaN", [](moe_config &c) { c.importance_loss_coef = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"importance_loss_coef"}},
      {"load_loss_coef NaN", [](moe_config &c) { c.load_loss_coef = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"load_loss_coef"}},
      {"bias_update_rate NaN", [](moe_config &c) { c.bias_update_rate = kNaN; }, MOE_ERR_INVALID_ARGUMENT,
       {"bias_update_rate"}},
      {"num_shared_experts -1", [](moe_config &c) { c.num_shared_experts = -1; }, MOE_ERR_INVALID_ARGUMENT,
       {"num_shared_experts"}},
      {"d_ff_shared -3",
       [](moe_config &c) {
         c.num_shared_experts = 1;
         c.d_ff_shared = -3;
       },
       MOE_ERR_INVALID_ARGUMENT, {"d_ff_shared"}},
      {"shared_gate without shared experts", [](moe_config &c) { c.shared_gate = 1; }, MOE_ERR_INVALID_ARGUMENT,
       {"shared_gate"}},
      {"swiglu_limit 0", [](moe_config &c) { c.activation = MOE_ACT_SWIGLU_CLAMPED, c.swiglu_limit = 0.0f; },
       MOE_ERR_INVALID_ARGUMENT, {"swiglu_limit", "0"}},
      {"swiglu_limit -7", [](moe_config &c) { c.swiglu_limit = -7.0f; }, MOE_ERR_INVALID_ARGUMENT,
       {"swiglu_limit", "-7"}},
      {"swiglu_limit NaN", [](moe_config &c) { c.swiglu_limit = kNaN; }, MOE_ERR_INVALID_ARGUMENT, {"swiglu_limit"}},
      {"swiglu_alpha 0", [](moe_config &c) { c.activation = MOE_ACT_SWIGLU_CLAMPED, c.swiglu_alpha = 0.0f; },
       MOE_ERR_INVALID_ARGUMENT, {"swiglu_alpha", "0"}},
      {"swiglu_alpha -1.5", [](moe_config &c) { c.swiglu_alpha = -1.5f; }, MOE_ERR_INVALID_ARGUMENT,
       {"swiglu_alpha", "-1.5"}},
      {"activation 6", [](moe_config &c) { c.activation = static_cast<moe_activation>(6); }, MOE_ERR_INVALID_ARGUMENT,
       {"activation", "6"}},
  };
  for (const BadCfg &b : cases) {
    moe_config c = small_config();
    b.apply(c);
    moe_layer *out = sentinel_ptr<moe_layer>();
    SCOPED_TRACE(b.label);
    mark_last_error();
    const moe_status s = moe_layer_create(&c, &out);
    EXPECT_EQ(sname(s), sname(b.want));
    const std::string msg = moe_last_error();
    EXPECT_EQ(msg.find(kMarker), std::string::npos) << msg;
    for (const std::string &w : b.words) EXPECT_TRUE(names(msg, w)) << "message does not name '" << w << "': " << msg;
    EXPECT_EQ(out, sentinel_ptr<moe_layer>()) << "out changed on failure";
    if (s == MOE_OK && out != sentinel_ptr<moe_layer>()) moe_layer_destroy(out);
  }
  expect_layer_unchanged("bad configurations");
}

// A single-rank communicator whose hooks copy send to recv.
moe_status one_rank_counts(void *, const int64_t *send, int64_t *recv) {
  recv[0] = send[0];
  return MOE_OK;
}
moe_status one_rank_rows(void *, const void *send, const int64_t *send_counts, void *recv, const int64_t *,
                         size_t row_bytes, void *) {
  if (send_counts[0] > 0) std::memcpy(recv, send, static_cast<size_t>(send_counts[0]) * row_bytes);
  return MOE_OK;
}

moe_comm one_rank_comm() {
  moe_comm m{};
  m.struct_size = sizeof(moe_comm);
  m.size = 1;
  m.rank = 0;
  m.exchange_counts = one_rank_counts;
  m.exchange_rows = one_rank_rows;
  return m;
}

TEST_F(BadInput, LayerCreateBadComm) {
  std::vector<std::pair<const char *, std::function<void(moe_comm &)>>> cases = {
      {"comm struct_size 0", [](moe_comm &m) { m.struct_size = 0; }},
      {"comm size 0", [](moe_comm &m) { m.size = 0; }},
      {"comm rank -1", [](moe_comm &m) { m.rank = -1; }},
      {"comm rank == size", [](moe_comm &m) { m.rank = 1; }},
      {"comm NULL exchange_counts", [](moe_comm &m) { m.exchange_counts = nullptr; }},
      {"comm NULL exchange_rows", [](moe_comm &m) { m.exchange_rows = nullptr; }},
      {"experts do not divide over ranks",
       [](moe_comm &m) {
         m.size = 3;
         m.rank = 0;
       }},
  };
  for (auto &cse : cases) {
    moe_comm m = one_rank_comm();
    cse.second(m);
    moe_config c = small_config();
    c.comm = &m;
    moe_layer *out = sentinel_ptr<moe_layer>();
    BAD(moe_layer_create(&c, &out), MOE_ERR_INVALID_ARGUMENT, "comm");
    EXPECT_EQ(out, sentinel_ptr<moe_layer>()) << cse.first;
  }
}

// moe.h: "Expert-choice routing with a comm is refused (MOE_ERR_UNSUPPORTED)".
TEST_F(BadInput, ExpertChoiceWithCommIsUnsupported) {
  moe_comm m = one_rank_comm();
  moe_config c = small_config();
  c.comm = &m;
  c.routing = MOE_ROUTE_EXPERT_CHOICE;
  c.capacity_factor = 1.0f;
  moe_layer *out = sentinel_ptr<moe_layer>();
  BAD(moe_layer_create(&c, &out), MOE_ERR_UNSUPPORTED, "comm");
  EXPECT_EQ(out, sentinel_ptr<moe_layer>());
}

// A single-rank communicator holds every expert: the same results as no communicator.
TEST_F(BadInput, OneRankCommGivesTheSameForward) {
  moe_comm m = one_rank_comm();
  moe_config c = cfg;
  c.comm = &m;
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
  std::vector<float> y(T * d, kNaN);
  ASSERT_EQ(moe_forward(l, x.data(), T, y.data(), nullptr), MOE_OK) << moe_last_error();
  EXPECT_EQ(std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)), 0);
  moe_layer_destroy(l);
}

// Hooks that fail: the call fails with MOE_ERR_COMM naming the hook and its status, the context is
// left empty, nothing else is written, and the layer is intact (moe.h, expert parallelism).
struct FailingComm {
  int calls = 0;
};
moe_status failing_counts(void *user, const int64_t *, int64_t *) {
  ++static_cast<FailingComm *>(user)->calls;
  return MOE_ERR_DEVICE;
}
moe_status failing_rows(void *user, const void *, const int64_t *, void *, const int64_t *, size_t, void *) {
  ++static_cast<FailingComm *>(user)->calls;
  return MOE_ERR_DEVICE;
}

TEST_F(BadInput, FailingCommHookGivesCommError) {
  FailingComm state;
  moe_comm m{};
  m.struct_size = sizeof m;
  m.size = 2;  // this process plays rank 0; rank 1 would fail at the same collective
  m.rank = 0;
  m.user = &state;
  m.exchange_counts = failing_counts;
  m.exchange_rows = failing_rows;
  moe_config c = cfg;
  c.comm = &m;
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
  ASSERT_EQ(moe_layer_num_params(l), moe_layer_num_params(layer));
  const auto params_before = all_params(l);
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(l, &ctx), MOE_OK);
  std::vector<float> y(T * d, 55.0f);
  for (int mode = 0; mode < 3; ++mode) {
    SCOPED_TRACE(mode == 0 ? "inference forward" : mode == 1 ? "training forward" : "route");
    mark_last_error();
    const int before = state.calls;
    const moe_status s = mode == 0   ? moe_forward(l, x.data(), T, y.data(), nullptr)
                         : mode == 1 ? moe_forward(l, x.data(), T, y.data(), ctx)
                                     : moe_route(l, x.data(), T, ctx);
    EXPECT_EQ(sname(s), "MOE_ERR_COMM");
    EXPECT_GT(state.calls, before) << "no hook was called";
    const std::string msg = moe_last_error();
    EXPECT_TRUE(names(msg, "exchange_rows") || names(msg, "exchange_counts")) << "message does not name the hook: " << msg;
    EXPECT_NE(msg.find("MOE_ERR_DEVICE"), std::string::npos) << "message does not give the hook's status: " << msg;
    EXPECT_EQ(y, std::vector<float>(T * d, 55.0f)) << "y written by a failed call";
    moe_stats st{};
    st.struct_size = sizeof st;
    EXPECT_EQ(sname(moe_context_stats(ctx, &st)), "MOE_ERR_STATE") << "the context is not left empty";
    std::vector<float> dx(T * d, 66.0f);
    EXPECT_EQ(sname(moe_backward(l, ctx, dy.data(), dx.data())), "MOE_ERR_STATE");
    EXPECT_EQ(dx, std::vector<float>(T * d, 66.0f));
  }
  EXPECT_TRUE(all_params(l) == params_before) << "parameters changed by failed collectives";
  moe_context_destroy(ctx);
  moe_layer_destroy(l);
  expect_layer_unchanged("failing comm");
}

// ---- the comm's own reason (moe_comm::last_error) ---------------------------------------------

// Rank 0 of 2 whose peer, rank 1, holds no tokens: this rank's rows to itself come back, rank 1
// sends zeros (its statistics and counts) and drops what it is sent. Consistent, so a forward
// succeeds; a hook can be made to fail, with a reason for last_error.
struct ReasonComm {
  enum Fail { kNone, kCounts, kRows } fail = kNone;
  const char *reason = "";
  int failures = 0;          // hook calls that failed
  int reason_calls = 0;      // last_error calls
  int reason_misplaced = 0;  // last_error calls not right after a failed hook
  bool just_failed = false;
};

moe_status reason_counts(void *user, const int64_t *send, int64_t *recv) {
  auto &c = *static_cast<ReasonComm *>(user);
  c.just_failed = c.fail == ReasonComm::kCounts;
  if (c.just_failed) {
    ++c.failures;
    return MOE_ERR_COMM;
  }
  recv[0] = send[0];
  recv[1] = 0;
  return MOE_OK;
}

moe_status reason_rows(void *user, const void *send, const int64_t *send_counts, void *recv, const int64_t *recv_counts,
                       size_t row_bytes, void *) {
  auto &c = *static_cast<ReasonComm *>(user);
  c.just_failed = c.fail == ReasonComm::kRows;
  if (c.just_failed) {
    ++c.failures;
    return MOE_ERR_COMM;
  }
  const size_t own = static_cast<size_t>(send_counts[0]) * row_bytes;
  if (own > 0) std::memcpy(recv, send, own);
  if (recv_counts[1] > 0)
    std::memset(static_cast<char *>(recv) + own, 0, static_cast<size_t>(recv_counts[1]) * row_bytes);
  return MOE_OK;
}

const char *reason_of(void *user) {
  auto &c = *static_cast<ReasonComm *>(user);
  ++c.reason_calls;
  if (!c.just_failed) ++c.reason_misplaced;
  return c.reason;
}

moe_comm reason_comm(ReasonComm *state) {
  moe_comm m{};
  m.struct_size = sizeof m;
  m.size = 2;
  m.rank = 0;
  m.user = state;
  m.exchange_counts = reason_counts;
  m.exchange_rows = reason_rows;
  m.last_error = reason_of;
  return m;
}

class CommReason : public ::testing::Test {
 protected:
  static constexpr int64_t T = 9;
  void SetUp() override {
    c = small_config();
    x = inputs(T * c.d_model, 1);
    dy = inputs(T * c.d_model, 2);
  }
  // A layer over m, and its inference output while the comm works.
  void make_layer(const moe_comm &m) {
    c.comm = &m;
    ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
    y_ok.assign(T * c.d_model, kNaN);
    scratch.assign(T * c.d_model, kNaN);
    ASSERT_EQ(moe_forward(l, x.data(), T, y_ok.data(), nullptr), MOE_OK) << moe_last_error();
  }
  // The failed call left the layer usable: with the comm working again, the same output.
  void expect_usable(ReasonComm &state) {
    state.fail = ReasonComm::kNone;
    std::vector<float> y(T * c.d_model, kNaN);
    ASSERT_EQ(moe_forward(l, x.data(), T, y.data(), nullptr), MOE_OK) << moe_last_error();
    EXPECT_EQ(std::memcmp(y.data(), y_ok.data(), y.size() * sizeof(float)), 0) << "output changed by the failure";
  }
  void TearDown() override { moe_layer_destroy(l); }

  moe_config c{};
  moe_layer *l = nullptr;
  std::vector<float> x, dy, y_ok, scratch;
};

TEST_F(CommReason, ReasonOfAFailedHookReachesLastError) {
  for (auto fail : {ReasonComm::kRows, ReasonComm::kCounts}) {
    const char *hook = fail == ReasonComm::kRows ? "exchange_rows" : "exchange_counts";
    SCOPED_TRACE(hook);
    ReasonComm state;
    const moe_comm m = reason_comm(&state);
    make_layer(m);
    state.fail = fail;
    state.reason = "link down on port 7";
    mark_last_error();
    std::vector<float> y(T * c.d_model, 55.0f);
    EXPECT_EQ(sname(moe_forward(l, x.data(), T, y.data(), nullptr)), "MOE_ERR_COMM");
    const std::string msg = moe_last_error();
    EXPECT_TRUE(names(msg, hook)) << msg;
    EXPECT_NE(msg.find(std::string("comm->") + hook + " returned MOE_ERR_COMM: link down on port 7"), std::string::npos)
        << msg;
    EXPECT_EQ(state.failures, 1);
    EXPECT_EQ(state.reason_calls, 1) << "last_error must be asked once per failed hook";
    EXPECT_EQ(state.reason_misplaced, 0) << "last_error called other than right after the failed hook";
    EXPECT_EQ(y, std::vector<float>(T * c.d_model, 55.0f)) << "y written by a failed call";
    expect_usable(state);
    EXPECT_EQ(state.reason_calls, 1) << "last_error called after a successful hook";
    moe_layer_destroy(l);
    l = nullptr;
  }
}

TEST_F(CommReason, ReasonOfAFailedBackwardExchange) {
  ReasonComm state;
  const moe_comm m = reason_comm(&state);
  make_layer(m);
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(l, &ctx), MOE_OK);
  std::vector<float> y(T * c.d_model), dx(T * c.d_model, 66.0f);
  ASSERT_EQ(moe_forward(l, x.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
  state.fail = ReasonComm::kRows;
  state.reason = "link down on port 7";
  EXPECT_EQ(sname(moe_backward(l, ctx, dy.data(), dx.data())), "MOE_ERR_COMM");
  const std::string msg = moe_last_error();
  EXPECT_TRUE(names(msg, "moe_backward") && names(msg, "exchange_rows")) << msg;
  EXPECT_NE(msg.find("link down on port 7"), std::string::npos) << msg;
  moe_context_destroy(ctx);
  expect_usable(state);
}

// NULL or "" from last_error, or no last_error at all: the message names the hook and its status
// and ends there.
TEST_F(CommReason, NoReasonGivesTheHookAndStatusOnly) {
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(variant == 0   ? "last_error returns NULL"
                 : variant == 1 ? "last_error returns \"\""
                                : "last_error NULL");
    ReasonComm state;
    moe_comm m = reason_comm(&state);
    if (variant == 2) m.last_error = nullptr;
    make_layer(m);
    state.fail = ReasonComm::kRows;
    state.reason = variant == 0 ? nullptr : "";
    EXPECT_EQ(sname(moe_forward(l, x.data(), T, scratch.data(), nullptr)), "MOE_ERR_COMM");
    const std::string msg = moe_last_error();
    const std::string tail = "comm->exchange_rows returned MOE_ERR_COMM";
    ASSERT_GE(msg.size(), tail.size()) << msg;
    EXPECT_EQ(msg.substr(msg.size() - tail.size()), tail) << msg;
    EXPECT_EQ(state.reason_calls, variant == 2 ? 0 : 1);
    expect_usable(state);
    moe_layer_destroy(l);
    l = nullptr;
  }
}

// A comm built against a moe.h without last_error: struct_size stops before the field, and what
// lies there (here a function that counts its calls) is never read.
TEST_F(CommReason, OlderShorterCommStillWorksAndLastErrorIsNotRead) {
  ReasonComm state;
  moe_comm m = reason_comm(&state);
  m.struct_size = offsetof(moe_comm, last_error);
  make_layer(m);
  state.fail = ReasonComm::kRows;
  state.reason = "must not be read";
  EXPECT_EQ(sname(moe_forward(l, x.data(), T, scratch.data(), nullptr)), "MOE_ERR_COMM");
  const std::string msg = moe_last_error();
  EXPECT_TRUE(names(msg, "exchange_rows")) << msg;
  EXPECT_EQ(msg.find("must not be read"), std::string::npos) << msg;
  EXPECT_EQ(state.reason_calls, 0) << "last_error read past the comm's struct_size";
  expect_usable(state);
  moe_config back;
  back.struct_size = sizeof back;
  ASSERT_EQ(moe_layer_get_config(l, &back), MOE_OK);
  EXPECT_EQ(back.comm, &m);
}

// A runaway reason is cut (at a character boundary of UTF-8 text) and marked, not copied whole.
TEST_F(CommReason, LongReasonIsBounded) {
  std::string reason = "prefix ";
  while (reason.size() < 100000) reason += "\xc3\xa9";  // é, two bytes
  ReasonComm state;
  const moe_comm m = reason_comm(&state);
  make_layer(m);
  state.fail = ReasonComm::kRows;
  state.reason = reason.c_str();
  EXPECT_EQ(sname(moe_forward(l, x.data(), T, scratch.data(), nullptr)), "MOE_ERR_COMM");
  const std::string msg = moe_last_error();
  EXPECT_LT(msg.size(), 1024u + 200u) << "the reason was not bounded";
  EXPECT_NE(msg.find("returned MOE_ERR_COMM: prefix \xc3\xa9"), std::string::npos);
  ASSERT_GE(msg.size(), 5u);
  EXPECT_EQ(msg.substr(msg.size() - 3), "...");
  EXPECT_EQ(msg.substr(msg.size() - 5, 2), "\xc3\xa9") << "a UTF-8 character was split at the cut";
  expect_usable(state);
}

// struct_size: this header's size or the one before last_error; anything else is refused.
TEST_F(CommReason, StructSizeOfEitherVersion) {
  ReasonComm state;
  moe_config cfg = c;
  for (size_t size : {sizeof(moe_comm), offsetof(moe_comm, last_error)}) {
    moe_comm m = reason_comm(&state);
    m.struct_size = size;
    cfg.comm = &m;
    moe_layer *out = nullptr;
    EXPECT_EQ(moe_layer_create(&cfg, &out), MOE_OK) << size << ": " << moe_last_error();
    moe_layer_destroy(out);
  }
  for (size_t size : {offsetof(moe_comm, last_error) - 1, offsetof(moe_comm, last_error) + 1,
                      offsetof(moe_comm, exchange_rows), sizeof(moe_comm) + 8}) {
    moe_comm m = reason_comm(&state);
    m.struct_size = size;
    cfg.comm = &m;
    moe_layer *out = sentinel_ptr<moe_layer>();
    EXPECT_EQ(moe_layer_create(&cfg, &out), MOE_ERR_INVALID_ARGUMENT) << size;
    EXPECT_TRUE(names(moe_last_error(), "struct_size")) << moe_last_error();
    EXPECT_EQ(out, sentinel_ptr<moe_layer>());
  }
}

TEST_F(BadInput, CudaDeviceWithoutTheModule) {
  const std::filesystem::path module = std::filesystem::path(MOE_TEST_LIBDIR) / "libmoe_cuda.so.0";
  if (std::filesystem::exists(module))
    GTEST_SKIP() << module << " is built: this test covers a build without the CUDA module";
  moe_config c = small_config();
  c.device = MOE_DEVICE_CUDA;
  moe_layer *out = sentinel_ptr<moe_layer>();
  BAD(moe_layer_create(&c, &out), MOE_ERR_UNSUPPORTED, "device");
  EXPECT_NE(std::string(moe_last_error()).find("libmoe_cuda"), std::string::npos)
      << "the message should say the libmoe_cuda module is missing: " << moe_last_error();
  EXPECT_EQ(out, sentinel_ptr<moe_layer>());
}

// The module is built but the machine has no usable GPU: MOE_ERR_DEVICE, with the CUDA runtime's
// reason in the message, and nothing returned. On a GPU machine tests/gpu covers the layer.
TEST_F(BadInput, CudaDeviceWithoutAGpu) {
  const std::filesystem::path module = std::filesystem::path(MOE_TEST_LIBDIR) / "libmoe_cuda.so.0";
  if (!std::filesystem::exists(module)) GTEST_SKIP() << module << " is not built";
  moe_config c = small_config();
  c.device = MOE_DEVICE_CUDA;
  moe_layer *out = sentinel_ptr<moe_layer>();
  const moe_status s = moe_layer_create(&c, &out);
  if (s == MOE_OK) {
    moe_layer_destroy(out);
    GTEST_SKIP() << "a CUDA device is usable here: tests/gpu covers CUDA layers";
  }
  EXPECT_EQ(s, MOE_ERR_DEVICE) << moe_last_error();
  EXPECT_NE(std::string(moe_last_error()).find("CUDA device"), std::string::npos)
      << "the message should say why no CUDA device is usable: " << moe_last_error();
  EXPECT_EQ(out, sentinel_ptr<moe_layer>());
  // An index past the devices is refused the same way, whatever the machine.
  c.device_index = 1 << 20;
  EXPECT_EQ(moe_layer_create(&c, &out), MOE_ERR_DEVICE);
  EXPECT_NE(std::string(moe_last_error()).find("device"), std::string::npos) << moe_last_error();
  EXPECT_EQ(out, sentinel_ptr<moe_layer>());
}

// Features of the design a build may not have yet: refused with MOE_ERR_UNSUPPORTED and a message
// naming the field, never silently ignored; when accepted, the layer must train.
TEST_F(BadInput, UnbuiltFeaturesAreUnsupportedOrWork) {
  static moe_comm comm = one_rank_comm();
  const std::vector<std::pair<const char *, std::function<void(moe_config &)>>> cases = {
      {"noise", [](moe_config &c) { c.noise = MOE_NOISE_GAUSSIAN; }},
      {"noise", [](moe_config &c) { c.noise = MOE_NOISE_JITTER; }},
      {"load_loss_coef",
       [](moe_config &c) {
         c.noise = MOE_NOISE_GAUSSIAN;
         c.load_loss_coef = 0.01f;
       }},
      {"routing",
       [](moe_config &c) {
         c.routing = MOE_ROUTE_EXPERT_CHOICE;
         c.capacity_factor = 1.0f;
       }},
      {"dtype", [](moe_config &c) { c.dtype = MOE_DTYPE_BF16; }},
      {"dtype", [](moe_config &c) { c.dtype = MOE_DTYPE_F16; }},
      {"comm", [](moe_config &c) { c.comm = &comm; }},
  };
  for (const auto &cse : cases) {
    moe_config c = small_config();
    cse.second(c);
    moe_layer *out = sentinel_ptr<moe_layer>();
    SCOPED_TRACE(cse.first);
    mark_last_error();
    const moe_status s = moe_layer_create(&c, &out);
    ASSERT_TRUE(s == MOE_OK || s == MOE_ERR_UNSUPPORTED) << sname(s) << ": " << moe_last_error();
    if (s == MOE_ERR_UNSUPPORTED) {
      const std::string msg = moe_last_error();
      EXPECT_TRUE(names(msg, cse.first) || (std::string(cse.first) == "load_loss_coef" && names(msg, "noise")))
          << "message does not name " << cse.first << ": " << msg;
      EXPECT_EQ(out, sentinel_ptr<moe_layer>());
      continue;
    }
    if (c.dtype != MOE_DTYPE_F32) {
      moe_layer_destroy(out);  // bf16/f16 activations: this test feeds float32
      continue;
    }
    const int64_t T = 12;
    std::vector<float> x = inputs(T * d, 6), y(T * d, kNaN), dx(T * d, kNaN);
    moe_context *ctx = nullptr;
    ASSERT_EQ(moe_context_create(out, &ctx), MOE_OK);
    EXPECT_EQ(moe_forward(out, x.data(), T, y.data(), ctx), MOE_OK) << moe_last_error();
    EXPECT_EQ(moe_backward(out, ctx, x.data(), dx.data()), MOE_OK) << moe_last_error();
    for (float v : y) EXPECT_TRUE(std::isfinite(v));
    for (float v : dx) EXPECT_TRUE(std::isfinite(v));
    if (c.routing == MOE_ROUTE_EXPERT_CHOICE) {
      std::vector<int32_t> ids(T * c.top_k, 77);
      EXPECT_EQ(sname(moe_context_topk(ctx, ids.data(), nullptr)), "MOE_ERR_UNSUPPORTED");
      EXPECT_EQ(ids, std::vector<int32_t>(T * c.top_k, 77));
      int64_t count = -1;
      EXPECT_EQ(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count), MOE_OK);
      EXPECT_GE(count, 0);
    }
    moe_context_destroy(ctx);
    moe_layer_destroy(out);
  }
  expect_layer_unchanged("unbuilt features");
}

// ---- layer accessors ----------------------------------------------------------------------------

TEST_F(BadInput, GetConfig) {
  moe_config out;
  std::memset(&out, 0x3c, sizeof out);
  out.struct_size = sizeof out;
  const moe_config before = out;
  BAD(moe_layer_get_config(nullptr, &out), MOE_ERR_INVALID_ARGUMENT, "layer");
  EXPECT_EQ(std::memcmp(&out, &before, sizeof out), 0);
  BAD(moe_layer_get_config(layer, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
  out.struct_size = 0;
  moe_config before0 = out;
  BAD(moe_layer_get_config(layer, &out), MOE_ERR_INVALID_ARGUMENT, "struct_size");
  EXPECT_EQ(std::memcmp(&out, &before0, sizeof out), 0);
  // Success: the effective configuration; a shorter (older) struct gets only its prefix.
  out = before;
  ASSERT_EQ(moe_layer_get_config(layer, &out), MOE_OK);
  EXPECT_EQ(out.struct_size, sizeof(moe_config));
  EXPECT_EQ(out.d_model, cfg.d_model);
  EXPECT_EQ(out.num_experts, cfg.num_experts);
  EXPECT_EQ(out.seed, cfg.seed);
  moe_config part;
  std::memset(&part, 0x3c, sizeof part);
  part.struct_size = offsetof(moe_config, activation);
  ASSERT_EQ(moe_layer_get_config(layer, &part), MOE_OK);
  EXPECT_EQ(part.top_k, cfg.top_k);
  EXPECT_EQ(part.struct_size, offsetof(moe_config, activation));
  const unsigned char *tail = reinterpret_cast<const unsigned char *>(&part) + offsetof(moe_config, activation);
  for (size_t i = 0; i < sizeof part - offsetof(moe_config, activation); ++i)
    ASSERT_EQ(tail[i], 0x3c) << "byte " << i << " past struct_size was written";
}

TEST_F(BadInput, SetStream) {
  BAD(moe_layer_set_stream(nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT, "layer");
  int fake_stream = 0;
  mark_last_error();
  const moe_status s = moe_layer_set_stream(layer, &fake_stream);
  EXPECT_EQ(sname(s), "MOE_ERR_INVALID_ARGUMENT");
  const std::string msg = moe_last_error();
  EXPECT_TRUE(names(msg, "cuda_stream") || names(msg, "stream")) << msg;
  expect_layer_unchanged("set_stream on a CPU layer");
  EXPECT_EQ(moe_layer_set_stream(layer, nullptr), MOE_OK) << moe_last_error();
}

TEST_F(BadInput, NumParams) {
  mark_last_error();
  EXPECT_EQ(moe_layer_num_params(nullptr), -1);
  const std::string msg = moe_last_error();
  EXPECT_EQ(msg.find(kMarker), std::string::npos) << msg;
  EXPECT_TRUE(names(msg, "layer")) << msg;
  // router.weight, router.bias, experts.w1, experts.w3, experts.w2 (SwiGLU, no shared experts).
  EXPECT_EQ(moe_layer_num_params(layer), 5);
}

TEST_F(BadInput, ParamInfo) {
  moe_param_info info;
  std::memset(&info, 0x42, sizeof info);
  const moe_param_info before = info;
  const int n = moe_layer_num_params(layer);
  BAD(moe_layer_param_info(nullptr, 0, &info), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_layer_param_info(layer, 0, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
  BAD(moe_layer_param_info(layer, -1, &info), MOE_ERR_INVALID_ARGUMENT, "index", "-1");
  BAD(moe_layer_param_info(layer, n, &info), MOE_ERR_INVALID_ARGUMENT, "index", std::to_string(n));
  BAD(moe_layer_param_info(layer, INT_MAX, &info), MOE_ERR_INVALID_ARGUMENT, "index");
  BAD(moe_layer_param_info(layer, INT_MIN, &info), MOE_ERR_INVALID_ARGUMENT, "index");
  EXPECT_EQ(std::memcmp(&info, &before, sizeof info), 0) << "out changed on failure";
}

TEST_F(BadInput, SetParam) {
  const int64_t n = cfg.num_experts * d;  // router.weight
  std::vector<float> host = inputs(n + 1, 9);
  BAD(moe_layer_set_param(nullptr, "router.weight", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_layer_set_param(layer, nullptr, host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_layer_set_param(layer, "router.weight", nullptr, n), MOE_ERR_INVALID_ARGUMENT, "host");
  BAD(moe_layer_set_param(layer, "router.weights", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name",
      "router.weights");
  BAD(moe_layer_set_param(layer, "", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_layer_set_param(layer, "router.noise_weight", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_layer_set_param(layer, "shared.w1", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_layer_set_param(layer, "router.weight", host.data(), n - 1), MOE_ERR_INVALID_ARGUMENT, "count",
      std::to_string(n - 1));
  BAD(moe_layer_set_param(layer, "router.weight", host.data(), n + 1), MOE_ERR_INVALID_ARGUMENT, "count");
  BAD(moe_layer_set_param(layer, "router.weight", host.data(), 0), MOE_ERR_INVALID_ARGUMENT, "count");
  BAD(moe_layer_set_param(layer, "router.weight", host.data(), -1), MOE_ERR_INVALID_ARGUMENT, "count");
  BAD(moe_layer_set_param(layer, "router.bias", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "count");
}

TEST_F(BadInput, GetParamAndGrad) {
  const int64_t n = cfg.num_experts * d;
  std::vector<float> host(n + 1, 123.0f);
  const std::vector<float> before = host;
  for (auto fn : {moe_layer_get_param, moe_layer_get_grad}) {
    BAD(fn(nullptr, "router.weight", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "layer");
    BAD(fn(layer, nullptr, host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name");
    BAD(fn(layer, "router.weight", nullptr, n), MOE_ERR_INVALID_ARGUMENT, "host");
    BAD(fn(layer, "nope", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "name", "nope");
    BAD(fn(layer, "router.weight", host.data(), n - 1), MOE_ERR_INVALID_ARGUMENT, "count");
    BAD(fn(layer, "router.weight", host.data(), n + 1), MOE_ERR_INVALID_ARGUMENT, "count");
    BAD(fn(layer, "router.weight", host.data(), -3), MOE_ERR_INVALID_ARGUMENT, "count", "-3");
    BAD(fn(layer, "experts.w1", host.data(), n), MOE_ERR_INVALID_ARGUMENT, "count");
    EXPECT_EQ(host, before) << "host written on failure";
  }
  // router.bias is not trainable: it has no gradient.
  BAD(moe_layer_get_grad(layer, "router.bias", host.data(), cfg.num_experts), MOE_ERR_INVALID_ARGUMENT,
      "router.bias");
  EXPECT_EQ(host, before);
  ASSERT_EQ(moe_layer_get_param(layer, "router.bias", host.data(), cfg.num_experts), MOE_OK);
}

TEST_F(BadInput, ZeroGradAndParamBuffers) {
  BAD(moe_layer_zero_grad(nullptr), MOE_ERR_INVALID_ARGUMENT, "layer");
  void *data = sentinel_ptr<void>(), *grad = sentinel_ptr<void>();
  BAD(moe_layer_param_buffers(nullptr, "router.weight", &data, &grad), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_layer_param_buffers(layer, nullptr, &data, &grad), MOE_ERR_INVALID_ARGUMENT, "name");
  BAD(moe_layer_param_buffers(layer, "experts.w4", &data, &grad), MOE_ERR_INVALID_ARGUMENT, "name", "experts.w4");
  EXPECT_EQ(data, sentinel_ptr<void>());
  EXPECT_EQ(grad, sentinel_ptr<void>());
  // Either out pointer may be NULL; router.bias has no gradient buffer.
  EXPECT_EQ(moe_layer_param_buffers(layer, "router.weight", nullptr, nullptr), MOE_OK);
  ASSERT_EQ(moe_layer_param_buffers(layer, "router.bias", &data, &grad), MOE_OK);
  EXPECT_NE(data, nullptr);
  EXPECT_EQ(grad, nullptr);
}

TEST(CheckFinite, SetParamRefusesNaN) {
  moe_config c = small_config();
  c.check_finite = 1;
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK);
  const int64_t n = c.num_experts * c.d_model;
  std::vector<float> before(n), host = inputs(n, 10), after(n);
  ASSERT_EQ(moe_layer_get_param(l, "router.weight", before.data(), n), MOE_OK);
  host[7] = kNaN;
  mark_last_error();
  EXPECT_EQ(sname(moe_layer_set_param(l, "router.weight", host.data(), n)), "MOE_ERR_NONFINITE");
  const std::string msg = moe_last_error();
  EXPECT_NE(msg.find("7"), std::string::npos) << "message should give the index: " << msg;
  EXPECT_TRUE(names(msg, "host") || names(msg, "router.weight")) << msg;
  ASSERT_EQ(moe_layer_get_param(l, "router.weight", after.data(), n), MOE_OK);
  EXPECT_EQ(before, after) << "parameter changed by a refused set_param";
  host[7] = kInf;
  EXPECT_EQ(sname(moe_layer_set_param(l, "router.weight", host.data(), n)), "MOE_ERR_NONFINITE");
  moe_layer_destroy(l);
}

// ---- contexts, forward, backward, route -------------------------------------------------------

TEST_F(BadInput, ContextCreate) {
  moe_context *out = sentinel_ptr<moe_context>();
  BAD(moe_context_create(nullptr, &out), MOE_ERR_INVALID_ARGUMENT, "layer");
  EXPECT_EQ(out, sentinel_ptr<moe_context>());
  BAD(moe_context_create(layer, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
}

TEST_F(BadInput, Forward) {
  std::vector<float> y(T * d, 55.0f);
  const std::vector<float> y_before = y;
  BAD(moe_forward(nullptr, x.data(), T, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_forward(layer, nullptr, T, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "x");
  BAD(moe_forward(layer, x.data(), T, nullptr, nullptr), MOE_ERR_INVALID_ARGUMENT, "y");
  BAD(moe_forward(layer, x.data(), -1, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "num_tokens", "-1");
  BAD(moe_forward(layer, x.data(), INT64_MIN, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  // num_tokens * d_model overflows int64.
  BAD(moe_forward(layer, x.data(), INT64_MAX / 4, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  // x and y overlap.
  BAD(moe_forward(layer, y.data(), T, y.data(), nullptr), MOE_ERR_INVALID_ARGUMENT, "x", "y");
  std::vector<float> buf(2 * T * d, 1.0f);
  BAD(moe_forward(layer, buf.data(), T, buf.data() + d, nullptr), MOE_ERR_INVALID_ARGUMENT, "x", "y");
  EXPECT_EQ(buf, std::vector<float>(2 * T * d, 1.0f)) << "overlapping buffers written";
  EXPECT_EQ(y, y_before) << "y written on failure";
  // num_tokens 0: x and y may be NULL.
  EXPECT_EQ(moe_forward(layer, nullptr, 0, nullptr, nullptr), MOE_OK) << moe_last_error();
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  EXPECT_EQ(moe_forward(layer, nullptr, 0, nullptr, ctx), MOE_OK) << moe_last_error();
  moe_context_destroy(ctx);
}

// Too many tokens (num_tokens * top_k past what the routing indices hold, while num_tokens *
// d_model still fits int64): refused before x or y is touched, and the message must name
// num_tokens, the offending argument (not blame x and y for "overlapping" over that size).
TEST_F(BadInput, ForwardTooManyTokensNamesNumTokens) {
  std::vector<float> y(T * d, 55.0f);
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  for (moe_context *c : {static_cast<moe_context *>(nullptr), ctx})
    BAD(moe_forward(layer, x.data(), int64_t{1} << 40, y.data(), c), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  EXPECT_EQ(y, std::vector<float>(T * d, 55.0f));
  moe_context_destroy(ctx);
}

TEST_F(BadInput, ContextOfAnotherLayer) {
  moe_config c2 = small_config();
  c2.seed = 99;
  moe_layer *other = nullptr;
  ASSERT_EQ(moe_layer_create(&c2, &other), MOE_OK);
  moe_context *octx = nullptr;
  ASSERT_EQ(moe_context_create(other, &octx), MOE_OK);
  std::vector<float> y(T * d, 55.0f), dx(T * d, 66.0f);
  ASSERT_EQ(moe_forward(other, x.data(), T, y.data(), octx), MOE_OK);  // a trained context of `other`
  std::fill(y.begin(), y.end(), 55.0f);
  BAD(moe_forward(layer, x.data(), T, y.data(), octx), MOE_ERR_INVALID_ARGUMENT, "ctx");
  EXPECT_EQ(y, std::vector<float>(T * d, 55.0f));
  BAD(moe_backward(layer, octx, dy.data(), dx.data()), MOE_ERR_INVALID_ARGUMENT, "ctx");
  EXPECT_EQ(dx, std::vector<float>(T * d, 66.0f));
  BAD(moe_route(layer, x.data(), T, octx), MOE_ERR_INVALID_ARGUMENT, "ctx");
  // The context is still the trained context of `other`.
  EXPECT_EQ(moe_backward(other, octx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
  moe_context_destroy(octx);
  moe_layer_destroy(other);
}

TEST_F(BadInput, Backward) {
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  std::vector<float> dx(T * d, 66.0f);
  const std::vector<float> dx_before = dx;
  BAD(moe_backward(nullptr, ctx, dy.data(), dx.data()), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_backward(layer, nullptr, dy.data(), dx.data()), MOE_ERR_INVALID_ARGUMENT, "ctx");
  // A new context holds no training forward.
  BAD(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_ERR_STATE, "ctx");
  // Nor does a context filled by moe_route.
  ASSERT_EQ(moe_route(layer, x.data(), T, ctx), MOE_OK);
  BAD(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_ERR_STATE, "ctx");
  EXPECT_EQ(dx, dx_before);

  // A trained context: bad dy / dx.
  std::vector<float> y(T * d);
  ASSERT_EQ(moe_forward(layer, x.data(), T, y.data(), ctx), MOE_OK);
  ASSERT_EQ(moe_layer_zero_grad(layer), MOE_OK);
  const auto grads_of = [&] {
    std::vector<std::vector<float>> g;
    for (const char *n : {"router.weight", "experts.w1", "experts.w3", "experts.w2"})
      g.push_back(moe_test::get_grad(layer, n));
    return g;
  };
  const auto zero_grads = grads_of();
  BAD(moe_backward(layer, ctx, nullptr, dx.data()), MOE_ERR_INVALID_ARGUMENT, "dy");
  BAD(moe_backward(layer, ctx, dx.data(), dx.data()), MOE_ERR_INVALID_ARGUMENT, "dy", "dx");
  std::vector<float> buf(2 * T * d, 0.5f);
  BAD(moe_backward(layer, ctx, buf.data() + 3, buf.data()), MOE_ERR_INVALID_ARGUMENT, "dy", "dx");
  EXPECT_EQ(dx, dx_before) << "dx written on failure";
  EXPECT_TRUE(grads_of() == zero_grads) << "gradients changed by a refused backward";
  // The context still holds its training forward.
  EXPECT_EQ(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
  moe_context_destroy(ctx);
}

TEST_F(BadInput, Route) {
  moe_context *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  BAD(moe_route(nullptr, x.data(), T, ctx), MOE_ERR_INVALID_ARGUMENT, "layer");
  BAD(moe_route(layer, x.data(), T, nullptr), MOE_ERR_INVALID_ARGUMENT, "ctx");
  BAD(moe_route(layer, nullptr, T, ctx), MOE_ERR_INVALID_ARGUMENT, "x");
  BAD(moe_route(layer, x.data(), -7, ctx), MOE_ERR_INVALID_ARGUMENT, "num_tokens", "-7");
  BAD(moe_route(layer, x.data(), INT64_MAX, ctx), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  BAD(moe_route(layer, x.data(), int64_t{1} << 40, ctx), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  // The context is still empty.
  moe_stats st{};
  st.struct_size = sizeof st;
  EXPECT_EQ(sname(moe_context_stats(ctx, &st)), "MOE_ERR_STATE");
  // A routed context keeps its routing through a failed route.
  ASSERT_EQ(moe_route(layer, x.data(), T, ctx), MOE_OK);
  BAD(moe_route(layer, x.data(), -1, ctx), MOE_ERR_INVALID_ARGUMENT, "num_tokens");
  ASSERT_EQ(moe_context_stats(ctx, &st), MOE_OK) << moe_last_error();
  EXPECT_EQ(st.num_tokens, T);
  moe_context_destroy(ctx);
}

class CheckFiniteLayer : public ::testing::Test {
 protected:
  static constexpr int64_t T = 6;
  void SetUp() override {
    moe_config c = small_config();
    c.check_finite = 1;
    ASSERT_EQ(moe_layer_create(&c, &layer), MOE_OK);
    d = c.d_model;
    x = inputs(T * d, 11);
    dy = inputs(T * d, 12);
    ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  }
  void TearDown() override {
    moe_context_destroy(ctx);
    moe_layer_destroy(layer);
  }
  moe_layer *layer = nullptr;
  moe_context *ctx = nullptr;
  int64_t d = 0;
  std::vector<float> x, dy;
};

TEST_F(CheckFiniteLayer, NaNInXIsRefusedWithItsIndex) {
  std::vector<float> y_ref(T * d), y(T * d, 55.0f);
  ASSERT_EQ(moe_forward(layer, x.data(), T, y_ref.data(), nullptr), MOE_OK);
  std::vector<float> bad_x = x;
  bad_x[3 * d + 5] = kNaN;  // token 3, column 5
  for (moe_context *c : {static_cast<moe_context *>(nullptr), ctx}) {
    mark_last_error();
    EXPECT_EQ(sname(moe_forward(layer, bad_x.data(), T, y.data(), c)), "MOE_ERR_NONFINITE");
    const std::string msg = moe_last_error();
    EXPECT_TRUE(names(msg, "x")) << msg;
    EXPECT_TRUE(msg.find("3") != std::string::npos && msg.find("5") != std::string::npos)
        << "message should give the index (token 3, column 5, or flat 29): " << msg;
    EXPECT_EQ(y, std::vector<float>(T * d, 55.0f)) << "y written on failure";
  }
  bad_x[3 * d + 5] = -kInf;
  mark_last_error();
  EXPECT_EQ(sname(moe_route(layer, bad_x.data(), T, ctx)), "MOE_ERR_NONFINITE");
  EXPECT_TRUE(names(moe_last_error(), "x")) << moe_last_error();
  // The context is still empty, and the layer computes the same.
  moe_stats st{};
  st.struct_size = sizeof st;
  EXPECT_EQ(sname(moe_context_stats(ctx, &st)), "MOE_ERR_STATE");
  ASSERT_EQ(moe_forward(layer, x.data(), T, y.data(), nullptr), MOE_OK);
  EXPECT_EQ(std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)), 0);
}

TEST_F(CheckFiniteLayer, NaNInDyIsRefusedAndTheContextSurvives) {
  std::vector<float> y(T * d), dx_ref(T * d), dx(T * d, 66.0f);
  ASSERT_EQ(moe_forward(layer, x.data(), T, y.data(), ctx), MOE_OK);
  ASSERT_EQ(moe_layer_zero_grad(layer), MOE_OK);
  std::vector<float> bad_dy = dy;
  bad_dy[4 * d + 2] = kInf;  // token 4, column 2
  mark_last_error();
  EXPECT_EQ(sname(moe_backward(layer, ctx, bad_dy.data(), dx.data())), "MOE_ERR_NONFINITE");
  const std::string msg = moe_last_error();
  EXPECT_TRUE(names(msg, "dy")) << msg;
  EXPECT_TRUE(msg.find("4") != std::string::npos && msg.find("2") != std::string::npos)
      << "message should give the index (token 4, column 2, or flat 34): " << msg;
  EXPECT_EQ(dx, std::vector<float>(T * d, 66.0f)) << "dx written on failure";
  std::vector<float> g(4 * d);
  ASSERT_EQ(moe_layer_get_grad(layer, "router.weight", g.data(), 4 * d), MOE_OK);
  EXPECT_EQ(g, std::vector<float>(4 * d, 0.0f)) << "gradients accumulated by a refused backward";
  // A failed training forward leaves the previous training forward in place.
  std::vector<float> bad_x = x;
  bad_x[0] = kNaN;
  EXPECT_EQ(sname(moe_forward(layer, bad_x.data(), T, y.data(), ctx)), "MOE_ERR_NONFINITE");
  EXPECT_EQ(moe_backward(layer, ctx, dy.data(), dx.data()), MOE_OK) << moe_last_error();
  for (float v : dx) EXPECT_TRUE(std::isfinite(v));
}

// ---- context accessors --------------------------------------------------------------------------

TEST_F(BadInput, ContextAccessors) {
  moe_context *empty = nullptr, *ctx = nullptr;
  ASSERT_EQ(moe_context_create(layer, &empty), MOE_OK);
  ASSERT_EQ(moe_context_create(layer, &ctx), MOE_OK);
  std::vector<float> y(T * d);
  ASSERT_EQ(moe_forward(layer, x.data(), T, y.data(), ctx), MOE_OK);
  const int64_t E = cfg.num_experts, k = cfg.top_k;

  // stats
  moe_stats st;
  std::memset(&st, 0x21, sizeof st);
  st.struct_size = sizeof st;
  const moe_stats st_before = st;
  BAD(moe_context_stats(nullptr, &st), MOE_ERR_INVALID_ARGUMENT, "ctx");
  BAD(moe_context_stats(ctx, nullptr), MOE_ERR_INVALID_ARGUMENT, "out");
  BAD(moe_context_stats(empty, &st), MOE_ERR_STATE, "ctx");
  EXPECT_EQ(std::memcmp(&st, &st_before, sizeof st), 0) << "stats written on failure";
  st.struct_size = 0;
  const moe_stats st0 = st;
  BAD(moe_context_stats(ctx, &st), MOE_ERR_INVALID_ARGUMENT, "struct_size");
  EXPECT_EQ(std::memcmp(&st, &st0, sizeof st), 0);

  // expert counts
  std::vector<int64_t> counts(E, -9);
  BAD(moe_context_expert_counts(nullptr, counts.data()), MOE_ERR_INVALID_ARGUMENT, "ctx");
  BAD(moe_context_expert_counts(ctx, nullptr), MOE_ERR_INVALID_ARGUMENT, "counts");
  BAD(moe_context_expert_counts(empty, counts.data()), MOE_ERR_STATE, "ctx");
  EXPECT_EQ(counts, std::vector<int64_t>(E, -9));

  // top-k
  std::vector<int32_t> ids(T * k, -9);
  std::vector<float> w(T * k, -9.0f);
  BAD(moe_context_topk(nullptr, ids.data(), w.data()), MOE_ERR_INVALID_ARGUMENT, "ctx");
  BAD(moe_context_topk(empty, ids.data(), w.data()), MOE_ERR_STATE, "ctx");
  EXPECT_EQ(ids, std::vector<int32_t>(T * k, -9));
  EXPECT_EQ(w, std::vector<float>(T * k, -9.0f));

  // assignments
  int64_t count = -9;
  ASSERT_EQ(moe_context_assignments(ctx, 0, nullptr, nullptr, nullptr, &count), MOE_OK);
  const int64_t R = count;
  ASSERT_EQ(R, T * k);  // dropless
  std::vector<int32_t> tok(R, -9), ex(R, -9);
  std::vector<float> wt(R, -9.0f);
  count = -9;
  BAD(moe_context_assignments(nullptr, R, tok.data(), ex.data(), wt.data(), &count), MOE_ERR_INVALID_ARGUMENT, "ctx");
  BAD(moe_context_assignments(ctx, R, tok.data(), ex.data(), wt.data(), nullptr), MOE_ERR_INVALID_ARGUMENT,
      "count");
  BAD(moe_context_assignments(ctx, -1, tok.data(), ex.data(), wt.data(), &count), MOE_ERR_INVALID_ARGUMENT,
      "capacity", "-1");
  BAD(moe_context_assignments(ctx, R - 1, tok.data(), ex.data(), wt.data(), &count), MOE_ERR_INVALID_ARGUMENT,
      "capacity", std::to_string(R));
  BAD(moe_context_assignments(ctx, 0, tok.data(), nullptr, nullptr, &count), MOE_ERR_INVALID_ARGUMENT, "capacity");
  BAD(moe_context_assignments(empty, R, tok.data(), ex.data(), wt.data(), &count), MOE_ERR_STATE, "ctx");
  BAD(moe_context_assignments(empty, 0, nullptr, nullptr, nullptr, &count), MOE_ERR_STATE, "ctx");
  EXPECT_EQ(count, -9) << "count written on failure";
  EXPECT_EQ(tok, std::vector<int32_t>(R, -9));
  EXPECT_EQ(ex, std::vector<int32_t>(R, -9));
  EXPECT_EQ(wt, std::vector<float>(R, -9.0f));
  // And the good calls work.
  EXPECT_EQ(moe_context_assignments(ctx, R, tok.data(), ex.data(), wt.data(), &count), MOE_OK);
  EXPECT_EQ(count, R);
  EXPECT_EQ(moe_context_assignments(ctx, R + 10, tok.data(), nullptr, nullptr, &count), MOE_OK);
  EXPECT_EQ(moe_context_topk(ctx, nullptr, nullptr), MOE_OK);
  EXPECT_EQ(moe_context_expert_counts(ctx, counts.data()), MOE_OK);
  moe_context_destroy(empty);
  moe_context_destroy(ctx);
}

}  // namespace
