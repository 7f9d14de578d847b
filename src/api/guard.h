// Every extern "C" entry point runs its body through call(): exceptions become a moe_status and
// the calling thread's error text; nothing propagates into the caller's language.
#pragma once
#include <new>
#include <string>

#include "core/error.h"

namespace moe {

void set_last_error(moe_status s, const char *message);

// Records "fn: prefix message" as the thread's error text. Never throws (a handler below that threw
// would terminate the caller's process): without memory for the text it records fn alone (or
// nothing), and the status still says what happened.
inline void report(moe_status s, const char *fn, const char *message, const char *prefix = "") noexcept {
  try {
    set_last_error(s, (std::string(fn) + ": " + prefix + message).c_str());
  } catch (...) {
    set_last_error(s, fn);
  }
}

template <class F>
moe_status call(const char *fn, F &&body) noexcept {
  try {
    body();
    return MOE_OK;
  } catch (const Error &e) {
    report(e.status(), fn, e.what());
    return e.status();
  } catch (const std::bad_alloc &) {
    report(MOE_ERR_OUT_OF_MEMORY, fn, "out of host memory");
    return MOE_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    report(MOE_ERR_INTERNAL, fn, e.what(), "internal error: ");
    return MOE_ERR_INTERNAL;
  } catch (...) {
    report(MOE_ERR_INTERNAL, fn, "internal error");
    return MOE_ERR_INTERNAL;
  }
}

}  // namespace moe
