// The order of the stages (shared/DESIGN.md section 2): forward, route-only and backward.
// Buffers come from the workspace of the context (training, routing) or of the layer
// (inference) and are reused from call to call.
#include <algorithm>
#include <cmath>

#include "core/checked.h"
#include "core/exchange.h"
#include "core/half.h"
#include "core/layer.h"

namespace moe {
namespace {

size_t fbytes(int64_t n, const char *what) { return checked_bytes(n, sizeof(float), what); }
size_t ibytes(int64_t n, const char *what) { return checked_bytes(n, sizeof(int32_t), what); }
// Bytes of n activations in the layer's dtype.
size_t abytes(const Config &c, int64_t n, const char *what) { return checked_bytes(n, dtype_size(c.c.dtype), what); }

bool low_precision(const Config &c) { return c.c.dtype != MOE_DTYPE_F32; }

template <class Args>
void run(const Backend &be, moe_status (*fn)(void *, const Args *), const Args &a, const char *name) {
  be.check(fn(be.state(), &a), name);
}

const float *f(const Buffer &b) { return b.as<const float>(); }
const float *f(const Param *p) { return p ? p->data.as<const float>() : nullptr; }
float *g(const Param *p) { return p ? p->grad.as<float>() : nullptr; }
// Expert weights, stored in the layer's dtype.
const void *data(const Param *p) { return p ? p->data.get() : nullptr; }
void *grad(const Param *p) { return p ? p->grad.get() : nullptr; }

bool expert_choice(const Config &c) { return c.c.routing == MOE_ROUTE_EXPERT_CHOICE; }

// The gate's arguments; noise fields only when this forward draws noise.
moe_gate_args gate_args(const moe_layer &l, const Workspace &w, const RoutingSummary &r, int noise, const float *x) {
  const Config &c = l.cfg;
  moe_gate_args a{};
  a.T = r.T;
  a.d = c.d;
  a.E = c.E;
  a.x = x;
  a.w = f(l.router_w);
  a.logits = w.logits.as<float>();
  a.noise = noise;
  a.noise_eps = c.c.noise_eps;
  a.seed = c.c.seed;
  a.step = r.step;
  a.logit_bias = f(l.logit_bias);
  if (noise == MOE_NOISE_JITTER) a.xr = w.xr.as<float>();
  if (noise == MOE_NOISE_GAUSSIAN) {
    a.wn = f(l.noise_w);
    a.clean_logits = w.clean_logits.as<float>();
    a.noise_std = w.noise_std.as<float>();
    a.noise_draws = w.noise.as<float>();
  }
  return a;
}

moe_rows_args rows_args(const Config &c, const Workspace &w, const RoutingSummary &r) {
  moe_rows_args a{};
  a.T = r.T;
  a.d = c.d;
  a.R = r.R;
  a.k = c.k;
  if (expert_choice(c)) {
    a.token_offsets = w.token_offsets.as<const int64_t>();
    a.token_rows = w.token_rows.as<const int32_t>();
  } else {
    a.token_rows = w.row_of_slot.as<const int32_t>();
  }
  a.row_token = w.row_token.as<const int32_t>();
  a.row_weight = w.row_weight.as<const float>();
  a.dtype = c.c.dtype;
  return a;
}

// The arguments of expert_ffn / expert_ffn_bwd for the routed experts or for the shared ones,
// which read all T tokens each (expert-major rows). Backward fields point at workspace buffers
// that backward has sized before calling; forward leaves them unused.
moe_ffn_args ffn_args(const moe_layer &l, const Workspace &w, bool shared, const void *x, const int64_t *offsets) {
  const Config &c = l.cfg;
  const Param *w1 = shared ? l.sw1 : l.w1, *w3 = shared ? l.sw3 : l.w3, *w2 = shared ? l.sw2 : l.w2;
  moe_ffn_args a{};
  a.num_experts = shared ? c.S : c.E_local;
  a.d = c.d;
  a.ff = shared ? c.ffs : c.ff;
  a.activation = c.c.activation;
  a.dtype = c.c.dtype;
  a.offsets = offsets;
  a.shared_input = shared ? 1 : 0;
  a.x = x;
  a.w1 = data(w1);
  a.w3 = data(w3);
  a.w2 = data(w2);
  a.h = (shared ? w.hs : w.h).get();
  a.g = c.glu ? (shared ? w.gs : w.g).get() : nullptr;
  a.a = (shared ? w.as : w.a).get();
  a.dw1 = grad(w1);
  a.dw3 = grad(w3);
  a.dw2 = grad(w2);
  a.swiglu_alpha = c.c.swiglu_alpha;
  a.swiglu_limit = c.c.swiglu_limit;
  if (!shared) {  // shared experts have no biases
    a.b1 = data(l.b1);
    a.b3 = data(l.b3);
    a.b2 = data(l.b2);
    a.db1 = grad(l.b1);
    a.db3 = grad(l.b3);
    a.db2 = grad(l.b2);
  }
  a.dh = (shared ? w.dhs : w.dh).get();
  a.dg = c.glu ? (shared ? w.dgs : w.dg).get() : nullptr;
  return a;
}

moe_shared_args shared_args(const moe_layer &l, const Workspace &w, const void *x, int64_t T) {
  const Config &c = l.cfg;
  moe_shared_args s{};
  s.T = T;
  s.d = c.d;
  s.S = c.S;
  s.dtype = c.c.dtype;
  s.x = x;
  s.gate_w = f(l.sgate);
  s.ys = w.ys.get();
  s.gate = w.gate.as<float>();
  return s;
}

// The shared experts' buffers, allocated before the forward writes y.
void shared_reserve(moe_layer &l, Workspace &w, int64_t T) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const int64_t rows = checked_mul(c.S, T, "num_shared_experts * num_tokens");
  const int64_t rff = checked_mul(rows, c.ffs, "shared rows * d_ff_shared");
  be.ensure(w.hs, abytes(c, rff, "shared h"));
  if (c.glu) be.ensure(w.gs, abytes(c, rff, "shared g"));
  be.ensure(w.as, abytes(c, rff, "shared a"));
  be.ensure(w.ys, abytes(c, checked_mul(rows, c.d, "shared rows * d_model"), "shared y"));
  be.ensure(w.gate, fbytes(T, "shared gate"));
}

// y: the float32 sum the routed experts' combine wrote.
void shared_forward(moe_layer &l, Workspace &w, const void *x, int64_t T, float *y, bool inference) {
  const Backend &be = *l.backend;
  const int64_t offsets[2] = {0, T};
  moe_ffn_args a = ffn_args(l, w, true, x, offsets);
  a.y = w.ys.get();
  a.inference = inference ? 1 : 0;
  run(be, be.ops()->expert_ffn, a, "expert_ffn (shared)");
  moe_shared_args s = shared_args(l, w, x, T);
  s.y = y;
  run(be, be.ops()->shared_combine, s, "shared_combine");
}

// Slots per expert for n tokens, or -1 when dropless.
int64_t capacity_of(const Config &c, int64_t n) {
  if (!(c.c.capacity_factor > 0)) return -1;
  const int64_t nk = n * c.k;  // n <= T, and T * k was checked
  const double cap = std::max(std::ceil(static_cast<double>(c.c.capacity_factor) * static_cast<double>(nk) / c.E),
                              static_cast<double>(c.c.min_capacity));
  return cap > static_cast<double>(nk) ? nk : static_cast<int64_t>(cap);
}

// The capacity groups of T tokens: one group of the call, or capacity_group_size tokens each
// with a shorter last group, each with the capacity of its own token count.
CapacityGroups groups_of(const Config &c, int64_t T) {
  const int64_t size = c.c.capacity_group_size;
  if (size <= 0 || size >= T) return capacity_groups(T, 0, capacity_of(c, T), capacity_of(c, T));
  const int64_t last = T % size == 0 ? size : T % size;
  return capacity_groups(T, size, capacity_of(c, size), capacity_of(c, last));
}

}  // namespace

void forward(moe_layer &l, const void *x_in, int64_t T, void *y_out, moe_context *ctx, Mode mode) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const moe_backend_ops *ops = be.ops();
  Workspace &w = ctx ? ctx->ws : l.ws;
  const int64_t d = c.d, E = c.E, k = c.k;
  const bool training = mode == Mode::kTraining, ec = expert_choice(c);
  const int64_t Td = checked_mul(T, d, "num_tokens * d_model");
  const int64_t Tk = checked_mul(T, k, "num_tokens * top_k");
  const int64_t TE = checked_mul(T, E, "num_tokens * num_experts");
  if (Tk > INT32_MAX || TE > INT32_MAX)
    fail(MOE_ERR_INVALID_ARGUMENT,
         "num_tokens is %lld: num_tokens * top_k and num_tokens * num_experts must stay below 2^31", (long long)T);

  if (ctx) ctx->state = moe_context::State::kEmpty;
  RoutingSummary r;
  r.T = T;
  r.step = l.step;
  r.groups = groups_of(c, T);
  const int noise = training ? c.c.noise : MOE_NOISE_NONE;
  r.noisy = noise == MOE_NOISE_GAUSSIAN;
  // Expert choice fills at most E*C rows; token choice at most T*k.
  const int64_t max_rows = ec ? checked_mul(E, r.groups.taken(), "num_experts * capacity") : Tk;

  const bool lowp = low_precision(c);
  const void *x = x_in;
  if (training) {
    // Training keeps its own copy of x: the caller may reuse its buffer before backward.
    be.ensure(w.x, abytes(c, Td, "x"));
    be.copy(w.x.get(), x_in, abytes(c, Td, "x"));
    x = w.x.get();
  }
  // The router computes in float32 (shared/DESIGN.md section 4) from a float32 copy of x.
  const float *xf = static_cast<const float *>(x);
  if (lowp) {
    be.ensure(w.xf, fbytes(Td, "float32 x"));
    xf = f(w.xf);
  }
  // With bf16/f16 the routed and shared outputs are summed in float32, then rounded once into y.
  float *y = static_cast<float *>(y_out);
  if (lowp && mode != Mode::kRouteOnly) {
    be.ensure(w.yacc, fbytes(Td, "float32 y"));
    y = w.yacc.as<float>();
  }
  be.ensure(w.logits, fbytes(TE, "logits"));
  be.ensure(w.scores, fbytes(TE, "scores"));
  be.ensure(w.lse, fbytes(T, "lse"));
  be.ensure(w.topk_ids, ibytes(Tk, "topk ids"));
  be.ensure(w.topk_w, fbytes(Tk, "topk weights"));
  be.ensure(w.row_of_slot, ibytes(Tk, "rows"));
  be.ensure(w.row_token, ibytes(max_rows, "rows"));
  be.ensure(w.row_slot, ibytes(max_rows, "rows"));
  be.ensure(w.row_weight, fbytes(max_rows, "rows"));
  if (ec) {
    be.ensure(w.token_offsets, checked_bytes(T + 1, sizeof(int64_t), "token offsets"));
    be.ensure(w.token_rows, ibytes(max_rows, "token rows"));
  }
  if (noise == MOE_NOISE_JITTER) be.ensure(w.xr, fbytes(Td, "jittered x"));
  if (noise == MOE_NOISE_GAUSSIAN) {
    be.ensure(w.clean_logits, fbytes(TE, "clean logits"));
    be.ensure(w.noise_std, fbytes(TE, "noise std"));
    be.ensure(w.noise, fbytes(TE, "noise"));
  }
  if (c.S > 0 && mode != Mode::kRouteOnly) shared_reserve(l, w, T);
  // Host copy of router.bias for the balancing update, allocated before anything is written.
  const bool update_bias = training && c.c.bias_update_rate > 0;
  std::vector<float> bias(update_bias ? static_cast<size_t>(E) : 0);

  if (lowp) be.check(ops->convert(be.state(), w.xf.get(), MOE_DTYPE_F32, x, c.c.dtype, Td), "convert (x)");
  run(be, ops->gate, gate_args(l, w, r, noise, xf), "gate");

  r.counts.assign(E, 0);
  r.prob_sum.assign(E, 0.0);
  if (r.noisy) r.load_sum.assign(E, 0.0);
  moe_select_args sa{};
  sa.T = T;
  sa.E = E;
  sa.k = k;
  sa.score = ec ? MOE_SCORE_SOFTMAX : c.c.score;
  sa.normalize = c.c.normalize_topk;
  sa.routed_scale = c.c.routed_scale;
  sa.num_groups = c.c.num_groups;
  sa.topk_groups = c.c.topk_groups;
  sa.logits = f(w.logits);
  sa.bias = f(l.router_bias);
  sa.scores = w.scores.as<float>();
  sa.lse = w.lse.as<float>();
  sa.topk_ids = w.topk_ids.as<int32_t>();
  sa.topk_w = w.topk_w.as<float>();
  sa.expert_choice = ec;
  if (r.noisy) {
    sa.clean_logits = f(w.clean_logits);
    sa.noise_std = f(w.noise_std);
    sa.load_sum = r.load_sum.data();
  }
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
  pa.capacity = r.groups.capacity;
  pa.group_size = r.groups.count > 1 ? r.groups.size : 0;
  pa.last_capacity = r.groups.last_capacity;
  pa.drop_policy = c.c.drop_policy;
  pa.topk_ids = w.topk_ids.as<int32_t>();
  pa.topk_w = f(w.topk_w);
  pa.row_of_slot = w.row_of_slot.as<int32_t>();
  pa.row_token = w.row_token.as<int32_t>();
  pa.row_slot = w.row_slot.as<int32_t>();
  pa.row_weight = w.row_weight.as<float>();
  pa.offsets = r.offsets.data();
  pa.kept = r.kept.data();
  pa.weight_sum = r.weight_sum.data();
  pa.expert_choice = ec;
  pa.scores = f(w.scores);
  pa.token_offsets = w.token_offsets.as<int64_t>();
  pa.token_rows = w.token_rows.as<int32_t>();
  run(be, ops->plan, pa, "plan");
  r.R = r.offsets[E];
  if (ec) r.counts = r.kept;  // an expert's slots are its capacity; nothing is dropped
  r.global_T = T;
  r.global_kept = r.kept;
  if (c.ranks > 1) exchange_routing_stats(l, r);
  compute_aux_losses(c, r);

  if (mode != Mode::kRouteOnly) {
    const int64_t R = r.R;
    const int64_t Rd = checked_mul(R, d, "rows * d_model");
    be.ensure(w.xe, abytes(c, Rd, "xe"));
    be.ensure(w.ye, abytes(c, Rd, "ye"));

    moe_rows_args ra = rows_args(c, w, r);
    ra.x = x;
    ra.xe = w.xe.get();
    run(be, ops->dispatch, ra, "dispatch");

    // The rows this rank's experts compute: its own, or those the exchange brings.
    const bool ep = c.ranks > 1;
    if (ep) r.ep = plan_exchange(l, w, r);
    const int64_t rows = ep ? r.ep.recv_rows : R;
    const int64_t rff = checked_mul(rows, c.ff, "rows * d_ff");
    be.ensure(w.h, abytes(c, rff, "h"));
    if (c.glu) be.ensure(w.g, abytes(c, rff, "g"));
    be.ensure(w.a, abytes(c, rff, "a"));
    if (ep) {
      be.ensure(w.xl, abytes(c, checked_mul(rows, d, "rows * d_model"), "expert rows"));
      be.ensure(w.yl, abytes(c, checked_mul(rows, d, "rows * d_model"), "expert rows"));
      exchange_to_experts(l, w, r.ep, w.xe.get(), w.xl.get(), d);
    }
    moe_ffn_args fa =
        ffn_args(l, w, false, ep ? w.xl.get() : w.xe.get(), ep ? r.ep.local_offsets.data() : r.offsets.data());
    fa.y = ep ? w.yl.get() : w.ye.get();
    fa.inference = training ? 0 : 1;
    run(be, ops->expert_ffn, fa, "expert_ffn");
    if (ep) exchange_from_experts(l, w, r.ep, w.yl.get(), w.ye.get(), d);

    // The shared experts are made ready before y is first written, so that a forward that fails
    // for lack of memory leaves the caller's y as it was.
    const int64_t shared_offsets[2] = {0, T};
    if (c.S > 0) {
      moe_ffn_args sp = ffn_args(l, w, true, x, shared_offsets);
      sp.y = w.ys.get();
      sp.prepare = 1;
      sp.inference = training ? 0 : 1;
      run(be, ops->expert_ffn, sp, "expert_ffn (shared, prepare)");
    }
    ra.ye = w.ye.get();
    ra.y = y;
    run(be, ops->combine, ra, "combine");

    if (c.S > 0) shared_forward(l, w, x, T, y, !training);
    if (lowp) be.check(ops->convert(be.state(), y_out, c.c.dtype, y, MOE_DTYPE_F32, Td), "convert (y)");
  }

  if (update_bias && r.global_T > 0) {
    // Aux-loss-free balancing: bias[e] += u * sign(mean(n) - n_e), from loads before capacity.
    be.download(bias.data(), l.router_bias->data.get(), checked_bytes(E, sizeof(float), "router.bias"));
    double mean = 0.0;
    for (int64_t e = 0; e < E; ++e) mean += static_cast<double>(r.counts[e]);
    mean /= E;
    for (int64_t e = 0; e < E; ++e) {
      const double diff = mean - static_cast<double>(r.counts[e]);
      bias[e] += c.c.bias_update_rate * static_cast<float>((diff > 0) - (diff < 0));
    }
    be.upload(l.router_bias->data.get(), bias.data(), checked_bytes(E, sizeof(float), "router.bias"));
  }
  if (training) ++l.step;
  if (ctx) {
    ctx->route = std::move(r);
    ctx->state = training ? moe_context::State::kTrained : moe_context::State::kRouted;
    ctx->param_version = l.param_version;
  }
}

void backward(moe_layer &l, moe_context &ctx, const void *dy, void *dx_out) {
  const Config &c = l.cfg;
  const Backend &be = *l.backend;
  const moe_backend_ops *ops = be.ops();
  Workspace &w = ctx.ws;
  const RoutingSummary &r = ctx.route;
  const int64_t T = r.T, R = r.R, d = c.d, E = c.E, k = c.k;
  const bool ec = expert_choice(c);
  const bool ep = c.ranks > 1;
  const int64_t rows = ep ? r.ep.recv_rows : R;
  const int64_t Rd = checked_mul(R, d, "rows * d_model");
  const int64_t Rff = checked_mul(rows, c.ff, "rows * d_ff");
  const int64_t TE = checked_mul(T, E, "num_tokens * num_experts");
  const bool lowp = low_precision(c);
  be.ensure(w.dye, abytes(c, Rd, "dye"));
  be.ensure(w.drow_weight, fbytes(R, "drow_weight"));
  be.ensure(w.dh, abytes(c, Rff, "dh"));
  if (c.glu) be.ensure(w.dg, abytes(c, Rff, "dg"));
  be.ensure(w.dxe, abytes(c, Rd, "dxe"));
  if (ep) {
    be.ensure(w.dyl, abytes(c, checked_mul(rows, d, "rows * d_model"), "expert rows"));
    be.ensure(w.dxl, abytes(c, checked_mul(rows, d, "rows * d_model"), "expert rows"));
  }
  // With bf16/f16, dx is summed in float32 (dispatch, shared experts, router) and rounded once.
  float *dx = static_cast<float *>(dx_out);
  if (lowp && dx_out) {
    be.ensure(w.dxacc, fbytes(checked_mul(T, d, "num_tokens * d_model"), "float32 dx"));
    dx = w.dxacc.as<float>();
  }
  be.ensure(w.dlogits, fbytes(TE, "dlogits"));
  const bool load = r.noisy && c.c.load_loss_coef != 0.0f;
  if (r.noisy) be.ensure(w.gate_scratch, fbytes(checked_mul(2, TE, "2 * num_tokens * num_experts"), "gate scratch"));
  if (load) {
    be.ensure(w.dclean, fbytes(TE, "dclean"));
    be.ensure(w.dstd, fbytes(TE, "dstd"));
  }
  const int noise = r.noisy ? MOE_NOISE_GAUSSIAN : (c.c.noise == MOE_NOISE_JITTER ? MOE_NOISE_JITTER : MOE_NOISE_NONE);
  if (noise == MOE_NOISE_JITTER && dx)
    be.ensure(w.gate_scratch, fbytes(checked_mul(T, d, "num_tokens * d_model"), "gate scratch"));
  if (c.S > 0) {
    const int64_t srows = checked_mul(c.S, T, "num_shared_experts * num_tokens");
    const int64_t srff = checked_mul(srows, c.ffs, "shared rows * d_ff_shared");
    be.ensure(w.dys, abytes(c, checked_mul(srows, d, "shared rows * d_model"), "shared dy"));
    be.ensure(w.dhs, abytes(c, srff, "shared dh"));
    if (c.glu) be.ensure(w.dgs, abytes(c, srff, "shared dg"));
    if (l.sgate) be.ensure(w.shared_scratch, fbytes(T, "shared gate scratch"));
  }
  // The aux-loss coefficients, times the context's gradient scale.
  const float as = ctx.aux_grad_scale;
  std::vector<float> lb_coef(r.lb_coef), gate_coef(r.gate_coef), load_coef(r.load_coef);
  for (float &v : lb_coef) v *= as;
  for (float &v : gate_coef) v *= as;
  for (float &v : load_coef) v *= as;
  const void *x = w.x.get();
  const float *xf = lowp ? f(w.xf) : f(w.x);

  // The stages that add to a gradient, in the order they run below.
  moe_ffn_args fa =
      ffn_args(l, w, false, ep ? w.xl.get() : w.xe.get(), ep ? r.ep.local_offsets.data() : r.offsets.data());
  fa.dy = ep ? w.dyl.get() : w.dye.get();
  fa.dx = ep ? w.dxl.get() : (dx ? w.dxe.get() : nullptr);
  const int64_t shared_offsets[2] = {0, T};
  moe_shared_args sc = shared_args(l, w, x, T);
  moe_ffn_args sf = ffn_args(l, w, true, x, shared_offsets);
  if (c.S > 0) {
    sc.dy = dy;
    sc.dys = w.dys.get();
    sc.dx = dx;
    sc.dgate_w = g(l.sgate);
    sc.scratch = l.sgate ? w.shared_scratch.as<float>() : nullptr;
    sf.dy = w.dys.get();
    sf.dx = dx;
  }
  moe_gate_args ga = gate_args(l, w, r, noise, xf);
  ga.dlogits = f(w.dlogits);
  ga.dx = dx;
  ga.dw = g(l.router_w);
  ga.dlogit_bias = g(l.logit_bias);
  if (noise == MOE_NOISE_JITTER && dx) ga.scratch = w.gate_scratch.as<float>();
  if (noise == MOE_NOISE_GAUSSIAN) {
    ga.dwn = g(l.noise_w);
    ga.scratch = w.gate_scratch.as<float>();
    if (load) {
      ga.dclean_extra = f(w.dclean);
      ga.dstd_extra = f(w.dstd);
    }
  }
  // Each is made ready first (kernels, scratch): with the buffers above, everything a backward
  // allocates is allocated before the first gradient is added to, so a backward that fails for
  // lack of memory leaves every gradient and dx as they were. (The stages before the first of
  // them, up to select_bwd, add to nothing.)
  fa.prepare = sc.prepare = sf.prepare = ga.prepare = 1;
  run(be, ops->expert_ffn_bwd, fa, "expert_ffn_bwd (prepare)");
  if (c.S > 0) {
    run(be, ops->shared_combine_bwd, sc, "shared_combine_bwd (prepare)");
    run(be, ops->expert_ffn_bwd, sf, "expert_ffn_bwd (shared, prepare)");
  }
  run(be, ops->gate_bwd, ga, "gate_bwd (prepare)");
  fa.prepare = sc.prepare = sf.prepare = ga.prepare = 0;

  moe_rows_args ra = rows_args(c, w, r);
  ra.ye = w.ye.get();
  ra.dy = dy;
  ra.dye = w.dye.get();
  ra.drow_weight = w.drow_weight.as<float>();
  run(be, ops->combine_bwd, ra, "combine_bwd");

  // Router-side backward: needs only drow_weight and what the forward saved; it writes dlogits and
  // accumulates nothing, so it runs before the first stage that adds to a gradient.
  moe_select_bwd_args sb{};
  sb.T = T;
  sb.E = E;
  sb.k = k;
  sb.score = ec ? MOE_SCORE_SOFTMAX : c.c.score;
  sb.normalize = c.c.normalize_topk;
  sb.routed_scale = c.c.routed_scale;
  sb.logits = f(w.logits);
  sb.scores = f(w.scores);
  sb.lse = f(w.lse);
  sb.topk_ids = w.topk_ids.as<int32_t>();
  sb.row_of_slot = w.row_of_slot.as<int32_t>();
  sb.drow_weight = f(w.drow_weight);
  sb.lb_coef = lb_coef.data();
  sb.gate_coef = c.c.importance_loss_coef != 0.0f ? gate_coef.data() : nullptr;
  // select_bwd divides by its own T; the z-loss is a mean over the global batch.
  sb.z_coef = r.global_T > 0 ? as * c.c.z_loss_coef * static_cast<float>(T) / static_cast<float>(r.global_T) : 0.0f;
  sb.dlogits = w.dlogits.as<float>();
  sb.expert_choice = ec;
  if (ec) {
    sb.token_offsets = w.token_offsets.as<int64_t>();
    sb.token_rows = w.token_rows.as<int32_t>();
    sb.row_slot = w.row_slot.as<int32_t>();
  }
  if (load) {
    sb.clean_logits = f(w.clean_logits);
    sb.noise_std = f(w.noise_std);
    sb.load_coef = load_coef.data();
    sb.dclean_extra = w.dclean.as<float>();
    sb.dstd_extra = w.dstd.as<float>();
  }
  run(be, ops->select_bwd, sb, "select_bwd");

  // Other ranks may want the input gradient of the rows this rank computed, so with expert
  // parallelism it is always computed and sent back.
  if (ep) exchange_to_experts(l, w, r.ep, w.dye.get(), w.dyl.get(), d);
  run(be, ops->expert_ffn_bwd, fa, "expert_ffn_bwd");
  if (ep) exchange_from_experts(l, w, r.ep, w.dxl.get(), w.dxe.get(), d);

  if (dx) {
    ra.dxe = w.dxe.get();
    ra.dx = dx;
    run(be, ops->dispatch_bwd, ra, "dispatch_bwd");
  }

  if (c.S > 0) {
    run(be, ops->shared_combine_bwd, sc, "shared_combine_bwd");
    run(be, ops->expert_ffn_bwd, sf, "expert_ffn_bwd (shared)");
  }
  run(be, ops->gate_bwd, ga, "gate_bwd");
  if (lowp && dx_out)
    be.check(ops->convert(be.state(), dx_out, c.c.dtype, dx, MOE_DTYPE_F32, checked_mul(T, d, "num_tokens * d_model")),
             "convert (dx)");
}

}  // namespace moe
