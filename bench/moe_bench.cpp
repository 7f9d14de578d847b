// moe-bench: times libmoe's forward and forward+backward and relates them to the machine's own
// sgemm rate, measured here with the very BLAS libmoe's CPU backend calls (src/cpu/blas.cpp is
// compiled into this program) at the same thread count.
//
// FLOPs follow DESIGN §8: forward = 2·slots·d·d_ff·(3 for GLU, 2 otherwise) + router 2·T·d·E
// (+ the shared experts, 2·T·S·d·d_ff_shared·(3|2)); backward ≈ 2× forward. slots = T·k for
// token choice, E·C for expert choice; nominal counts (slots dropped by capacity are counted).
// CUDA layers: each iteration ends with cudaDeviceSynchronize before the clock is read (the
// device's reference rates come from moe-gpu-peak, bench/gpu_peak.cu). --ep-ranks R runs R
// expert-parallel layers in this process and reports the bytes each rank sends (ep_run.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <omp.h>
#include <string>
#include <type_traits>
#include <vector>

#include <moe/moe.h>

#include "bench_device.h"
#include "cpu/blas.h"
#include "ep_run.h"

using namespace moe_bench;

// ---- BLAS thread count ----------------------------------------------------------------------
// If blas.h declares moe::cpu::set_threads(int-like), overload resolution prefers it to this
// catch-all (an ellipsis match is the worst), so the bench uses the library's own setter when it
// exists and falls back to the BLAS entry points below when it does not.
namespace moe::cpu {
struct bench_no_set_threads {};
inline bench_no_set_threads set_threads(...) { return {}; }
}  // namespace moe::cpu

// Weak references: present only when the BLAS linked in provides them.
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));
char *openblas_get_corename(void) __attribute__((weak));
char *openblas_get_config(void) __attribute__((weak));
void bli_thread_set_num_threads(long) __attribute__((weak));
}

namespace {

constexpr bool kHaveLibSetThreads =
    !std::is_same_v<decltype(moe::cpu::set_threads(1)), moe::cpu::bench_no_set_threads>;

void set_threads(int n) {
  omp_set_num_threads(n);
  if constexpr (kHaveLibSetThreads) {
    moe::cpu::set_threads(n);
  } else {
    if (openblas_set_num_threads) openblas_set_num_threads(n);
    if (bli_thread_set_num_threads) bli_thread_set_num_threads(n);
  }
}

std::string blas_description() {
  std::string s = moe::cpu::blas_name();
  if (openblas_get_config) {
    s += " (";
    s += openblas_get_config();
    if (openblas_get_corename) {
      s += ", kernel ";
      s += openblas_get_corename();
    }
    s += ")";
  }
  return s;
}

// OpenBLAS's DYNAMIC_ARCH picks its kernel from cpuid; under some hypervisors it falls back to an
// SSE3 kernel on a CPU with AVX2/AVX-512. Say so, since it changes every figure here.
void warn_slow_blas_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (!openblas_get_corename) return;
  const std::string core = openblas_get_corename();
  for (const char *fast : {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"})
    if (core.find(fast) != std::string::npos) return;
  const char *better = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : nullptr;
  if (better)
    std::fprintf(stderr,
                 "moe-bench: note: OpenBLAS chose its '%s' kernel although this CPU has %s; "
                 "OPENBLAS_CORETYPE=%s selects the faster one\n",
                 core.c_str(), better[0] == 'S' ? "AVX-512" : "AVX2", better);
#endif
}

// ---- options ----------------------------------------------------------------------------------
struct Options {
  moe_config cfg{};
  int threads = 0;  // 0: leave OpenMP's default
  int64_t tokens = 4096;
  int64_t sgemm_size = 2048;
  int ep_ranks = 1;
  int iters = 20;
  int warmup = 3;
  bool fwd = true, fwdbwd = true;
  bool json = false;
  std::string preset;
};

const char *activation_name(moe_activation a) {
  switch (a) {
    case MOE_ACT_SWIGLU: return "swiglu";
    case MOE_ACT_GEGLU: return "geglu";
    case MOE_ACT_RELU: return "relu";
    case MOE_ACT_GELU: return "gelu";
    case MOE_ACT_SILU: return "silu";
  }
  return "?";
}
const char *routing_name(moe_routing r) { return r == MOE_ROUTE_EXPERT_CHOICE ? "expert-choice" : "token-choice"; }
const char *score_name(moe_score s) { return s == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax"; }
const char *drop_name(moe_drop_policy p) { return p == MOE_DROP_PROBS ? "probs" : "position"; }
const char *noise_name(moe_noise n) {
  return n == MOE_NOISE_GAUSSIAN ? "gaussian" : n == MOE_NOISE_JITTER ? "jitter" : "none";
}
const char *dtype_name(moe_dtype d) { return d == MOE_DTYPE_BF16 ? "bf16" : d == MOE_DTYPE_F16 ? "f16" : "f32"; }

void usage(FILE *f) {
  std::fprintf(f,
               "usage: moe-bench [options]\n"
               "layer (every moe_config field; --preset is applied first, other flags then override it):\n"
               "  --preset NAME        mixtral|switch|shazeer|expert-choice|deepseek-v3|qwen2-moe\n"
               "  --d-model N (512)    --d-ff N (1024)    --experts N (8)    --top-k N (2)\n"
               "  --activation swiglu|geglu|relu|gelu|silu   --routing token-choice|expert-choice\n"
               "  --score softmax|sigmoid   --normalize 0|1   --routed-scale F\n"
               "  --groups G   --topk-groups N   --capacity F (<=0 dropless)   --drop-policy position|probs\n"
               "  --noise none|gaussian|jitter   --noise-eps F\n"
               "  --aux F   --z-loss F   --importance F   --load-loss F   --bias-update F\n"
               "  --shared S   --d-ff-shared N   --shared-gate 0|1\n"
               "  --device cpu|cuda   --device-index N   --dtype f32|bf16|f16   --tf32 0|1\n"
               "  --seed N   --check-finite 0|1\n"
               "run:\n"
               "  --threads N          OpenMP and BLAS threads (default: OpenMP's default)\n"
               "  --tokens T (4096)    --iters N (20)    --warmup N (3)\n"
               "  --sgemm-size N (2048)  size of the reference sgemm\n"
               "  --mode fwd|fwdbwd|both (both)          --json\n"
               "  --ep-ranks R (1)     R expert-parallel layers as threads of this process, T/R tokens\n"
               "                       each (threads split between them); reports the bytes each rank\n"
               "                       sends per token. Times then measure the in-process exchange path,\n"
               "                       not the speed of a networked run.\n");
}

int64_t to_i64(const std::string &flag, const std::string &v) {
  char *end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end) die("%s expects an integer, got '%s'", flag.c_str(), v.c_str());
  return x;
}
float to_f32(const std::string &flag, const std::string &v) {
  char *end = nullptr;
  float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end) die("%s expects a number, got '%s'", flag.c_str(), v.c_str());
  return x;
}
int to_bool(const std::string &flag, const std::string &v) {
  if (v == "1" || v == "true" || v == "on" || v == "yes") return 1;
  if (v == "0" || v == "false" || v == "off" || v == "no") return 0;
  die("%s expects 0 or 1, got '%s'", flag.c_str(), v.c_str());
}
template <class E>
E to_enum(const std::string &flag, const std::string &v, std::initializer_list<std::pair<const char *, E>> names) {
  for (auto &[n, e] : names)
    if (v == n) return e;
  die("%s: unknown value '%s'", flag.c_str(), v.c_str());
}

Options parse(int argc, char **argv) {
  // Split into (flag, value) pairs first; --flag=value and --flag value are both accepted.
  std::vector<std::pair<std::string, std::string>> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      usage(stdout);
      std::exit(0);
    }
    if (a == "--json") {
      args.emplace_back(a, "");
      continue;
    }
    if (a.rfind("--", 0) != 0) die("unexpected argument '%s' (see --help)", a.c_str());
    auto eq = a.find('=');
    if (eq != std::string::npos) {
      args.emplace_back(a.substr(0, eq), a.substr(eq + 1));
    } else {
      if (i + 1 >= argc) die("%s needs a value", a.c_str());
      args.emplace_back(a, argv[++i]);
    }
  }

  Options o;
  moe_config_init(&o.cfg);
  for (auto &[f, v] : args)
    if (f == "--preset") o.preset = v;
  if (!o.preset.empty()) check(moe_config_preset(&o.cfg, o.preset.c_str()), "moe_config_preset");
  o.cfg.d_model = 512;
  o.cfg.d_ff = 1024;

  moe_config &c = o.cfg;
  const std::map<std::string, std::function<void(const std::string &, const std::string &)>> handlers = {
      {"--preset", [](auto &, auto &) {}},
      {"--d-model", [&](auto &f, auto &v) { c.d_model = to_i64(f, v); }},
      {"--d-ff", [&](auto &f, auto &v) { c.d_ff = to_i64(f, v); }},
      {"--experts", [&](auto &f, auto &v) { c.num_experts = to_i64(f, v); }},
      {"--top-k", [&](auto &f, auto &v) { c.top_k = to_i64(f, v); }},
      {"--activation",
       [&](auto &f, auto &v) {
         c.activation = to_enum<moe_activation>(f, v,
                                                {{"swiglu", MOE_ACT_SWIGLU},
                                                 {"geglu", MOE_ACT_GEGLU},
                                                 {"relu", MOE_ACT_RELU},
                                                 {"gelu", MOE_ACT_GELU},
                                                 {"silu", MOE_ACT_SILU}});
       }},
      {"--routing",
       [&](auto &f, auto &v) {
         c.routing = to_enum<moe_routing>(f, v,
                                          {{"token-choice", MOE_ROUTE_TOKEN_CHOICE},
                                           {"token", MOE_ROUTE_TOKEN_CHOICE},
                                           {"expert-choice", MOE_ROUTE_EXPERT_CHOICE},
                                           {"expert", MOE_ROUTE_EXPERT_CHOICE}});
       }},
      {"--score",
       [&](auto &f, auto &v) {
         c.score = to_enum<moe_score>(f, v, {{"softmax", MOE_SCORE_SOFTMAX}, {"sigmoid", MOE_SCORE_SIGMOID}});
       }},
      {"--normalize", [&](auto &f, auto &v) { c.normalize_topk = to_bool(f, v); }},
      {"--routed-scale", [&](auto &f, auto &v) { c.routed_scale = to_f32(f, v); }},
      {"--groups", [&](auto &f, auto &v) { c.num_groups = to_i64(f, v); }},
      {"--topk-groups", [&](auto &f, auto &v) { c.topk_groups = to_i64(f, v); }},
      {"--capacity", [&](auto &f, auto &v) { c.capacity_factor = to_f32(f, v); }},
      {"--drop-policy",
       [&](auto &f, auto &v) {
         c.drop_policy =
             to_enum<moe_drop_policy>(f, v, {{"position", MOE_DROP_POSITION}, {"probs", MOE_DROP_PROBS}});
       }},
      {"--noise",
       [&](auto &f, auto &v) {
         c.noise = to_enum<moe_noise>(
             f, v, {{"none", MOE_NOISE_NONE}, {"gaussian", MOE_NOISE_GAUSSIAN}, {"jitter", MOE_NOISE_JITTER}});
       }},
      {"--noise-eps", [&](auto &f, auto &v) { c.noise_eps = to_f32(f, v); }},
      {"--aux", [&](auto &f, auto &v) { c.aux_loss_coef = to_f32(f, v); }},
      {"--z-loss", [&](auto &f, auto &v) { c.z_loss_coef = to_f32(f, v); }},
      {"--importance", [&](auto &f, auto &v) { c.importance_loss_coef = to_f32(f, v); }},
      {"--load-loss", [&](auto &f, auto &v) { c.load_loss_coef = to_f32(f, v); }},
      {"--bias-update", [&](auto &f, auto &v) { c.bias_update_rate = to_f32(f, v); }},
      {"--shared", [&](auto &f, auto &v) { c.num_shared_experts = to_i64(f, v); }},
      {"--d-ff-shared", [&](auto &f, auto &v) { c.d_ff_shared = to_i64(f, v); }},
      {"--shared-gate", [&](auto &f, auto &v) { c.shared_gate = to_bool(f, v); }},
      {"--device",
       [&](auto &f, auto &v) {
         c.device = to_enum<moe_device>(f, v, {{"cpu", MOE_DEVICE_CPU}, {"cuda", MOE_DEVICE_CUDA}});
       }},
      {"--device-index", [&](auto &f, auto &v) { c.device_index = static_cast<int>(to_i64(f, v)); }},
      {"--dtype",
       [&](auto &f, auto &v) {
         c.dtype = to_enum<moe_dtype>(f, v, {{"f32", MOE_DTYPE_F32}, {"bf16", MOE_DTYPE_BF16}, {"f16", MOE_DTYPE_F16}});
       }},
      {"--tf32", [&](auto &f, auto &v) { c.allow_tf32 = to_bool(f, v); }},
      {"--seed", [&](auto &f, auto &v) { c.seed = static_cast<uint64_t>(to_i64(f, v)); }},
      {"--check-finite", [&](auto &f, auto &v) { c.check_finite = to_bool(f, v); }},
      {"--threads", [&](auto &f, auto &v) { o.threads = static_cast<int>(to_i64(f, v)); }},
      {"--tokens", [&](auto &f, auto &v) { o.tokens = to_i64(f, v); }},
      {"--sgemm-size", [&](auto &f, auto &v) { o.sgemm_size = to_i64(f, v); }},
      {"--iters", [&](auto &f, auto &v) { o.iters = static_cast<int>(to_i64(f, v)); }},
      {"--warmup", [&](auto &f, auto &v) { o.warmup = static_cast<int>(to_i64(f, v)); }},
      {"--ep-ranks", [&](auto &f, auto &v) { o.ep_ranks = static_cast<int>(to_i64(f, v)); }},
      {"--mode",
       [&](auto &f, auto &v) {
         int m = to_enum<int>(f, v, {{"fwd", 1}, {"fwdbwd", 2}, {"both", 3}});
         o.fwd = m & 1;
         o.fwdbwd = m & 2;
       }},
      {"--json", [&](auto &, auto &) { o.json = true; }},
  };
  for (auto &[f, v] : args) {
    auto it = handlers.find(f);
    if (it == handlers.end()) die("unknown option '%s' (see --help)", f.c_str());
    it->second(f, v);
  }
  if (o.threads < 0) die("--threads must be >= 1");
  if (o.tokens < 1) die("--tokens must be >= 1");
  if (o.iters < 1) die("--iters must be >= 1");
  if (o.warmup < 0) die("--warmup must be >= 0");
  if (o.sgemm_size < 1) die("--sgemm-size must be >= 1");
  if (o.ep_ranks < 1 || o.ep_ranks > 1024) die("--ep-ranks must be in [1, 1024]");
  return o;
}

// ---- measurements -----------------------------------------------------------------------------
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Best-of-several sgemm rate, n^3 (2048 unless --sgemm-size), in GFLOP/s.
double measure_sgemm(int64_t n, int reps) {
  std::vector<float> a(n * n), b(n * n), c(n * n, 0.0f);
  Rng rng{12345};
  for (auto &v : a) v = rng.nonzero();
  for (auto &v : b) v = rng.nonzero();
  moe::cpu::sgemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);  // warm up
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    moe::cpu::sgemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * n * n * n / best / 1e9;
}

Timing time_it(int warmup, int iters, Cuda *cuda, const std::function<void()> &step) {
  for (int i = 0; i < warmup; ++i) step();
  if (cuda) cuda->ok(cuda->sync(), "cudaDeviceSynchronize");
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    step();
    if (cuda) cuda->ok(cuda->sync(), "cudaDeviceSynchronize");
    ms.push_back(seconds_since(t0) * 1e3);
  }
  return summarize(std::move(ms));
}

// One layer holding every expert: the figures the comparisons use.
struct Measured {
  moe_config eff{};
  Timing tf, tb;
  moe_stats st{};
  bool have_stats = false;
};

Measured run_single(const Options &o, Cuda *cu) {
  Measured m;
  moe_layer *layer = nullptr;
  check(moe_layer_create(&o.cfg, &layer), "moe_layer_create");
  m.eff.struct_size = sizeof m.eff;
  check(moe_layer_get_config(layer, &m.eff), "moe_layer_get_config");
  moe_context *ctx = nullptr;
  check(moe_context_create(layer, &ctx), "moe_context_create");

  // Random, non-zero activations on the layer's device.
  Rng rng{m.eff.seed ^ 0xA5A5A5A5DEADBEEFull};
  const int64_t n = o.tokens * m.eff.d_model;
  DeviceBuffer x(cu, random_activations(n, m.eff.dtype, rng));
  DeviceBuffer dy(cu, random_activations(n, m.eff.dtype, rng));
  const size_t act_bytes = static_cast<size_t>(n) * (m.eff.dtype == MOE_DTYPE_F32 ? 4 : 2);
  DeviceBuffer y(cu, std::vector<unsigned char>(act_bytes));
  DeviceBuffer dx(cu, std::vector<unsigned char>(act_bytes));

  if (o.fwd)
    m.tf = time_it(o.warmup, o.iters, cu, [&] { check(moe_forward(layer, x.p, o.tokens, y.p, nullptr), "moe_forward"); });
  if (o.fwdbwd)
    m.tb = time_it(o.warmup, o.iters, cu, [&] {
      check(moe_forward(layer, x.p, o.tokens, y.p, ctx), "moe_forward (training)");
      check(moe_backward(layer, ctx, dy.p, dx.p), "moe_backward");
    });
  m.st.struct_size = sizeof m.st;
  m.have_stats = o.fwdbwd && moe_context_stats(ctx, &m.st) == MOE_OK;
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  return m;
}

}  // namespace

int run(int argc, char **argv) {
  Options o = parse(argc, argv);
  if (o.threads > 0) set_threads(o.threads);
  const int threads = omp_get_max_threads();
  const bool on_cuda = o.cfg.device == MOE_DEVICE_CUDA;

  // The machine's sgemm rate with the same BLAS and thread count (CPU layers only).
  const double sgemm_gflops = on_cuda ? 0.0 : measure_sgemm(o.sgemm_size, 5);
  if (!on_cuda) warn_slow_blas_kernel();

  Cuda cuda;
  if (on_cuda) {
    cuda.open();
    // The current device is per thread: the bench's buffers and synchronisations follow the layer's.
    cuda.ok(cuda.set_device(o.cfg.device_index), "cudaSetDevice");
  }
  Cuda *cu = on_cuda ? &cuda : nullptr;

  Measured m;
  std::optional<EpResult> ep;
  if (o.ep_ranks > 1) {
    EpParams p;
    p.cfg = o.cfg;
    p.ranks = o.ep_ranks;
    p.tokens = o.tokens;
    p.warmup = o.warmup;
    p.iters = o.iters;
    p.fwd = o.fwd;
    p.fwdbwd = o.fwdbwd;
    // The ranks share the machine: each gets its share of the threads.
    p.threads_per_rank = std::max(1, threads / o.ep_ranks);
    p.cuda = cu;
    ep = run_expert_parallel(p);
    m.eff = ep->eff;
    m.tf = ep->fwd;
    m.tb = ep->fwdbwd;
    m.st = ep->stats;
    m.have_stats = ep->have_stats;
  } else {
    m = run_single(o, cu);
  }
  const moe_config &eff = m.eff;
  const Timing &tf = m.tf, &tb = m.tb;
  const moe_stats &st = m.st;
  const bool have_stats = m.have_stats;

  // FLOPs per iteration (DESIGN §8), of the global batch.
  const double T = static_cast<double>(o.tokens), d = static_cast<double>(eff.d_model);
  const double E = static_cast<double>(eff.num_experts), k = static_cast<double>(eff.top_k);
  const auto glu_factor = [](moe_activation a) { return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU ? 3.0 : 2.0; };
  double slots = T * k;
  if (eff.routing == MOE_ROUTE_EXPERT_CHOICE)
    slots = E * std::min(T, std::ceil(static_cast<double>(eff.capacity_factor) * T * k / E));
  double fwd_flops = 2.0 * slots * d * static_cast<double>(eff.d_ff) * glu_factor(eff.activation) + 2.0 * T * d * E;
  fwd_flops += 2.0 * T * static_cast<double>(eff.num_shared_experts) * d * static_cast<double>(eff.d_ff_shared) *
               glu_factor(eff.activation);
  const double fwdbwd_flops = 3.0 * fwd_flops;

  const std::string blas = on_cuda ? std::string("n/a (cuda)") : blas_description();
  auto gflops = [](double flops, const Timing &t) { return flops / (t.median_ms * 1e-3) / 1e9; };
  auto tokps = [&](const Timing &t) { return T / (t.median_ms * 1e-3); };
  const unsigned v = moe_version();

  if (o.json) {
    std::printf("{\"libmoe\": \"%u.%u.%u\", \"device\": \"%s\", \"blas\": \"%s\", \"threads\": %d, ", v / 10000,
                v / 100 % 100, v % 100, on_cuda ? "cuda" : "cpu", blas.c_str(), threads);
    std::printf(
        "\"config\": {\"preset\": \"%s\", \"d_model\": %lld, \"d_ff\": %lld, \"experts\": %lld, \"top_k\": %lld, "
        "\"activation\": \"%s\", \"routing\": \"%s\", \"score\": \"%s\", \"normalize\": %d, \"routed_scale\": %g, "
        "\"groups\": %lld, \"topk_groups\": %lld, \"capacity\": %g, \"drop_policy\": \"%s\", \"noise\": \"%s\", "
        "\"aux\": %g, \"z_loss\": %g, \"shared\": %lld, \"d_ff_shared\": %lld, \"shared_gate\": %d, "
        "\"dtype\": \"%s\", \"seed\": %llu}, ",
        o.preset.c_str(), (long long)eff.d_model, (long long)eff.d_ff, (long long)eff.num_experts,
        (long long)eff.top_k, activation_name(eff.activation), routing_name(eff.routing), score_name(eff.score),
        eff.normalize_topk, eff.routed_scale, (long long)eff.num_groups, (long long)eff.topk_groups,
        eff.capacity_factor, drop_name(eff.drop_policy), noise_name(eff.noise), eff.aux_loss_coef, eff.z_loss_coef,
        (long long)eff.num_shared_experts, (long long)eff.d_ff_shared, eff.shared_gate, dtype_name(eff.dtype),
        (unsigned long long)eff.seed);
    std::printf("\"tokens\": %lld, \"iters\": %d, \"warmup\": %d, \"sgemm_size\": %lld, \"sgemm_gflops\": %.2f, ",
                (long long)o.tokens, o.iters, o.warmup, (long long)o.sgemm_size, sgemm_gflops);
    std::printf("\"flops\": {\"fwd\": %.6g, \"fwdbwd\": %.6g}", fwd_flops, fwdbwd_flops);
    auto entry = [&](const char *name, double flops, const Timing &t) {
      std::printf(", \"%s\": {\"ms_median\": %.4f, \"ms_min\": %.4f, \"tokens_per_s\": %.1f, \"gflops\": %.2f, "
                  "\"sgemm_fraction\": %s}",
                  name, t.median_ms, t.min_ms, tokps(t), gflops(flops, t),
                  sgemm_gflops > 0 ? std::to_string(gflops(flops, t) / sgemm_gflops).c_str() : "null");
    };
    if (o.fwd) entry("fwd", fwd_flops, tf);
    if (o.fwdbwd) entry("fwdbwd", fwdbwd_flops, tb);
    if (have_stats)
      std::printf(", \"routing\": {\"dropped_slots\": %lld, \"load_cv\": %.4f, \"max_load_ratio\": %.4f}",
                  (long long)st.dropped_slots, st.load_cv, st.max_load_ratio);
    std::printf(", \"ep_ranks\": %d", o.ep_ranks);
    if (ep) print_ep_json(*ep);
    std::printf("}\n");
  } else {
    std::printf("moe-bench  libmoe %u.%u.%u  device %s  threads %d\n", v / 10000, v / 100 % 100, v % 100,
                on_cuda ? "cuda" : "cpu", threads);
    std::printf("blas       %s\n", blas.c_str());
    std::printf("layer      %s%sd_model %lld  d_ff %lld  experts %lld  top-k %lld  %s  %s %s%s",
                o.preset.empty() ? "" : "preset ", o.preset.empty() ? "" : (o.preset + "  ").c_str(),
                (long long)eff.d_model, (long long)eff.d_ff, (long long)eff.num_experts, (long long)eff.top_k,
                activation_name(eff.activation), routing_name(eff.routing), score_name(eff.score),
                eff.capacity_factor > 0 ? "" : "  dropless");
    if (eff.capacity_factor > 0) std::printf("  capacity %g (%s)", eff.capacity_factor, drop_name(eff.drop_policy));
    if (eff.num_groups > 1) std::printf("  groups %lld keep %lld", (long long)eff.num_groups, (long long)eff.topk_groups);
    if (eff.num_shared_experts > 0)
      std::printf("  shared %lld x %lld%s", (long long)eff.num_shared_experts, (long long)eff.d_ff_shared,
                  eff.shared_gate ? " gated" : "");
    std::printf("  %s\n", dtype_name(eff.dtype));
    std::printf("run        tokens %lld  iters %d (median)  warmup %d\n", (long long)o.tokens, o.iters, o.warmup);
    if (ep)
      std::printf("           %d expert-parallel ranks in this process: times below are of the in-process exchange\n"
                  "           path (copies and barriers), not a speed claim\n",
                  o.ep_ranks);
    if (!on_cuda)
      std::printf("sgemm      %lld^3: %.1f GFLOP/s (best of 5, same BLAS and threads)\n", (long long)o.sgemm_size,
                  sgemm_gflops);
    std::printf("flops      fwd %.3g  fwd+bwd %.3g per iteration\n\n", fwd_flops, fwdbwd_flops);
    std::printf("%-9s %12s %10s %14s %10s %9s\n", "mode", "ms/iter", "min ms", "tokens/s", "GFLOP/s", "of sgemm");
    auto row = [&](const char *name, double flops, const Timing &t) {
      std::printf("%-9s %12.3f %10.3f %14.0f %10.1f", name, t.median_ms, t.min_ms, tokps(t), gflops(flops, t));
      if (sgemm_gflops > 0) std::printf(" %8.1f%%\n", 100.0 * gflops(flops, t) / sgemm_gflops);
      else std::printf(" %9s\n", "n/a");
    };
    if (o.fwd) row("fwd", fwd_flops, tf);
    if (o.fwdbwd) row("fwd+bwd", fwdbwd_flops, tb);
    if (have_stats)
      std::printf("\nrouting    dropped slots %lld  load CV %.3f  max/mean load %.3f\n", (long long)st.dropped_slots,
                  st.load_cv, st.max_load_ratio);
    if (ep) print_ep_text(*ep);
  }

  return 0;
}

int main(int argc, char **argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception &e) {  // moe::cpu::sgemm reports failures as exceptions
    std::fprintf(stderr, "moe-bench: %s\n", e.what());
    return 1;
  }
}
