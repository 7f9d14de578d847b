// Status names, the thread-local error text (the library's only mutable global) and the version.
#include <cstring>
#include <string>

#include "api/guard.h"

namespace moe {
namespace {
thread_local std::string t_last_error;
}

void set_last_error(moe_status, const char *message) {
  try {
    t_last_error = message;
  } catch (...) {
    t_last_error.clear();  // no memory for the text: the status still says what happened
  }
}

}  // namespace moe

extern "C" {

MOE_API const char *moe_status_name(moe_status s) {
  // Read as an int: C callers may pass any value, and an enum outside its range is undefined
  // behaviour in C++ (UBSan -fsanitize=enum reports the load).
  int v;
  std::memcpy(&v, &s, sizeof v);
  switch (v) {
    case MOE_OK: return "MOE_OK";
    case MOE_ERR_INVALID_ARGUMENT: return "MOE_ERR_INVALID_ARGUMENT";
    case MOE_ERR_OUT_OF_MEMORY: return "MOE_ERR_OUT_OF_MEMORY";
    case MOE_ERR_UNSUPPORTED: return "MOE_ERR_UNSUPPORTED";
    case MOE_ERR_DEVICE: return "MOE_ERR_DEVICE";
    case MOE_ERR_COMM: return "MOE_ERR_COMM";
    case MOE_ERR_STATE: return "MOE_ERR_STATE";
    case MOE_ERR_NONFINITE: return "MOE_ERR_NONFINITE";
    case MOE_ERR_INTERNAL: return "MOE_ERR_INTERNAL";
  }
  return "MOE_ERR_UNKNOWN";
}

MOE_API const char *moe_last_error(void) { return moe::t_last_error.c_str(); }

MOE_API uint32_t moe_version(void) { return MOE_VERSION_NUMBER; }

}  // extern "C"
