// The router's decisions (shared/DESIGN.md section 4) recomputed on the host in double precision,
// to find the tokens whose routing is at a near-tie: where two backends, whose float32 logits
// differ in their last bits (another GEMM, another summation order), may decide differently and
// both be right. Tests draw their inputs without near-ties, so that every decision must agree
// exactly, and know which tokens may differ where one remains.
#pragma once

#include <moe/moe.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "random.h"

namespace moe_test {

// Two values at a near-tie: within this relative distance (float32 rounding is about 1e-7).
constexpr double kNearTie = 1e-4;

// What the router reads: cfg (top-k, score, groups, capacity, noise, seed), T tokens of x [T, d]
// as the layer holds them (rounded to its dtype), router.weight [E, d], router.bias [E] (empty:
// zeros) and, for Gaussian noise, router.noise_weight [E, d].
struct RouterInputs {
  moe_config cfg{};
  int64_t T = 0;
  std::vector<float> x, weight, bias, noise_weight;
  std::vector<float> logit_bias;  // router.logit_bias (router_logit_bias), or empty
};

// The routing of the replica. training: with the noise of the training forward at `step` (none
// for inference).
struct Routing {
  std::vector<int32_t> ids;  // token choice: [T, k] in choice order, -1 where capacity dropped the slot
  std::vector<int32_t> assignment_token, assignment_expert;  // expert choice: by expert, then token
  // Per token, nonzero where a decision is at a near-tie: the order of the selection values over
  // the top k + 1 (the choices, their order, and the boundary), the group boundary, the capacity
  // boundary of the PROBS policy and of expert choice, and with Gaussian noise and a load loss
  // the k-th and (k+1)-th noisy logits.
  std::vector<char> near;
};
Routing route(const RouterInputs &in, bool training, uint64_t step = 0);
inline std::vector<char> near_ties(const RouterInputs &in, bool training, uint64_t step = 0) {
  return route(in, training, step).near;
}

// Draws rows of in.x again (draw_row gives one row of d values, rounded as the layer will hold
// them) until no token is at a near-tie, for inference and, with noise, for the training forward
// at `step`. Returns false, leaving the last draw, when max_rounds do not get there.
bool draw_without_near_ties(RouterInputs &in, uint64_t step, Rng &rng,
                            const std::function<std::vector<float>(Rng &)> &draw_row, int max_rounds = 200);

}  // namespace moe_test
