// moe-bench --ep-ranks R: R expert-parallel layers as R threads of this process, each with its
// share of the tokens, exchanging through an in-process comm (ep_comm.h). It times the collective
// steps and measures the bytes each rank sends per token in forward and backward. The times
// include the in-process copies and barriers: they show the exchange path works and what it
// costs here, not how fast a networked expert-parallel run would be.
#pragma once
#include <cstdint>
#include <vector>

#include <moe/moe.h>

#include "bench_device.h"

namespace moe_bench {

struct EpParams {
  moe_config cfg{};  // the layer; comm is set per rank
  int ranks = 2;
  int64_t tokens = 0;  // global batch, split as evenly as it goes (the first ranks get one more)
  int warmup = 0, iters = 1;
  bool fwd = true, fwdbwd = true;
  int threads_per_rank = 1;  // OpenMP threads of each rank's thread
  Cuda *cuda = nullptr;      // non-null: CUDA layers, device buffers
};

// Bytes per token one rank sent in one phase, and their mean and max over the ranks with tokens.
struct PerToken {
  std::vector<double> per_rank;  // -1 for a rank without tokens
  double mean = 0, max = 0;
};

struct EpPhase {
  PerToken rows_remote, rows_self, meta_remote;
};

struct EpResult {
  moe_config eff{};                // rank 0's effective configuration
  std::vector<int64_t> tokens;     // per rank
  int threads_per_rank = 1;
  Timing fwd, fwdbwd;              // collective steps, wall clock, median over iterations
  moe_stats stats{};               // rank 0's, of the global batch
  bool have_stats = false;
  size_t row_bytes = 0;            // width of the token rows the layers exchanged
  EpPhase phase[2];                // [0] forward, [1] backward, of one training step
  double expected_uniform = 0;     // bytes per token to other ranks per phase if routing were uniform
};

EpResult run_expert_parallel(const EpParams &p);

// The "ep" member of moe-bench's JSON (", \"ep\": {...}") and the text report's section
// (ep_report.cpp).
void print_ep_json(const EpResult &r);
void print_ep_text(const EpResult &r);

}  // namespace moe_bench
