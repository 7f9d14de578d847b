// The core's promise to a backend (src/core/backend.h): a stage that runs after an output or a
// gradient is first written is called first with `prepare` set and otherwise the same arguments,
// and nothing is allocated once that first write has happened. The CUDA backend sizes its scratch
// in those prepare calls (shared_combine_bwd's in bf16/f16 with a gated shared expert among
// them), so it never needs memory after a gradient has changed; and a backward that fails for
// lack of memory leaves every gradient and dx as they were.
//
// A recording backend wraps the CPU backend's table: it logs every call the core makes, in order,
// with the allocations and the arguments of the prepared stages, and can make the n-th allocation
// of a backward fail. The layers are made as moe_layer_create makes them, on that table.
#include <gtest/gtest.h>

#include <barrier>
#include <cctype>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/error.h"
#include "core/layer.h"
#include "support/half.h"
#include "support/random.h"

namespace {

using moe_test::Rng;

// ---- the recording backend ------------------------------------------------------------------------

struct Event {
  std::string op;
  int prepare = -1;  // the prepare flag of a stage that has one, else -1
  size_t bytes = 0;  // alloc
  moe_ffn_args ffn{};
  std::vector<int64_t> offsets;  // ffn.offsets[0 .. num_experts] (host memory the core may reuse)
  moe_shared_args shared{};
  moe_gate_args gate{};
};

struct Recorder {
  void *inner = nullptr;  // the CPU backend's state
  bool recording = false;
  std::vector<Event> log;
  std::map<const void *, size_t> live;  // allocations and their sizes
  int64_t allocs = 0;                    // while recording
  int64_t fail_at = 0;                   // 1-based allocation (while recording) that fails; 0: none
  bool injected = false;

  void note(const char *op, int prepare = -1) {
    if (!recording) return;
    Event e;
    e.op = op;
    e.prepare = prepare;
    log.push_back(e);
  }
  void note(const char *op, const moe_ffn_args *a) {
    note(op, a->prepare);
    if (!recording) return;
    log.back().ffn = *a;
    log.back().offsets.assign(a->offsets, a->offsets + (a->shared_input ? 2 : a->num_experts + 1));
  }
  void note(const char *op, const moe_shared_args *a) {
    note(op, a->prepare);
    if (recording) log.back().shared = *a;
  }
  void note(const char *op, const moe_gate_args *a) {
    note(op, a->prepare);
    if (recording) log.back().gate = *a;
  }
  template <class A>
  void note(const char *op, const A *) {
    note(op);
  }
};

const moe_backend_ops &cpu() { return *moe_cpu_backend(); }
Recorder &rec(void *s) { return *static_cast<Recorder *>(s); }

moe_status create(const moe_config *cfg, void **state) {
  auto r = std::make_unique<Recorder>();
  const moe_status s = cpu().create(cfg, &r->inner);
  if (s != MOE_OK) {
    if (r->inner) cpu().destroy(r->inner);
    *state = nullptr;
    return s;
  }
  *state = r.release();
  return MOE_OK;
}
void destroy(void *s) {
  std::unique_ptr<Recorder> r(&rec(s));
  cpu().destroy(r->inner);
}
const char *last_error(void *s) {
  return rec(s).injected ? "injected allocation failure" : cpu().last_error(rec(s).inner);
}
moe_status set_stream(void *s, void *stream) { return cpu().set_stream(rec(s).inner, stream); }
moe_status alloc(void *s, size_t bytes, void **out) {
  Recorder &r = rec(s);
  r.injected = false;
  if (r.recording) {
    Event e;
    e.op = "alloc";
    e.bytes = bytes;
    r.log.push_back(e);
    if (++r.allocs == r.fail_at) {
      r.injected = true;
      return MOE_ERR_OUT_OF_MEMORY;
    }
  }
  const moe_status st = cpu().alloc(r.inner, bytes, out);
  if (st == MOE_OK) r.live[*out] = bytes;
  return st;
}
void release(void *s, void *p) {
  rec(s).live.erase(p);
  rec(s).note("free");
  cpu().free(rec(s).inner, p);
}
moe_status memset_zero(void *s, void *p, size_t n) {
  rec(s).note("memset_zero");
  return cpu().memset_zero(rec(s).inner, p, n);
}
moe_status upload(void *s, void *dst, const void *src, size_t n) {
  rec(s).note("upload");
  return cpu().upload(rec(s).inner, dst, src, n);
}
moe_status download(void *s, void *dst, const void *src, size_t n) {
  rec(s).note("download");
  return cpu().download(rec(s).inner, dst, src, n);
}
moe_status copy(void *s, void *dst, const void *src, size_t n) {
  rec(s).note("copy");
  return cpu().copy(rec(s).inner, dst, src, n);
}
moe_status check_pointer(void *s, const void *p) { return cpu().check_pointer(rec(s).inner, p); }
moe_status find_nonfinite(void *s, const void *p, int dt, int64_t n, int64_t *first) {
  return cpu().find_nonfinite(rec(s).inner, p, dt, n, first);
}
moe_status convert(void *s, void *dst, int ddt, const void *src, int sdt, int64_t n) {
  rec(s).note("convert");
  return cpu().convert(rec(s).inner, dst, ddt, src, sdt, n);
}
moe_status synchronize(void *s) { return cpu().synchronize(rec(s).inner); }
void *stream_of(void *s) { return cpu().stream(rec(s).inner); }

#define MOE_RECORDED_STAGE(name, Args)               \
  moe_status name(void *s, const Args *a) {          \
    rec(s).note(#name, a);                           \
    return cpu().name(rec(s).inner, a);              \
  }
MOE_RECORDED_STAGE(gate, moe_gate_args)
MOE_RECORDED_STAGE(select, moe_select_args)
MOE_RECORDED_STAGE(plan, moe_plan_args)
MOE_RECORDED_STAGE(dispatch, moe_rows_args)
MOE_RECORDED_STAGE(expert_ffn, moe_ffn_args)
MOE_RECORDED_STAGE(combine, moe_rows_args)
MOE_RECORDED_STAGE(shared_combine, moe_shared_args)
MOE_RECORDED_STAGE(shared_combine_bwd, moe_shared_args)
MOE_RECORDED_STAGE(combine_bwd, moe_rows_args)
MOE_RECORDED_STAGE(expert_ffn_bwd, moe_ffn_args)
MOE_RECORDED_STAGE(dispatch_bwd, moe_rows_args)
MOE_RECORDED_STAGE(select_bwd, moe_select_bwd_args)
MOE_RECORDED_STAGE(gate_bwd, moe_gate_args)
#undef MOE_RECORDED_STAGE

moe_backend_ops recording_ops() {
  moe_backend_ops t = cpu();  // every entry replaced below; the ABI and the name kept
  t.create = create;
  t.destroy = destroy;
  t.last_error = last_error;
  t.set_stream = set_stream;
  t.alloc = alloc;
  t.free = release;
  t.memset_zero = memset_zero;
  t.upload = upload;
  t.download = download;
  t.copy = copy;
  t.check_pointer = check_pointer;
  t.find_nonfinite = find_nonfinite;
  t.convert = convert;
  t.synchronize = synchronize;
  t.gate = gate;
  t.select = select;
  t.plan = plan;
  t.dispatch = dispatch;
  t.expert_ffn = expert_ffn;
  t.combine = combine;
  t.shared_combine = shared_combine;
  t.shared_combine_bwd = shared_combine_bwd;
  t.combine_bwd = combine_bwd;
  t.expert_ffn_bwd = expert_ffn_bwd;
  t.dispatch_bwd = dispatch_bwd;
  t.select_bwd = select_bwd;
  t.gate_bwd = gate_bwd;
  t.stream = stream_of;
  return t;
}
const moe_backend_ops kRecording = recording_ops();

// ---- the same arguments, but for prepare ------------------------------------------------------------

// Offsets are compared by value (the core may pass them in another host array), the rest as given.
bool same_but_prepare(const moe_ffn_args &a, const moe_ffn_args &b) {
  return a.num_experts == b.num_experts && a.d == b.d && a.ff == b.ff && a.activation == b.activation &&
         a.dtype == b.dtype && a.shared_input == b.shared_input && a.x == b.x &&
         a.w1 == b.w1 && a.w3 == b.w3 && a.w2 == b.w2 && a.h == b.h && a.g == b.g && a.a == b.a && a.y == b.y &&
         a.dy == b.dy && a.dx == b.dx && a.dw1 == b.dw1 && a.dw3 == b.dw3 && a.dw2 == b.dw2 && a.dh == b.dh &&
         a.dg == b.dg;
}
bool same_but_prepare(const moe_shared_args &a, const moe_shared_args &b) {
  return a.T == b.T && a.d == b.d && a.S == b.S && a.dtype == b.dtype && a.x == b.x && a.gate_w == b.gate_w &&
         a.ys == b.ys && a.gate == b.gate && a.y == b.y && a.dy == b.dy && a.dys == b.dys && a.dx == b.dx &&
         a.dgate_w == b.dgate_w && a.scratch == b.scratch;
}
bool same_but_prepare(const moe_gate_args &a, const moe_gate_args &b) {
  return a.T == b.T && a.d == b.d && a.E == b.E && a.x == b.x && a.w == b.w && a.logits == b.logits &&
         a.noise == b.noise && a.noise_eps == b.noise_eps && a.seed == b.seed && a.step == b.step && a.wn == b.wn &&
         a.xr == b.xr && a.clean_logits == b.clean_logits && a.noise_std == b.noise_std &&
         a.noise_draws == b.noise_draws && a.dlogits == b.dlogits && a.dclean_extra == b.dclean_extra &&
         a.dstd_extra == b.dstd_extra && a.scratch == b.scratch && a.dx == b.dx && a.dw == b.dw && a.dwn == b.dwn;
}
bool same_but_prepare(const Event &a, const Event &b) {
  if (a.op != b.op) return false;
  if (a.op == "expert_ffn" || a.op == "expert_ffn_bwd") return same_but_prepare(a.ffn, b.ffn) && a.offsets == b.offsets;
  if (a.op == "shared_combine_bwd") return same_but_prepare(a.shared, b.shared);
  return same_but_prepare(a.gate, b.gate);
}

// The checks on one recorded pass: the stages `prepared` picks are each called with prepare
// first, with the arguments of their real call; and no allocation comes after the first call that
// writes an output or a gradient (a call named first_write, or the first real call of a prepared
// stage).
using Picks = bool (*)(const Event &);
void check_order(const std::vector<Event> &log, Picks prepared, const char *first_write, const std::string &what) {
  SCOPED_TRACE(what);
  size_t first = log.size();
  for (size_t i = 0; i < log.size() && first == log.size(); ++i)
    if ((prepared(log[i]) && log[i].prepare == 0) || log[i].op == first_write) first = i;
  ASSERT_LT(first, log.size()) << "no stage wrote an output";
  for (size_t i = 0; i < log.size(); ++i) {
    const Event &e = log[i];
    if (e.op == "alloc") {
      EXPECT_LT(i, first) << "an allocation of " << e.bytes << " bytes (call " << i << ") after " << log[first].op
                          << " (call " << first << ") wrote an output";
    }
    if (!prepared(e)) continue;
    if (e.prepare == 1) {
      EXPECT_LT(i, first) << e.op << " (prepare) after the first write";
      continue;
    }
    bool found = false;
    for (size_t j = 0; j < first && !found; ++j) found = log[j].prepare == 1 && same_but_prepare(log[j], e);
    EXPECT_TRUE(found) << e.op << " (call " << i << ") had no prepare call with its arguments before call " << first;
  }
}

// Backward: the stages that add to a gradient. Forward: the shared experts' FFN, after y.
bool adds_to_a_gradient(const Event &e) {
  return e.op == "expert_ffn_bwd" || e.op == "shared_combine_bwd" || e.op == "gate_bwd";
}
bool shared_ffn(const Event &e) { return e.op == "expert_ffn" && e.ffn.shared_input; }

size_t count_calls(const std::vector<Event> &log, Picks picks, int prepare) {
  size_t n = 0;
  for (const Event &e : log) n += picks(e) && e.prepare == prepare;
  return n;
}

// ---- layers on the recording table --------------------------------------------------------------------

// As moe_layer_create, on kRecording.
std::unique_ptr<moe_layer> make_layer(const moe_config &cfg) {
  auto l = std::make_unique<moe_layer>();
  l->cfg = moe::make_config(&cfg);
  l->backend = std::make_unique<moe::Backend>(&kRecording, l->cfg.c);
  moe::create_params(*l);
  return l;
}
Recorder &rec(moe_layer &l) { return rec(l.backend->state()); }

// Random bytes of n values in dtype (never zero), in a form the layer's buffers take.
std::vector<unsigned char> values(int dtype, size_t n, Rng &rng) {
  return moe_test::encode(dtype, rng.nonzeros(n, 1.0f));
}

// Every gradient set to random values, so that a change shows.
void fill_grads(moe_layer &l, Rng &rng) {
  for (moe::Param &p : l.params)
    if (p.grad.get()) {
      const std::vector<unsigned char> v = values(p.dtype, static_cast<size_t>(p.numel), rng);
      ASSERT_EQ(v.size(), p.grad.bytes()) << p.name;
      std::memcpy(p.grad.get(), v.data(), v.size());
    }
}
std::vector<std::vector<unsigned char>> grads(const moe_layer &l) {
  std::vector<std::vector<unsigned char>> out;
  for (const moe::Param &p : l.params) {
    const auto *b = p.grad.as<const unsigned char>();
    out.emplace_back(b, b + p.grad.bytes());
  }
  return out;
}

struct Case {
  const char *name;
  void (*apply)(moe_config &);
  bool dx;
};

const Case kCases[] = {
    {"f32 SwiGLU", [](moe_config &) {}, true},
    {"bf16 SwiGLU, two gated shared experts, jitter",
     [](moe_config &c) {
       c.dtype = MOE_DTYPE_BF16;
       c.num_shared_experts = 2;
       c.d_ff_shared = 16;
       c.shared_gate = 1;
       c.noise = MOE_NOISE_JITTER;
       c.noise_eps = 0.05f;
     },
     true},
    {"f16 GeGLU, a gated shared expert, no dx",
     [](moe_config &c) {
       c.dtype = MOE_DTYPE_F16;
       c.activation = MOE_ACT_GEGLU;
       c.num_shared_experts = 1;
       c.shared_gate = 1;
     },
     false},
    {"f16 GELU, shared expert, Gaussian noise with load loss",
     [](moe_config &c) {
       c.dtype = MOE_DTYPE_F16;
       c.activation = MOE_ACT_GELU;
       c.num_shared_experts = 1;
       c.noise = MOE_NOISE_GAUSSIAN;
       c.load_loss_coef = 1e-2f;
       c.importance_loss_coef = 1e-2f;
     },
     true},
    {"f32 expert choice, gated shared expert",
     [](moe_config &c) {
       c.routing = MOE_ROUTE_EXPERT_CHOICE;
       c.capacity_factor = 1.0f;
       c.num_shared_experts = 1;
       c.shared_gate = 1;
     },
     true},
    {"bf16 ReLU, capacity (probs), jitter, no dx",
     [](moe_config &c) {
       c.dtype = MOE_DTYPE_BF16;
       c.activation = MOE_ACT_RELU;
       c.capacity_factor = 0.75f;
       c.drop_policy = MOE_DROP_PROBS;
       c.noise = MOE_NOISE_JITTER;
       c.z_loss_coef = 1e-3f;
     },
     false},
};

moe_config config_of(const Case &c) {
  moe_config cfg;
  moe::config_defaults(&cfg);
  cfg.d_model = 16;
  cfg.d_ff = 24;
  cfg.seed = 5;
  c.apply(cfg);
  return cfg;
}

constexpr int64_t kT = 40;

class StageOrder : public ::testing::TestWithParam<int> {};

// One training step, recorded: the forward prepares the shared experts before y is written, the
// backward prepares every stage that adds to a gradient, with the same arguments, and allocates
// nothing after its first gradient update; the scratch the core passes has the size backend.h gives.
TEST_P(StageOrder, PrepareBeforeTheFirstWrite) {
  const Case &c = kCases[GetParam()];
  const moe_config cfg = config_of(c);
  std::unique_ptr<moe_layer> l = make_layer(cfg);
  Recorder &r = rec(*l);
  Rng rng(7);
  const int dt = cfg.dtype;
  const int64_t d = cfg.d_model, E = cfg.num_experts;
  std::vector<unsigned char> x = values(dt, kT * d, rng), dy = values(dt, kT * d, rng), y(x.size()), dx(x.size());
  fill_grads(*l, rng);
  moe_context ctx;
  ctx.layer = l.get();

  r.recording = true;
  moe::forward(*l, x.data(), kT, y.data(), &ctx, moe::Mode::kTraining);
  r.recording = false;
  check_order(r.log, shared_ffn, "combine", "forward");
  EXPECT_EQ(count_calls(r.log, shared_ffn, 1), cfg.num_shared_experts > 0 ? 1u : 0u) << "shared experts prepared";
  EXPECT_EQ(count_calls(r.log, shared_ffn, 0), cfg.num_shared_experts > 0 ? 1u : 0u) << "shared experts run";

  r.log.clear();
  r.recording = true;
  moe::backward(*l, ctx, dy.data(), c.dx ? dx.data() : nullptr);
  r.recording = false;
  check_order(r.log, adds_to_a_gradient, "", "backward");
  // Routed experts, the router, and with shared experts their combine and FFN: each once of each.
  const size_t stages = cfg.num_shared_experts > 0 ? 4 : 2;
  EXPECT_EQ(count_calls(r.log, adds_to_a_gradient, 1), stages);
  EXPECT_EQ(count_calls(r.log, adds_to_a_gradient, 0), stages);

  // The scratch the core sizes for the stages that would otherwise allocate it themselves.
  auto size_of = [&](const void *p) {
    const auto it = r.live.find(p);
    return it == r.live.end() ? size_t{0} : it->second;
  };
  for (const Event &e : r.log) {
    if (e.op == "shared_combine_bwd" && e.shared.gate_w) {
      EXPECT_GE(size_of(e.shared.scratch), sizeof(float) * kT) << "shared_combine_bwd scratch";
    }
    if (e.op == "gate_bwd" && e.gate.noise == MOE_NOISE_JITTER && e.gate.dx) {
      EXPECT_GE(size_of(e.gate.scratch), sizeof(float) * kT * d) << "gate_bwd scratch (jitter)";
    }
    if (e.op == "gate_bwd" && e.gate.noise == MOE_NOISE_GAUSSIAN) {
      EXPECT_GE(size_of(e.gate.scratch), sizeof(float) * 2 * kT * E) << "gate_bwd scratch (Gaussian)";
    }
  }
}

// Each allocation of a backward made to fail in turn: MOE_ERR_OUT_OF_MEMORY, every gradient and dx
// exactly as before, and the same backward then succeeds with the gradients of a clean run.
TEST_P(StageOrder, AFailedAllocationChangesNothing) {
  const Case &c = kCases[GetParam()];
  const moe_config cfg = config_of(c);
  std::unique_ptr<moe_layer> l = make_layer(cfg);
  Recorder &r = rec(*l);
  Rng rng(8);
  const int dt = cfg.dtype;
  const int64_t d = cfg.d_model;
  const std::vector<unsigned char> x = values(dt, kT * d, rng), dy = values(dt, kT * d, rng),
                                   dx0 = values(dt, kT * d, rng);
  fill_grads(*l, rng);
  const auto g0 = grads(*l);
  std::vector<unsigned char> y(x.size()), dx = dx0;

  // A clean step: what a backward allocates, and the gradients it gives.
  int64_t n_allocs = 0;
  std::vector<std::vector<unsigned char>> g1;
  std::vector<unsigned char> dx1;
  {
    moe_context ctx;
    ctx.layer = l.get();
    l->step = 0;
    moe::forward(*l, x.data(), kT, y.data(), &ctx, moe::Mode::kTraining);
    r.allocs = 0;
    r.recording = true;
    moe::backward(*l, ctx, dy.data(), c.dx ? dx.data() : nullptr);
    r.recording = false;
    n_allocs = r.allocs;
    g1 = grads(*l);
    dx1 = dx;
  }
  ASSERT_GT(n_allocs, 3) << "the backward should allocate its workspace";
  EXPECT_NE(g1, g0);
  for (int64_t n = 1; n <= n_allocs; ++n) {
    SCOPED_TRACE("allocation " + std::to_string(n) + " of " + std::to_string(n_allocs) + " fails");
    for (size_t i = 0; i < l->params.size(); ++i)
      if (!g0[i].empty()) std::memcpy(l->params[i].grad.get(), g0[i].data(), g0[i].size());
    dx = dx0;
    moe_context ctx;  // a fresh one: its workspace is allocated anew
    ctx.layer = l.get();
    l->step = 0;
    moe::forward(*l, x.data(), kT, y.data(), &ctx, moe::Mode::kTraining);
    r.allocs = 0;
    r.fail_at = n;
    r.recording = true;
    moe_status st = MOE_OK;
    try {
      moe::backward(*l, ctx, dy.data(), c.dx ? dx.data() : nullptr);
    } catch (const moe::Error &e) {
      st = e.status();
    }
    r.recording = false;
    r.fail_at = 0;
    r.log.clear();
    EXPECT_EQ(st, MOE_ERR_OUT_OF_MEMORY);
    EXPECT_TRUE(grads(*l) == g0) << "a gradient changed";
    EXPECT_TRUE(dx == dx0) << "dx changed";
    moe::backward(*l, ctx, dy.data(), c.dx ? dx.data() : nullptr);
    EXPECT_TRUE(grads(*l) == g1) << "the retried backward's gradients differ from a clean run's";
    EXPECT_TRUE(dx == dx1) << "the retried backward's dx differs from a clean run's";
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, StageOrder, ::testing::Range(0, static_cast<int>(std::size(kCases))),
                         [](const ::testing::TestParamInfo<int> &info) {
                           std::string n = kCases[info.param].name;
                           for (char &ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// ---- expert parallelism: the exchanges run between the first gradient update and the last -------------

// Two ranks as threads, exchanging through host memory (the recording table is the CPU's).
struct World {
  std::barrier<> sync{2};
  const void *send[2] = {};
  const int64_t *counts[2] = {};
  size_t row_bytes = 0;
};
struct RankOf {
  World *w;
  int rank;
};

moe_status counts_hook(void *user, const int64_t *send, int64_t *recv) {
  auto *r = static_cast<RankOf *>(user);
  r->w->counts[r->rank] = send;
  r->w->sync.arrive_and_wait();
  for (int q = 0; q < 2; ++q) recv[q] = r->w->counts[q][r->rank];
  r->w->sync.arrive_and_wait();
  return MOE_OK;
}

moe_status rows_hook(void *user, const void *send, const int64_t *sc, void *recv, const int64_t *, size_t row_bytes,
                     void *) {
  auto *r = static_cast<RankOf *>(user);
  World &w = *r->w;
  w.send[r->rank] = send;
  w.counts[r->rank] = sc;
  w.sync.arrive_and_wait();
  char *out = static_cast<char *>(recv);
  for (int q = 0; q < 2; ++q) {
    int64_t skip = 0;
    for (int p = 0; p < r->rank; ++p) skip += w.counts[q][p];
    const size_t n = static_cast<size_t>(w.counts[q][r->rank]) * row_bytes;
    std::memcpy(out, static_cast<const char *>(w.send[q]) + static_cast<size_t>(skip) * row_bytes, n);
    out += n;
  }
  w.sync.arrive_and_wait();
  return MOE_OK;
}

TEST(StageOrderEp, PrepareBeforeTheFirstWrite) {
  World world;
  RankOf ranks[2] = {{&world, 0}, {&world, 1}};
  moe_comm comms[2];
  std::string failures[2];
  std::vector<Event> logs[2];
  std::vector<std::thread> threads;
  for (int q = 0; q < 2; ++q) {
    comms[q] = moe_comm{sizeof(moe_comm), 2, q, &ranks[q], counts_hook, rows_hook, nullptr};
    threads.emplace_back([&, q] {
      try {
        moe_config cfg;
        moe::config_defaults(&cfg);
        cfg.d_model = 16;
        cfg.d_ff = 24;
        cfg.dtype = MOE_DTYPE_BF16;
        cfg.num_shared_experts = 1;
        cfg.shared_gate = 1;
        cfg.comm = &comms[q];
        std::unique_ptr<moe_layer> l = make_layer(cfg);
        Rng rng(20 + q);
        const int64_t T = q == 0 ? 30 : 17;
        std::vector<unsigned char> x = values(cfg.dtype, T * 16, rng), dy = values(cfg.dtype, T * 16, rng);
        std::vector<unsigned char> y(x.size()), dx(x.size());
        moe_context ctx;
        ctx.layer = l.get();
        moe::forward(*l, x.data(), T, y.data(), &ctx, moe::Mode::kTraining);
        Recorder &r = rec(*l);
        r.recording = true;
        moe::backward(*l, ctx, dy.data(), dx.data());
        r.recording = false;
        logs[q] = r.log;
      } catch (const std::exception &e) {
        failures[q] = e.what();
      }
    });
  }
  for (std::thread &t : threads) t.join();
  for (int q = 0; q < 2; ++q) {
    ASSERT_TRUE(failures[q].empty()) << "rank " << q << ": " << failures[q];
    check_order(logs[q], adds_to_a_gradient, "", "rank " + std::to_string(q));
    EXPECT_EQ(count_calls(logs[q], adds_to_a_gradient, 1), 4u) << "rank " << q;
  }
}

}  // namespace
