// Comparisons of tensors as gtest assertions (EXPECT_TRUE(close(...))): one failure per tensor that
// names it, counts the elements that differ and shows the worst (or the first) of them.
#pragma once

#include <gtest/gtest.h>
#include <moe/moe.h>

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

// ---- tolerances between backends, from moe.h's precision rule ----------------------------------
//
// A value stored in bfloat16 or float16 is rounded once from a float32 result, and two backends
// (or two groupings of the same work) give float32 results that differ in their last bits only:
// rounded, they land on the same value or on neighbours, one unit in the last place apart, which
// is at most 2^-7 (bfloat16's 8-bit significand) or 2^-10 (float16's 11 bits) of the tensor's
// largest value. A stored neighbour read again (h feeding a, a feeding y) moves the next float32
// sum by one of its terms, far less than a unit of that sum. So a tensor compared between two
// backends that both follow the rule is allowed `units` units at its scale: one for its own
// rounding and one for the stored values upstream (a stage), or a few more where the path is a
// whole layer. Against float32 (the whole cost of 16-bit storage), every value stored on the path
// is off by up to half a unit of its own, and those add up along the path.
inline double unit_in_last_place(int dtype) {
  return dtype == MOE_DTYPE_BF16 ? 0x1p-7 : dtype == MOE_DTYPE_F16 ? 0x1p-10 : 0x1p-23;
}
constexpr double kFloat32Tol = 1e-5;  // float32 results with their terms added in another order
inline double stored_tol(int dtype, int units) {
  return dtype == MOE_DTYPE_F32 ? kFloat32Tol : units * unit_in_last_place(dtype) + kFloat32Tol;
}

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
