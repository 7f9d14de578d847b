// The layer and context objects behind the opaque C handles.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/buffer.h"
#include "core/capacity_groups.h"
#include "core/config.h"

namespace moe {

struct Param {
  std::string name;
  int ndim = 0;
  int64_t shape[3] = {0, 0, 0};
  int64_t numel = 0;
  bool trainable = true;
  int dtype = MOE_DTYPE_F32;  // storage of data and grad (host copies are float32)
  Buffer data, grad;
};

// Buffers one forward (and its backward) works in; grow-only, reused from call to call.
struct Workspace {
  // x in the layer's dtype; with bf16/f16 also xf, its float32 copy for the router, and yacc,
  // dxacc: float32 sums of y and dx, rounded once into the caller's buffers.
  Buffer x, xf, yacc, dxacc;
  Buffer logits, scores, lse, topk_ids, topk_w;
  Buffer xr, clean_logits, noise_std, noise;  // training noise
  Buffer token_offsets, token_rows;           // expert choice
  Buffer row_of_slot, row_token, row_slot, row_weight;
  Buffer xe, h, g, a, ye;
  Buffer hs, gs, as, ys, gate;
  // backward
  Buffer dye, drow_weight, dh, dg, dxe, dlogits, dys, dhs, dgs;
  Buffer dclean, dstd, gate_scratch, shared_scratch;
  // expert parallelism: rows received for this rank's experts, and their permutations
  Buffer ep_perm, ep_inv, ep_stage, xl, yl, dyl, dxl;

  // Bytes held by every buffer above (moe_layer_memory, moe_context_memory).
  size_t bytes() const {
    size_t n = 0;
    for (const Buffer *b : {&x, &xf, &yacc, &dxacc, &logits, &scores, &lse, &topk_ids, &topk_w, &xr, &clean_logits,
                            &noise_std, &noise, &token_offsets, &token_rows, &row_of_slot, &row_token, &row_slot,
                            &row_weight, &xe, &h, &g, &a, &ye, &hs, &gs, &as, &ys, &gate, &dye, &drow_weight, &dh,
                            &dg, &dxe, &dlogits, &dys, &dhs, &dgs, &dclean, &dstd, &gate_scratch, &shared_scratch,
                            &ep_perm, &ep_inv, &ep_stage, &xl, &yl, &dyl, &dxl})
      n += b->bytes();
    return n;
  }
};

// How the rows of one forward are spread over ranks (src/core/exchange.cpp).
struct ExchangePlan {
  std::vector<int64_t> send_counts, recv_counts;  // [ranks], rows
  std::vector<int64_t> local_offsets;             // [E_local+1] rows of each local expert (expert-major)
  int64_t recv_rows = 0;
};

// What a forward decided, on the host: small (E-sized) arrays and scalars.
struct RoutingSummary {
  int64_t T = 0, R = 0;
  int64_t global_T = 0;   // tokens over all ranks (T without a comm)
  std::vector<int64_t> global_kept;  // kept rows per expert over all ranks
  ExchangePlan ep;        // expert parallelism only
  CapacityGroups groups;  // slots per expert in each group of tokens; capacity -1: dropless
  bool noisy = false;     // Gaussian noise was applied (training)
  uint64_t step = 0;      // the training step that drew the noise
  std::vector<int64_t> counts, kept, offsets;
  std::vector<double> prob_sum, weight_sum, load_sum;
  double lse_sq_sum = 0.0;
  moe_stats stats{};
  std::vector<float> lb_coef, gate_coef, load_coef;  // backward coefficients of the aux losses
};

}  // namespace moe

struct moe_layer {
  moe::Config cfg;
  std::unique_ptr<moe::Backend> backend; // outlives every buffer below
  std::vector<moe::Param> params;
  moe::Param *router_w = nullptr, *router_bias = nullptr, *noise_w = nullptr, *logit_bias = nullptr;
  moe::Param *w1 = nullptr, *w3 = nullptr, *w2 = nullptr;
  moe::Param *b1 = nullptr, *b3 = nullptr, *b2 = nullptr;  // expert_bias
  moe::Param *sw1 = nullptr, *sw3 = nullptr, *sw2 = nullptr, *sgate = nullptr;
  uint64_t step = 0;  // training forwards so far: keys the router noise
  // Bumped by every moe_layer_set_param: a training forward records it, and its backward refuses
  // to run on parameters that changed in between (its saved activations would not match them).
  uint64_t param_version = 0;
  const moe::Param *last_set = nullptr;  // the parameter the last set_param wrote, for that message
  moe::Workspace ws;  // for inference
  int live_contexts = 0;
  bool destroyed = false;  // moe_layer_destroy ran while contexts were alive

  moe::Param *find(const char *name);
};

struct moe_context {
  enum class State { kEmpty, kRouted, kTrained };
  moe_layer *layer = nullptr;
  State state = State::kEmpty;
  moe::Workspace ws;
  moe::RoutingSummary route;
  float aux_grad_scale = 1.0f;  // moe_context_set_aux_grad_scale
  uint64_t param_version = 0;   // the layer's param_version at the training forward
};

namespace moe {

// Builds the parameters of a new layer and initialises them from the seed.
void create_params(moe_layer &layer);

// Host float32 copies of a parameter's storage (p.data or p.grad), converted from or to p.dtype.
void upload_param(const moe_layer &layer, const Param &p, const float *host);
void download_param(const moe_layer &layer, const Param &p, const Buffer &src, float *host);

// The pipeline (src/core/pipeline.cpp).
enum class Mode { kInference, kTraining, kRouteOnly };
// x, y, dy, dx: [T, d_model] in the layer's dtype.
void forward(moe_layer &layer, const void *x, int64_t T, void *y, moe_context *ctx, Mode mode);
void backward(moe_layer &layer, moe_context &ctx, const void *dy, void *dx);

// Loss values and their backward coefficients from the routing summary (src/core/aux_loss.cpp).
void compute_aux_losses(const Config &cfg, RoutingSummary &r);

}  // namespace moe
