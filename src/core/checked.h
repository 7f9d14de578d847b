// Every size product in libmoe goes through these, so an overflow becomes
// MOE_ERR_INVALID_ARGUMENT before anything is allocated.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>

#include "core/error.h"

namespace moe {

inline int64_t checked_mul(int64_t a, int64_t b, const char *what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r))
    fail(MOE_ERR_INVALID_ARGUMENT, "%s: %lld * %lld overflows int64", what, (long long)a, (long long)b);
  return r;
}

inline int64_t checked_mul(int64_t a, int64_t b, int64_t c, const char *what) {
  return checked_mul(checked_mul(a, b, what), c, what);
}

inline int64_t checked_add(int64_t a, int64_t b, const char *what) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r))
    fail(MOE_ERR_INVALID_ARGUMENT, "%s: %lld + %lld overflows int64", what, (long long)a, (long long)b);
  return r;
}

// Bytes of n elements of elem_size, refused when it cannot be addressed.
inline size_t checked_bytes(int64_t n, size_t elem_size, const char *what) {
  int64_t b = checked_mul(n, static_cast<int64_t>(elem_size), what);
  if (static_cast<uint64_t>(b) > static_cast<uint64_t>(std::numeric_limits<ptrdiff_t>::max()))
    fail(MOE_ERR_INVALID_ARGUMENT, "%s: %lld bytes is too large", what, (long long)b);
  return static_cast<size_t>(b);
}

}  // namespace moe
