// How a backend's table entries report failure: the body throws moe::Error (or bad_alloc), the
// entry returns the status and keeps the message for last_error. Nothing propagates: the table
// is a C interface. Shared by src/cpu and src/cuda.
#pragma once
#include <exception>
#include <new>
#include <string>

#include "core/error.h"

namespace moe {

// Never throws: without memory for the text, the message is cleared.
inline void keep_message(std::string &error, const char *message) noexcept {
  try {
    error = message;
  } catch (...) {
    error.clear();
  }
}

template <class F>
moe_status stage_status(std::string &error, F &&body) noexcept {
  try {
    body();
    return MOE_OK;
  } catch (const Error &e) {
    keep_message(error, e.what());
    return e.status();
  } catch (const std::bad_alloc &) {
    keep_message(error, "out of host memory");
    return MOE_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    keep_message(error, e.what());
    return MOE_ERR_INTERNAL;
  }
}

}  // namespace moe
