// The first field added to moe_config after 0.1 (min_capacity), through the table only: what it
// does to the capacity of both routings, its check, and programs built against the 0.1 header
// (a struct of MOE_CONFIG_SIZE_0_1 bytes) that keep working and get its default.
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int64_t kD = 8, kFF = 16, kE = 4, kT = 32;

moe_config base(moe_routing routing, float capacity_factor, int64_t min_capacity) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = kD;
  c.d_ff = kFF;
  c.num_experts = kE;
  c.top_k = 1;
  c.routing = routing;
  c.normalize_topk = 0;
  c.capacity_factor = capacity_factor;
  c.min_capacity = min_capacity;
  c.seed = 5;
  return c;
}

struct Routed {
  std::vector<int64_t> counts = std::vector<int64_t>(kE);
  moe_stats stats{};
};

// Routes x through a layer of cfg whose router weights are router (so that every layer of a test
// makes the same choices).
Routed route(const moe_config &cfg, const std::vector<float> &router, const std::vector<float> &x) {
  Routed r;
  moe_layer *l = nullptr;
  moe_context *ctx = nullptr;
  EXPECT_EQ(moe_layer_create(&cfg, &l), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_layer_set_param(l, "router.weight", router.data(), static_cast<int64_t>(router.size())), MOE_OK);
  EXPECT_EQ(moe_context_create(l, &ctx), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_route(l, x.data(), kT, ctx), MOE_OK) << moe_last_error();
  EXPECT_EQ(moe_context_expert_counts(ctx, r.counts.data()), MOE_OK) << moe_last_error();
  r.stats.struct_size = sizeof r.stats;
  EXPECT_EQ(moe_context_stats(ctx, &r.stats), MOE_OK) << moe_last_error();
  moe_context_destroy(ctx);
  moe_layer_destroy(l);
  return r;
}

std::vector<float> normal(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float &f : v) f = dist(rng);
  return v;
}

TEST(MinCapacity, TokenChoiceKeepsAtLeastThatManySlotsPerExpert) {
  const std::vector<float> x = normal(kT * kD, 1), router = normal(kE * kD, 2);
  // Dropless: n_e, every token's choice before capacity.
  const Routed all = route(base(MOE_ROUTE_TOKEN_CHOICE, 0.0f, 0), router, x);
  ASSERT_EQ(all.stats.dropped_slots, 0);
  // capacity_factor 0.25: C = ceil(0.25 * 32 / 4) = 2, raised to min_capacity, at most T*k = 32.
  for (int64_t min_capacity : {0, 1, 2, 5, 9, 1000}) {
    SCOPED_TRACE(min_capacity);
    const int64_t C = std::min<int64_t>(std::max<int64_t>(2, min_capacity), kT);
    const Routed got = route(base(MOE_ROUTE_TOKEN_CHOICE, 0.25f, min_capacity), router, x);
    int64_t dropped = 0;
    for (int e = 0; e < kE; ++e) {
      EXPECT_EQ(got.counts[e], std::min(all.counts[e], C)) << "expert " << e;
      dropped += all.counts[e] - std::min(all.counts[e], C);
    }
    EXPECT_EQ(got.stats.dropped_slots, dropped);
  }
  // Without a capacity factor min_capacity changes nothing (dropless stays dropless).
  EXPECT_EQ(route(base(MOE_ROUTE_TOKEN_CHOICE, 0.0f, 3), router, x).counts, all.counts);
}

TEST(MinCapacity, ExpertChoiceTakesAtLeastThatManyTokensPerExpert) {
  const std::vector<float> x = normal(kT * kD, 3), router = normal(kE * kD, 4);
  // C = ceil(0.25 * 32 * 1 / 4) = 2, raised to min_capacity, each expert taking at most T tokens.
  for (int64_t min_capacity : {0, 5, 31, 100}) {
    SCOPED_TRACE(min_capacity);
    const int64_t C = std::min<int64_t>(std::max<int64_t>(2, min_capacity), kT);
    const Routed got = route(base(MOE_ROUTE_EXPERT_CHOICE, 0.25f, min_capacity), router, x);
    EXPECT_EQ(got.stats.num_slots, kE * C);
    for (int e = 0; e < kE; ++e) EXPECT_EQ(got.counts[e], C) << "expert " << e;
  }
}

TEST(MinCapacity, IsCheckedAndSetByName) {
  moe_config c = base(MOE_ROUTE_TOKEN_CHOICE, 1.0f, 0);
  EXPECT_EQ(c.min_capacity, 0);
  ASSERT_EQ(moe_config_set(&c, "min_capacity", "-1"), MOE_OK);  // the form is fine; the range is create's
  EXPECT_EQ(c.min_capacity, -1);
  moe_layer *l = nullptr;
  EXPECT_EQ(moe_layer_create(&c, &l), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("cfg->min_capacity is -1, must be >= 0"), std::string::npos)
      << moe_last_error();
  EXPECT_EQ(l, nullptr);
  ASSERT_EQ(moe_config_set(&c, "min_capacity", "4"), MOE_OK);
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
  moe_config got;
  got.struct_size = sizeof got;
  ASSERT_EQ(moe_layer_get_config(l, &got), MOE_OK);
  EXPECT_EQ(got.min_capacity, 4);
  moe_layer_destroy(l);
}

// A program built against the 0.1 header: its struct ends where min_capacity begins, and it calls
// the functions moe_config_init and moe_config_preset, not the macros.
constexpr size_t kOld = MOE_CONFIG_SIZE_0_1;
constexpr unsigned char kGuard = 0xAB;

struct OldStruct {
  std::vector<unsigned char> bytes = std::vector<unsigned char>(kOld + 32, kGuard);
  moe_config *cfg() { return reinterpret_cast<moe_config *>(bytes.data()); }
  bool tail_untouched() const {
    return std::all_of(bytes.begin() + kOld, bytes.end(), [](unsigned char b) { return b == kGuard; });
  }
};

TEST(OlderHeader, InitAndPresetWriteOnlyTheOldStruct) {
  static_assert(kOld == offsetof(moe_config, comm) + sizeof(const moe_comm *), "0.1's moe_config ended with comm");
  OldStruct old;
  (moe_config_init)(old.cfg());
  EXPECT_EQ(old.cfg()->struct_size, kOld);
  EXPECT_EQ(old.cfg()->num_experts, 8);
  EXPECT_TRUE(old.tail_untouched());
  ASSERT_EQ((moe_config_preset)(old.cfg(), "switch"), MOE_OK) << moe_last_error();
  EXPECT_EQ(old.cfg()->struct_size, kOld);
  EXPECT_EQ(old.cfg()->top_k, 1);
  EXPECT_TRUE(old.tail_untouched());
  // What it cannot hold, it cannot set by name either.
  EXPECT_EQ(moe_config_set(old.cfg(), "min_capacity", "3"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("past cfg->struct_size"), std::string::npos) << moe_last_error();
  EXPECT_TRUE(old.tail_untouched());
}

TEST(OlderHeader, AnOldStructMakesALayerWithTheNewFieldsDefaults) {
  OldStruct old;
  (moe_config_init)(old.cfg());
  old.cfg()->d_model = kD;
  old.cfg()->d_ff = kFF;
  old.cfg()->capacity_factor = 0.25f;
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(old.cfg(), &l), MOE_OK) << moe_last_error();
  moe_config got;
  std::memset(&got, 0x5A, sizeof got);
  got.struct_size = sizeof got;
  ASSERT_EQ(moe_layer_get_config(l, &got), MOE_OK);
  EXPECT_EQ(got.min_capacity, 0);
  EXPECT_EQ(got.capacity_factor, 0.25f);
  // get_config writes back no more than the old struct holds.
  OldStruct back;
  back.cfg()->struct_size = kOld;
  ASSERT_EQ(moe_layer_get_config(l, back.cfg()), MOE_OK);
  EXPECT_EQ(back.cfg()->struct_size, kOld);
  EXPECT_EQ(back.cfg()->d_model, kD);
  EXPECT_TRUE(back.tail_untouched());
  moe_layer_destroy(l);
}

TEST(OlderHeader, AStructSizeInsideAFieldLeavesThatFieldItsDefault) {
  moe_config c = base(MOE_ROUTE_TOKEN_CHOICE, 1.0f, 7);
  c.struct_size = kOld + 3;  // three bytes of min_capacity: not a struct any header declared
  moe_layer *l = nullptr;
  ASSERT_EQ(moe_layer_create(&c, &l), MOE_OK) << moe_last_error();
  moe_config got;
  got.struct_size = sizeof got;
  ASSERT_EQ(moe_layer_get_config(l, &got), MOE_OK);
  EXPECT_EQ(got.min_capacity, 0);
  EXPECT_EQ(got.d_model, kD);
  moe_layer_destroy(l);
}

TEST(OlderHeader, SizedEntryPointsRefuseTooSmallAStruct) {
  moe_config c;
  std::memset(&c, 0x11, sizeof c);
  const moe_config before = c;
  moe_config_init_size(&c, kOld - 1);  // a no-op: no release had so small a struct
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0);
  EXPECT_EQ(moe_config_preset_size(&c, kOld - 1, "mixtral"), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(moe_last_error()).find("size is"), std::string::npos) << moe_last_error();
  EXPECT_EQ(std::memcmp(&c, &before, sizeof c), 0);
  moe_config_init_size(nullptr, sizeof c);  // NULL: a no-op
  // The macros pass the whole struct of this header.
  moe_config_init(&c);
  EXPECT_EQ(c.struct_size, sizeof c);
  EXPECT_EQ(c.min_capacity, 0);
  c.min_capacity = 9;
  ASSERT_EQ(moe_config_preset(&c, "mixtral"), MOE_OK);
  EXPECT_EQ(c.struct_size, sizeof c);
  EXPECT_EQ(c.min_capacity, 0);  // reset to the default, like every field a preset does not set
}

}  // namespace
