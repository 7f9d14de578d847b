// The counter-based generator of src/core/rng.h: a value depends only on (seed, stream, counter),
// uniform values lie in [0, 1) with the right moments, normal values have mean 0 and variance 1.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "core/rng.h"

namespace {

constexpr int kN = 200000;

TEST(Rng, SameCounterSameValue) {
  for (uint64_t seed : {0ull, 1ull, 42ull, ~0ull})
    for (uint64_t stream : {uint64_t{moe::kStreamInit}, uint64_t{moe::kStreamNoise}, uint64_t{moe::kStreamJitter}})
      for (uint64_t ctr : {0ull, 1ull, 12345ull, (1ull << 40) + 7}) {
        EXPECT_EQ(moe::rng_bits(seed, stream, ctr), moe::rng_bits(seed, stream, ctr));
        EXPECT_EQ(moe::rng_uniform(seed, stream, ctr), moe::rng_uniform(seed, stream, ctr));
        EXPECT_EQ(moe::rng_normal(seed, stream, ctr), moe::rng_normal(seed, stream, ctr));
      }
}

TEST(Rng, OrderIndependent) {
  // Drawing forwards or backwards gives the same value per counter: no hidden state.
  std::vector<float> fwd(1000), bwd(1000);
  for (int i = 0; i < 1000; ++i) fwd[i] = moe::rng_uniform(7, moe::kStreamNoise, i);
  for (int i = 999; i >= 0; --i) bwd[i] = moe::rng_uniform(7, moe::kStreamNoise, i);
  EXPECT_EQ(fwd, bwd);
}

TEST(Rng, DifferentKeysGiveDifferentStreams) {
  // Seeds, streams and counters all change the bits; collisions among a few thousand 64-bit
  // values would mean the key is being ignored.
  std::set<uint64_t> seen;
  int n = 0;
  for (uint64_t seed = 0; seed < 4; ++seed)
    for (uint64_t stream : {uint64_t{moe::kStreamInit}, uint64_t{moe::kStreamNoise}, uint64_t{moe::kStreamJitter}})
      for (uint64_t ctr = 0; ctr < 500; ++ctr, ++n) seen.insert(moe::rng_bits(seed, stream, ctr));
  EXPECT_EQ(static_cast<int>(seen.size()), n);
}

TEST(Rng, UniformRangeAndMoments) {
  double sum = 0.0, sum2 = 0.0;
  float lo = 1.0f, hi = 0.0f;
  int below_half = 0;
  for (int i = 0; i < kN; ++i) {
    float u = moe::rng_uniform(3, moe::kStreamInit, static_cast<uint64_t>(i));
    ASSERT_GE(u, 0.0f) << i;
    ASSERT_LT(u, 1.0f) << i;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    sum += u;
    sum2 += static_cast<double>(u) * u;
    below_half += u < 0.5f;
  }
  const double mean = sum / kN, var = sum2 / kN - mean * mean;
  // Standard error of the mean is sqrt(1/12 / N) ~ 6.5e-4: 0.005 is > 7 sigma.
  EXPECT_NEAR(mean, 0.5, 0.005);
  EXPECT_NEAR(var, 1.0 / 12.0, 0.003);
  EXPECT_LT(lo, 1e-3f);
  EXPECT_GT(hi, 1.0f - 1e-3f);
  EXPECT_NEAR(static_cast<double>(below_half) / kN, 0.5, 0.01);
}

TEST(Rng, UniformBucketsAreFlat) {
  constexpr int kBuckets = 16;
  std::vector<int> hist(kBuckets, 0);
  for (int i = 0; i < kN; ++i) ++hist[static_cast<int>(moe::rng_uniform(11, moe::kStreamJitter, i) * kBuckets)];
  const double expect = static_cast<double>(kN) / kBuckets;
  double chi2 = 0.0;
  for (int h : hist) chi2 += (h - expect) * (h - expect) / expect;
  // 15 degrees of freedom: P(chi2 > 50) < 1e-5.
  EXPECT_LT(chi2, 50.0);
}

TEST(Rng, NormalMoments) {
  double sum = 0.0, sum2 = 0.0;
  int within1 = 0;
  for (int i = 0; i < kN; ++i) {
    float z = moe::rng_normal(5, moe::kStreamNoise, static_cast<uint64_t>(i));
    ASSERT_TRUE(std::isfinite(z)) << i;
    sum += z;
    sum2 += static_cast<double>(z) * z;
    within1 += std::fabs(z) < 1.0f;
  }
  const double mean = sum / kN, var = sum2 / kN - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.015);
  EXPECT_NEAR(var, 1.0, 0.02);
  EXPECT_NEAR(static_cast<double>(within1) / kN, 0.6827, 0.01);
}

TEST(Rng, Mix64IsABijectionOnASample) {
  std::set<uint64_t> out;
  for (uint64_t i = 0; i < 10000; ++i) out.insert(moe::mix64(i));
  EXPECT_EQ(out.size(), 10000u);
  EXPECT_NE(moe::mix64(0), moe::mix64(1));
}

}  // namespace
