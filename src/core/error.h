// Errors inside libmoe are C++ exceptions carrying a moe_status; src/api turns them into the
// status and the thread-local message, so nothing throws across the C boundary.
#pragma once
#include <cstdarg>
#include <cstdint>
#include <exception>
#include <string>

#include "moe/moe.h"

namespace moe {

class Error : public std::exception {
 public:
  Error(moe_status status, std::string message) : status_(status), message_(std::move(message)) {}
  moe_status status() const noexcept { return status_; }
  const char *what() const noexcept override { return message_.c_str(); }

 private:
  moe_status status_;
  std::string message_;
};

// printf-style formatting of an error message.
std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void fail(moe_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

inline void require(bool ok, const char *what) {
  if (!ok) fail(MOE_ERR_INVALID_ARGUMENT, "%s", what);
}

}  // namespace moe
