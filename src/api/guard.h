// Every extern "C" entry point runs its body through call(): exceptions become a moe_status and
// the calling thread's error text; nothing propagates into the caller's language.
#pragma once
#include <new>
#include <string>

#include "core/error.h"

namespace moe {

void set_last_error(moe_status s, const char *message);

template <class F>
moe_status call(const char *fn, F &&body) noexcept {
  try {
    body();
    return MOE_OK;
  } catch (const Error &e) {
    set_last_error(e.status(), (std::string(fn) + ": " + e.what()).c_str());
    return e.status();
  } catch (const std::bad_alloc &) {
    set_last_error(MOE_ERR_OUT_OF_MEMORY, (std::string(fn) + ": out of host memory").c_str());
    return MOE_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    set_last_error(MOE_ERR_INTERNAL, (std::string(fn) + ": internal error: " + e.what()).c_str());
    return MOE_ERR_INTERNAL;
  } catch (...) {
    set_last_error(MOE_ERR_INTERNAL, (std::string(fn) + ": internal error").c_str());
    return MOE_ERR_INTERNAL;
  }
}

}  // namespace moe
