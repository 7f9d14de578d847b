// Comparisons of tensors as gtest assertions (EXPECT_TRUE(close(...))): one failure per tensor that
// names it, counts the elements that differ and shows the worst (or the first) of them.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace moe_test {

// Scale-aware closeness of a tensor: every |got - ref| <= rtol * scale, where scale is the largest
// |ref| of the tensor (at least floor). Float rounding of a GEMM or a reduction grows with the sum
// of the magnitudes of its terms, which the tensor's largest value bounds from below; a per-element
// relative test would fail on outputs that cancel to near zero. Non-finite values must match
// exactly (NaN where NaN, the same Inf).
template <class T>
::testing::AssertionResult close(const std::string &what, const T *got, const T *ref, size_t n, double rtol,
                                 double floor = 1e-30) {
  double scale = floor;
  for (size_t i = 0; i < n; ++i)
    if (std::isfinite(static_cast<double>(ref[i]))) scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
  size_t bad = 0, worst = 0;
  double worst_err = -1.0;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    double err;
    if (std::isfinite(g) && std::isfinite(r)) {
      err = std::fabs(g - r);
    } else {
      const bool same = (std::isnan(g) && std::isnan(r)) || g == r;
      err = same ? 0.0 : std::numeric_limits<double>::infinity();
    }
    if (err > rtol * scale) {
      ++bad;
      if (err > worst_err) {
        worst_err = err;
        worst = i;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(9) << what << ": " << bad << " of " << n << " elements differ by more than " << rtol
     << " x " << scale << " (largest |expected|); worst [" << worst << "]: got " << static_cast<double>(got[worst])
     << ", expected " << static_cast<double>(ref[worst]) << ", |diff| " << worst_err << " = "
     << worst_err / scale << " x scale";
  return ::testing::AssertionFailure() << os.str();
}

template <class T>
::testing::AssertionResult close(const std::string &what, const std::vector<T> &got, const std::vector<T> &ref,
                                 double rtol, double floor = 1e-30) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " values, expected " << ref.size();
  return close(what, got.data(), ref.data(), got.size(), rtol, floor);
}

// A scalar: |got - ref| <= rtol * max(|ref|, floor).
inline ::testing::AssertionResult close_scalar(const std::string &what, double got, double ref, double rtol,
                                               double floor = 1e-30) {
  const double tol = rtol * std::max(std::fabs(ref), floor);
  if ((std::isnan(got) && std::isnan(ref)) || std::fabs(got - ref) <= tol) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(12) << what << ": got " << got << ", expected " << ref << " (|diff| "
     << std::fabs(got - ref) << " > " << tol << ")";
  return ::testing::AssertionFailure() << os.str();
}

// Exact equality of the first n values (all when n is npos); floats compared bit for bit.
template <class T>
::testing::AssertionResult same(const std::string &what, const std::vector<T> &got, const std::vector<T> &ref,
                                size_t n = static_cast<size_t>(-1)) {
  if (n == static_cast<size_t>(-1)) {
    if (got.size() != ref.size())
      return ::testing::AssertionFailure() << what << ": " << got.size() << " values, expected " << ref.size();
    n = got.size();
  }
  if (got.size() < n || ref.size() < n)
    return ::testing::AssertionFailure() << what << ": fewer than " << n << " values to compare";
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&got[i], &ref[i], sizeof(T)) != 0) {
      if (bad++ == 0) first = i;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << std::setprecision(17) << what << ": " << bad << " of " << n << " values differ; first at [" << first
     << "]: got " << +got[first] << ", expected " << +ref[first];
  return ::testing::AssertionFailure() << os.str();
}

// Every value finite.
template <class T>
::testing::AssertionResult all_finite(const std::string &what, const std::vector<T> &v) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(static_cast<double>(v[i]))) {
      if (bad++ == 0) first = i;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << v.size() << " values are not finite; first ["
                                       << first << "] = " << static_cast<double>(v[first]);
}

}  // namespace moe_test
