// The order of the stages (shared/DESIGN.md section 2): forward, route-only and backward.
// Buffers come from the workspace of the context (training, routing) or of the layer
// (inference) and are reused from call to call.
#include <cmath>
#include <cstring>

#include "core/checked.h"
#include "core/layer.h"

namespace moe {
namespace {

size_t fbytes(int64_t n, const char *what) { return checked_bytes(n, sizeof(float), what); }
size_t ibytes(int64_t n, const char *what) { return checked_bytes(n, sizeof(int32_t), what); }

template <class Args>
void run(const Backend &be, moe_status (*fn)(void *, const Args *), const Args &a, const char *name) {
  be.check(fn(be.state(), &a), name);
}

const float *f(const Buffer &b) { return b.as<const float>(); }
const float *f(const Param *p) { return p ? p->data.as<const float>() : nullptr; }
float *g(const Param *p) { return p ? p->grad.as<float>() : nullptr; }

// The shared experts: every one reads all T tokens, so their rows are laid out expert-major.
void shared_forward(moe_layer &l, Workspace &w, const float *x, int64_t T, float *y, bool save) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const int64_t rows = checked_mul(c.S, T, "num_shared_experts * num_tokens");
  be.ensure(w.hs, fbytes(checked_mul(rows, c.ffs, "shared rows"), "shared h"));
  if (c.glu) be.ensure(w.gs, fbytes(checked_mul(rows, c.ffs, "shared rows"), "shared g"));
  be.ensure(w.as, fbytes(checked_mul(rows, c.ffs, "shared rows"), "shared a"));
  be.ensure(w.ys, fbytes(checked_mul(rows, c.d, "shared rows"), "shared y"));
  be.ensure(w.gate, fbytes(T, "shared gate"));
  int64_t offsets[2] = {0, T};
  moe_ffn_args a{};
  a.num_experts = c.S;
  a.d = c.d;
  a.ff = c.ffs;
  a.activation = c.c.activation;
  a.offsets = offsets;
  a.shared_input = 1;
  a.x = x;
  a.w1 = f(l.sw1);
  a.w3 = f(l.sw3);
  a.w2 = f(l.sw2);
  a.h = w.hs.as<float>();
  a.g = c.glu ? w.gs.as<float>() : nullptr;
  a.a = w.as.as<float>();
  a.y = w.ys.as<float>();
  run(be, be.ops()->expert_ffn, a, "expert_ffn (shared)");
  moe_shared_args s{};
  s.T = T;
  s.d = c.d;
  s.S = c.S;
  s.x = x;
  s.gate_w = f(l.sgate);
  s.ys = w.ys.as<float>();
  s.gate = w.gate.as<float>();
  s.y = y;
  run(be, be.ops()->shared_combine, s, "shared_combine");
  (void)save;
}

}  // namespace

void forward(moe_layer &l, const float *x_in, int64_t T, float *y, moe_context *ctx, Mode mode) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const moe_backend_ops *ops = be.ops();
  Workspace &w = ctx ? ctx->ws : l.ws;
  const int64_t d = c.d, E = c.E, k = c.k;
  const int64_t Td = checked_mul(T, d, "num_tokens * d_model");
  const int64_t Tk = checked_mul(T, k, "num_tokens * top_k");
  const int64_t TE = checked_mul(T, E, "num_tokens * num_experts");
  if (Tk > INT32_MAX)
    fail(MOE_ERR_INVALID_ARGUMENT, "num_tokens is %lld: num_tokens * top_k must stay below 2^31", (long long)T);

  if (ctx) ctx->state = moe_context::State::kEmpty;
  RoutingSummary r;
  r.T = T;
  const float *x = x_in;
  if (mode == Mode::kTraining) {
    // Training keeps its own copy of x: the caller may reuse its buffer before backward.
    be.ensure(w.x, fbytes(Td, "x"));
    be.copy(w.x.get(), x_in, fbytes(Td, "x"));
    x = w.x.as<const float>();
  }
  be.ensure(w.logits, fbytes(TE, "logits"));
  be.ensure(w.scores, fbytes(TE, "scores"));
  be.ensure(w.lse, fbytes(T, "lse"));
  be.ensure(w.topk_ids, ibytes(Tk, "topk ids"));
  be.ensure(w.topk_w, fbytes(Tk, "topk weights"));
  be.ensure(w.row_of_slot, ibytes(Tk, "rows"));
  be.ensure(w.row_token, ibytes(Tk, "rows"));
  be.ensure(w.row_slot, ibytes(Tk, "rows"));
  be.ensure(w.row_weight, fbytes(Tk, "rows"));

  moe_gate_args ga{};
  ga.T = T;
  ga.d = d;
  ga.E = E;
  ga.x = x;
  ga.w = f(l.router_w);
  ga.logits = w.logits.as<float>();
  run(be, ops->gate, ga, "gate");

  r.counts.assign(E, 0);
  r.prob_sum.assign(E, 0.0);
  moe_select_args sa{};
  sa.T = T;
  sa.E = E;
  sa.k = k;
  sa.score = c.c.score;
  sa.normalize = c.c.normalize_topk;
  sa.routed_scale = c.c.routed_scale;
  sa.num_groups = c.c.num_groups;
  sa.topk_groups = c.c.topk_groups;
  sa.logits = w.logits.as<float>();
  sa.bias = f(l.router_bias);
  sa.scores = w.scores.as<float>();
  sa.lse = w.lse.as<float>();
  sa.topk_ids = w.topk_ids.as<int32_t>();
  sa.topk_w = w.topk_w.as<float>();
  sa.counts = r.counts.data();
  sa.prob_sum = r.prob_sum.data();
  sa.lse_sq_sum = &r.lse_sq_sum;
  run(be, ops->select, sa, "select");

  r.kept.assign(E, 0);
  r.offsets.assign(E + 1, 0);
  r.weight_sum.assign(E, 0.0);
  moe_plan_args pa{};
  pa.T = T;
  pa.E = E;
  pa.k = k;
  pa.capacity = -1;
  if (c.c.capacity_factor > 0) {
    double cap = std::ceil(static_cast<double>(c.c.capacity_factor) * static_cast<double>(Tk) / E);
    pa.capacity = cap > static_cast<double>(Tk) ? Tk : static_cast<int64_t>(cap);
  }
  pa.drop_policy = c.c.drop_policy;
  pa.topk_ids = w.topk_ids.as<int32_t>();
  pa.topk_w = w.topk_w.as<float>();
  pa.row_of_slot = w.row_of_slot.as<int32_t>();
  pa.row_token = w.row_token.as<int32_t>();
  pa.row_slot = w.row_slot.as<int32_t>();
  pa.row_weight = w.row_weight.as<float>();
  pa.offsets = r.offsets.data();
  pa.kept = r.kept.data();
  pa.weight_sum = r.weight_sum.data();
  run(be, ops->plan, pa, "plan");
  const int64_t R = r.offsets[E];
  r.R = R;
  compute_aux_losses(c, r);

  if (mode != Mode::kRouteOnly) {
    const int64_t Rd = checked_mul(R, d, "rows * d_model");
    const int64_t Rff = checked_mul(R, c.ff, "rows * d_ff");
    be.ensure(w.xe, fbytes(Rd, "xe"));
    be.ensure(w.h, fbytes(Rff, "h"));
    if (c.glu) be.ensure(w.g, fbytes(Rff, "g"));
    be.ensure(w.a, fbytes(Rff, "a"));
    be.ensure(w.ye, fbytes(Rd, "ye"));

    moe_rows_args ra{};
    ra.T = T;
    ra.d = d;
    ra.R = R;
    ra.k = k;
    ra.token_rows = w.row_of_slot.as<int32_t>();
    ra.row_token = w.row_token.as<int32_t>();
    ra.row_weight = w.row_weight.as<float>();
    ra.x = x;
    ra.xe = w.xe.as<float>();
    run(be, ops->dispatch, ra, "dispatch");

    moe_ffn_args fa{};
    fa.num_experts = c.E_local;
    fa.d = d;
    fa.ff = c.ff;
    fa.activation = c.c.activation;
    fa.offsets = r.offsets.data();
    fa.x = w.xe.as<float>();
    fa.w1 = f(l.w1);
    fa.w3 = f(l.w3);
    fa.w2 = f(l.w2);
    fa.h = w.h.as<float>();
    fa.g = c.glu ? w.g.as<float>() : nullptr;
    fa.a = w.a.as<float>();
    fa.y = w.ye.as<float>();
    run(be, ops->expert_ffn, fa, "expert_ffn");

    ra.ye = w.ye.as<float>();
    ra.y = y;
    run(be, ops->combine, ra, "combine");

    if (c.S > 0) shared_forward(l, w, x, T, y, mode == Mode::kTraining);
  }

  if (mode == Mode::kTraining && c.c.bias_update_rate > 0 && T > 0) {
    // Aux-loss-free balancing: bias[e] += u * sign(mean(n) - n_e), from loads before capacity.
    std::vector<float> bias(E);
    be.download(bias.data(), l.router_bias->data.get(), E * sizeof(float));
    double mean = 0.0;
    for (int64_t e = 0; e < E; ++e) mean += static_cast<double>(r.counts[e]);
    mean /= E;
    for (int64_t e = 0; e < E; ++e) {
      double diff = mean - static_cast<double>(r.counts[e]);
      bias[e] += c.c.bias_update_rate * static_cast<float>((diff > 0) - (diff < 0));
    }
    be.upload(l.router_bias->data.get(), bias.data(), E * sizeof(float));
  }
  if (mode == Mode::kTraining) ++l.step;
  if (ctx) {
    ctx->route = std::move(r);
    ctx->state = mode == Mode::kTraining ? moe_context::State::kTrained : moe_context::State::kRouted;
  }
}

void backward(moe_layer &l, moe_context &ctx, const float *dy, float *dx) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const moe_backend_ops *ops = be.ops();
  Workspace &w = ctx.ws;
  const RoutingSummary &r = ctx.route;
  const int64_t T = r.T, R = r.R, d = c.d, E = c.E, k = c.k;
  const int64_t Rd = checked_mul(R, d, "rows * d_model");
  const int64_t Rff = checked_mul(R, c.ff, "rows * d_ff");
  be.ensure(w.dye, fbytes(Rd, "dye"));
  be.ensure(w.drow_weight, fbytes(R, "drow_weight"));
  be.ensure(w.dh, fbytes(Rff, "dh"));
  if (c.glu) be.ensure(w.dg, fbytes(Rff, "dg"));
  be.ensure(w.dxe, fbytes(Rd, "dxe"));
  be.ensure(w.dlogits, fbytes(checked_mul(T, E, "num_tokens * num_experts"), "dlogits"));
  const float *x = f(w.x);

  moe_rows_args ra{};
  ra.T = T;
  ra.d = d;
  ra.R = R;
  ra.k = k;
  ra.token_rows = w.row_of_slot.as<int32_t>();
  ra.row_token = w.row_token.as<int32_t>();
  ra.row_weight = w.row_weight.as<float>();
  ra.ye = f(w.ye);
  ra.dy = dy;
  ra.dye = w.dye.as<float>();
  ra.drow_weight = w.drow_weight.as<float>();
  run(be, ops->combine_bwd, ra, "combine_bwd");

  moe_ffn_args fa{};
  fa.num_experts = c.E_local;
  fa.d = d;
  fa.ff = c.ff;
  fa.activation = c.c.activation;
  fa.offsets = r.offsets.data();
  fa.x = f(w.xe);
  fa.w1 = f(l.w1);
  fa.w3 = f(l.w3);
  fa.w2 = f(l.w2);
  fa.h = w.h.as<float>();
  fa.g = c.glu ? w.g.as<float>() : nullptr;
  fa.a = w.a.as<float>();
  fa.dy = w.dye.as<float>();
  fa.dx = dx ? w.dxe.as<float>() : nullptr;
  fa.dw1 = g(l.w1);
  fa.dw3 = g(l.w3);
  fa.dw2 = g(l.w2);
  fa.dh = w.dh.as<float>();
  fa.dg = c.glu ? w.dg.as<float>() : nullptr;
  run(be, ops->expert_ffn_bwd, fa, "expert_ffn_bwd");

  if (dx) {
    ra.dxe = w.dxe.as<float>();
    ra.dx = dx;
    run(be, ops->dispatch_bwd, ra, "dispatch_bwd");
  }

  if (c.S > 0) {
    const int64_t rows = checked_mul(c.S, T, "num_shared_experts * num_tokens");
    be.ensure(w.dys, fbytes(checked_mul(rows, d, "shared rows"), "shared dy"));
    be.ensure(w.dhs, fbytes(checked_mul(rows, c.ffs, "shared rows"), "shared dh"));
    if (c.glu) be.ensure(w.dgs, fbytes(checked_mul(rows, c.ffs, "shared rows"), "shared dg"));
    moe_shared_args s{};
    s.T = T;
    s.d = d;
    s.S = c.S;
    s.x = x;
    s.gate_w = f(l.sgate);
    s.ys = f(w.ys);
    s.gate = w.gate.as<float>();
    s.dy = dy;
    s.dys = w.dys.as<float>();
    s.dx = dx;
    s.dgate_w = g(l.sgate);
    run(be, ops->shared_combine_bwd, s, "shared_combine_bwd");
    int64_t offsets[2] = {0, T};
    moe_ffn_args sf{};
    sf.num_experts = c.S;
    sf.d = d;
    sf.ff = c.ffs;
    sf.activation = c.c.activation;
    sf.offsets = offsets;
    sf.shared_input = 1;
    sf.x = x;
    sf.w1 = f(l.sw1);
    sf.w3 = f(l.sw3);
    sf.w2 = f(l.sw2);
    sf.h = w.hs.as<float>();
    sf.g = c.glu ? w.gs.as<float>() : nullptr;
    sf.a = w.as.as<float>();
    sf.dy = w.dys.as<float>();
    sf.dx = dx;
    sf.dw1 = g(l.sw1);
    sf.dw3 = g(l.sw3);
    sf.dw2 = g(l.sw2);
    sf.dh = w.dhs.as<float>();
    sf.dg = c.glu ? w.dgs.as<float>() : nullptr;
    run(be, ops->expert_ffn_bwd, sf, "expert_ffn_bwd (shared)");
  }

  moe_select_bwd_args sb{};
  sb.T = T;
  sb.E = E;
  sb.k = k;
  sb.score = c.c.score;
  sb.normalize = c.c.normalize_topk;
  sb.routed_scale = c.c.routed_scale;
  sb.logits = f(w.logits);
  sb.scores = f(w.scores);
  sb.lse = f(w.lse);
  sb.topk_ids = w.topk_ids.as<int32_t>();
  sb.row_of_slot = w.row_of_slot.as<int32_t>();
  sb.drow_weight = f(w.drow_weight);
  sb.lb_coef = r.lb_coef.data();
  sb.gate_coef = c.c.importance_loss_coef != 0.0f ? r.gate_coef.data() : nullptr;
  sb.z_coef = c.c.z_loss_coef;
  sb.dlogits = w.dlogits.as<float>();
  run(be, ops->select_bwd, sb, "select_bwd");

  moe_gate_args ga{};
  ga.T = T;
  ga.d = d;
  ga.E = E;
  ga.x = x;
  ga.w = f(l.router_w);
  ga.dlogits = f(w.dlogits);
  ga.dx = dx;
  ga.dw = g(l.router_w);
  run(be, ops->gate_bwd, ga, "gate_bwd");
}

}  // namespace moe
