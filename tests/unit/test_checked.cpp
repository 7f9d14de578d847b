// moe::checked_mul / checked_add / checked_bytes: every size product in libmoe goes through them,
// so an overflow must become MOE_ERR_INVALID_ARGUMENT (a moe::Error) naming what overflowed.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "core/checked.h"
#include "core/error.h"

namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// Runs f, expects a moe::Error with the given status whose message contains `what`.
template <class F>
void expect_error(F &&f, moe_status status, const std::string &what) {
  try {
    f();
    ADD_FAILURE() << "expected a moe::Error mentioning \"" << what << "\", nothing was thrown";
  } catch (const moe::Error &e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << "message: " << e.what();
  }
}

TEST(CheckedMul, ExactProducts) {
  EXPECT_EQ(moe::checked_mul(0, 0, "t"), 0);
  EXPECT_EQ(moe::checked_mul(0, kMax, "t"), 0);
  EXPECT_EQ(moe::checked_mul(kMax, 1, "t"), kMax);
  EXPECT_EQ(moe::checked_mul(3, 7, "t"), 21);
  EXPECT_EQ(moe::checked_mul(int64_t{1} << 31, int64_t{1} << 31, "t"), int64_t{1} << 62);
  EXPECT_EQ(moe::checked_mul(2, 3, 5, "t"), 30);
  EXPECT_EQ(moe::checked_mul(int64_t{1} << 20, int64_t{1} << 20, int64_t{1} << 22, "t"), int64_t{1} << 62);
  // The largest product that fits: (2^63 - 1) = 7^2 * 73 * 127 * 337 * 92737 * 649657.
  EXPECT_EQ(moe::checked_mul(49 * 73 * 127, int64_t{337} * 92737 * 649657, "t"), kMax);
}

TEST(CheckedMul, OverflowIsRefused) {
  expect_error([] { moe::checked_mul(kMax, 2, "rows * cols"); }, MOE_ERR_INVALID_ARGUMENT, "rows * cols");
  expect_error([] { moe::checked_mul(int64_t{1} << 32, int64_t{1} << 31, "big"); }, MOE_ERR_INVALID_ARGUMENT, "big");
  expect_error([] { moe::checked_mul(int64_t{1} << 31, int64_t{1} << 31, 2, "three"); }, MOE_ERR_INVALID_ARGUMENT,
               "three");
  // Overflow in the first of the two products of the three-factor form, with a zero after it.
  expect_error([] { moe::checked_mul(kMax, 3, 0, "first"); }, MOE_ERR_INVALID_ARGUMENT, "first");
  // The message names the operands.
  expect_error([] { moe::checked_mul(kMax, 2, "w"); }, MOE_ERR_INVALID_ARGUMENT, std::to_string(kMax));
}

TEST(CheckedMul, NegativeFactorsAreRefused) {
  expect_error([] { moe::checked_mul(-1, 5, "neg"); }, MOE_ERR_INVALID_ARGUMENT, "neg");
  expect_error([] { moe::checked_mul(5, -1, "neg"); }, MOE_ERR_INVALID_ARGUMENT, "neg");
  expect_error([] { moe::checked_mul(-3, -3, "neg"); }, MOE_ERR_INVALID_ARGUMENT, "neg");
  expect_error([] { moe::checked_mul(2, 2, -1, "neg3"); }, MOE_ERR_INVALID_ARGUMENT, "neg3");
}

TEST(CheckedAdd, OverflowIsRefused) {
  EXPECT_EQ(moe::checked_add(kMax - 1, 1, "a"), kMax);
  EXPECT_EQ(moe::checked_add(-5, 3, "a"), -2);
  expect_error([] { moe::checked_add(kMax, 1, "sum"); }, MOE_ERR_INVALID_ARGUMENT, "sum");
  expect_error([] { moe::checked_add(std::numeric_limits<int64_t>::min(), -1, "low"); }, MOE_ERR_INVALID_ARGUMENT,
               "low");
}

TEST(CheckedBytes, ProductsAndLimits) {
  EXPECT_EQ(moe::checked_bytes(0, 4, "b"), size_t{0});
  EXPECT_EQ(moe::checked_bytes(10, 4, "b"), size_t{40});
  EXPECT_EQ(moe::checked_bytes(int64_t{1} << 40, 4, "b"), size_t{1} << 42);
  expect_error([] { moe::checked_bytes(kMax / 2, 4, "bytes"); }, MOE_ERR_INVALID_ARGUMENT, "bytes");
  expect_error([] { moe::checked_bytes(-1, 4, "negbytes"); }, MOE_ERR_INVALID_ARGUMENT, "negbytes");
}

}  // namespace
