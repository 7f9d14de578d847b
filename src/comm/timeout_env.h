// The deadline of the comm adapters (libmoe_mpi, libmoe_nccl) from the environment: both read it
// the same way, so that MOE_MPI_TIMEOUT and MOE_NCCL_TIMEOUT accept the same text.
#pragma once

#include <cmath>
#include <cstdlib>

namespace moe_comm_support {

// Seconds each exchange may take when no variable is set: generous, a step never takes that long.
inline constexpr double kDefaultTimeout = 300.0;

// The value of the environment variable `name` in seconds: a number >= 0, where 0 and "inf" mean
// no deadline (stored as 0); kDefaultTimeout where unset or empty. false (out = the default) if
// the text is not such a number.
inline bool timeout_from_env(const char *name, double &out) {
  const char *v = std::getenv(name);
  out = kDefaultTimeout;
  if (!v || !*v) return true;
  char *end = nullptr;
  const double t = std::strtod(v, &end);
  if (end == v || *end != '\0' || std::isnan(t) || t < 0) return false;
  out = std::isinf(t) ? 0.0 : t;
  return true;
}

}  // namespace moe_comm_support
