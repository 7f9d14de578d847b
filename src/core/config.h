// The validated, immutable configuration of a layer and the quantities derived from it.
#pragma once
#include <cstddef>
#include <cstdint>

#include "moe/moe.h"

namespace moe {

struct Config {
  moe_config c;          // with defaults filled in, struct_size = sizeof(moe_config)
  int64_t d, ff, E, k;   // d_model, d_ff, global experts, top_k
  int64_t E_local;       // experts held by this rank
  int64_t expert_begin;  // global index of this rank's first expert
  int64_t S, ffs;        // shared experts and their width
  int ranks, rank;
  bool glu;              // SwiGLU / GeGLU: experts have w3
};

bool is_glu(moe_activation a);

// sizeof(moe_comm) in a moe.h without last_error, still accepted: such a comm's last_error is
// never read.
constexpr size_t kCommSizeWithoutLastError = offsetof(moe_comm, last_error);

// Copies the caller's struct (min(struct_size, sizeof) bytes over the defaults) and validates
// every field, naming the first bad one. Throws moe::Error.
Config make_config(const moe_config *user);

// Writes the default configuration.
void config_defaults(moe_config *cfg);

// Applies a named preset over the defaults into the first size bytes of *cfg (struct_size =
// min(size, sizeof)); throws moe::Error for an unknown name.
void config_preset(moe_config *cfg, size_t size, const char *name);

}  // namespace moe
