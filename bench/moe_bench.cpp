// moe-bench: times libmoe's forward and forward+backward over a sweep of token counts and relates
// each time to its roofline bound on this machine (DESIGN section 8): max(FLOPs / the GEMM rate
// measured here in the layer's dtype, bytes of the expert weights the batch touches / the read
// bandwidth measured here). The GEMM rate is taken with the very primitives libmoe's CPU backend
// calls (src/cpu/gemm.cpp is compiled into this program) at the same thread count.
//
// FLOPs: forward = 2·slots·d·d_ff·(3 for GLU, 2 otherwise) + router 2·T·d·E (+ the shared experts,
// 2·T·S·d·d_ff_shared·(3|2)); backward ≈ 2× forward. slots = T·k for token choice, E·C for expert
// choice; nominal counts (slots dropped by capacity are counted). Bytes: the weights of the
// experts the batch routes to (read once by a forward; read again, and their gradients read and
// written, by a backward: 4x for forward+backward).
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
#include <memory>
#include <new>
#include <optional>
#include <omp.h>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

#include <moe/moe.h>

#include "bench_config.h"
#include "bench_device.h"
#include "cpu/gemm.h"
#include "core/half.h"
#include "ep_run.h"

using namespace moe_bench;

namespace {

void set_threads(int n) { omp_set_num_threads(n); }  // oneDNN threads with OpenMP, like libmoe

// The CPU model and the matrix instructions its figures depend on (the README asks for both).
std::string cpu_description() {
  std::string model = "unknown CPU", flags;
  if (FILE *f = std::fopen("/proc/cpuinfo", "r")) {
    char line[8192];
    while (std::fgets(line, sizeof line, f)) {
      std::string l = line;
      if (l.rfind("model name", 0) == 0 && model == "unknown CPU") model = l.substr(l.find(':') + 2);
      if (l.rfind("flags", 0) == 0 && flags.empty()) flags = l;
    }
    std::fclose(f);
  }
  while (!model.empty() && (model.back() == '\n' || model.back() == ' ')) model.pop_back();
  std::string isa;
  for (const char *fl : {"avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}) {
    const std::string word = std::string(" ") + fl;
    if (flags.find(word + " ") == std::string::npos && flags.find(word + "\n") == std::string::npos) continue;
    if (!isa.empty()) isa.push_back(' ');
    isa.append(fl);
  }
  return model + " [" + (isa.empty() ? "no AVX-512" : isa) + "]";
}

// ---- options ----------------------------------------------------------------------------------
struct Options {
  moe_config cfg{};
  int threads = 0;  // 0: leave OpenMP's default
  std::vector<int64_t> tokens = {4096};  // --tokens 1,8,64: one row per count
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
    case MOE_ACT_SWIGLU_CLAMPED: return "swiglu_clamped";
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
               "layer: every moe_config field is a flag (--preset first, then --config files, then the\n"
               "flags in order; the widths default to --d-model 512 --d-ff 1024 here):\n"
               "  --preset NAME                      a published recipe (listed below)\n"
               "  --config FILE                      one 'name = value' per line, as moe_config_set reads\n"
               "                                     it ('#' starts a comment); may be given more than once\n");
  print_field_help(f);
  std::fprintf(f,
               "run:\n"
               "  --threads N          OpenMP threads, libmoe's and oneDNN's (default: OpenMP's default)\n"
               "  --tokens T[,T...] (4096)  token counts, one row each (e.g. 1,8,64,512,4096)\n"
               "  --iters N (20)    --warmup N (3)\n"
               "  --sgemm-size N (2048)  size of the reference GEMMs (float32 and bfloat16)\n"
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
  for (auto &[f, v] : args)
    if (f == "--config") read_config_file(o.cfg, v);

  const std::map<std::string, std::function<void(const std::string &, const std::string &)>> run_flags = {
      {"--preset", [](auto &, auto &) {}},
      {"--config", [](auto &, auto &) {}},
      {"--threads", [&](auto &f, auto &v) { o.threads = static_cast<int>(to_i64(f, v)); }},
      {"--tokens",
       [&](auto &f, auto &v) {
         o.tokens.clear();
         size_t at = 0;
         while (at <= v.size()) {
           const size_t comma = std::min(v.find(',', at), v.size());
           o.tokens.push_back(to_i64(f, v.substr(at, comma - at)));
           at = comma + 1;
         }
       }},
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
    auto it = run_flags.find(f);
    if (it != run_flags.end()) {
      it->second(f, v);
      continue;
    }
    const std::string field = field_of_flag(f);
    if (field.empty()) die("unknown option '%s' (see --help)", f.c_str());
    set_field(o.cfg, field, v, f);
  }
  if (o.threads < 0) die("--threads must be >= 1");
  for (int64_t t : o.tokens)
    if (t < 1) die("--tokens must be >= 1");
  if (o.iters < 1) die("--iters must be >= 1");
  if (o.warmup < 0) die("--warmup must be >= 0");
  if (o.sgemm_size < 1) die("--sgemm-size must be >= 1");
  if (o.ep_ranks < 1 || o.ep_ranks > 1024) die("--ep-ranks must be in [1, 1024]");
  return o;
}

// ---- measurements -----------------------------------------------------------------------------
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Best-of-several rate of an n^3 GEMM in dtype (bfloat16: bf16 inputs, float32 output), with the
// primitives libmoe uses; 0 when this CPU has no kernel for the dtype.
double measure_gemm(int64_t n, int dtype, int reps) {
  moe::cpu::Gemms gemms;
  if (!gemms.supports(dtype)) return 0.0;
  moe::cpu::GemmShape s;
  s.M = s.N = s.K = n;
  s.lda = s.ldb = s.ldc = n;
  s.trans_b = true;  // weights in the [out, in] layout, as libmoe reads them
  s.a_dtype = s.b_dtype = dtype;
  s.c_dtype = MOE_DTYPE_F32;
  const moe::cpu::Gemm g = gemms.prepare(s);
  std::vector<unsigned char> scratch(g.scratch_bytes());
  const size_t es = moe::dtype_size(dtype);
  std::vector<unsigned char> a(n * n * es), b(n * n * es);
  std::vector<float> c(n * n);
  Rng rng{12345};
  for (int64_t i = 0; i < n * n; ++i) {
    moe::store_elem(a.data(), dtype, i, rng.nonzero());
    moe::store_elem(b.data(), dtype, i, rng.nonzero());
  }
  g.run(a.data(), b.data(), c.data(), scratch);  // warm up
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    g.run(a.data(), b.data(), c.data(), scratch);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * n * n * n / best / 1e9;
}

// n bytes on 2 MB pages where Linux gives them (transparent huge pages asked for, as libmoe asks
// for its weights): on 4 KB pages the same reads measured 30-34 GB/s against 42-43 on 2 MB pages
// (2 cores of an AMD EPYC Zen 4), and which one a plain allocation got depended on what the
// process had freed before, so the bound moved with it.
class PagedBuffer {
 public:
  explicit PagedBuffer(size_t n) : n_((n + kPage - 1) / kPage * kPage), p_(std::aligned_alloc(kPage, n_), std::free) {
    if (!p_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p_.get(), n_, MADV_HUGEPAGE);
#endif
  }
  template <class T>
  T *as() const {
    return static_cast<T *>(p_.get());
  }

 private:
  static constexpr size_t kPage = size_t{2} << 20;
  size_t n_;
  std::unique_ptr<void, decltype(&std::free)> p_;
};

// Best-of-several copy bandwidth (bytes read + written per second) over 512 MB, every thread
// copying its share: what streaming weights from memory can reach.
double measure_copy_gbs(int reps) {
  const size_t n = size_t{256} << 20;
  const PagedBuffer pa(n), pb(n);
  unsigned char *a = pa.as<unsigned char>(), *b = pb.as<unsigned char>();
  std::memset(a, 1, n);
  std::memset(b, 2, n);
  double best = 1e30;
  for (int r = 0; r < reps + 1; ++r) {
    auto t0 = Clock::now();
#pragma omp parallel
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num()), nt = static_cast<size_t>(omp_get_num_threads());
      const size_t begin = n / nt * t, end = t + 1 == nt ? n : n / nt * (t + 1);
      std::memcpy(b + begin, a + begin, end - begin);
    }
    if (r > 0) best = std::min(best, seconds_since(t0));  // the first run is a warm-up
  }
  return 2.0 * static_cast<double>(n) / best / 1e9;
}

// Best-of-several read bandwidth over 512 MB, every thread summing its share: the rate at which
// weights stream from memory. They are only read, and reading alone goes faster than a copy,
// whose writes cost a read of their own lines too; so this, not the copy rate, bounds the time.
double measure_read_gbs(int reps) {
  const size_t n = size_t{128} << 20;  // floats
  const PagedBuffer pa(n * sizeof(float));
  float *a = pa.as<float>();
  std::fill(a, a + n, 1.0f);
  double best = 1e30, total = 0;
  for (int r = 0; r < reps + 1; ++r) {
    auto t0 = Clock::now();
#pragma omp parallel reduction(+ : total)
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num()), nt = static_cast<size_t>(omp_get_num_threads());
      const size_t begin = n / nt * t / 64 * 64, end = t + 1 == nt ? n : n / nt * (t + 1) / 64 * 64;
      float acc[64] = {};  // independent sums, so that the adds keep up with memory
      for (size_t i = begin; i < end; i += 64)
        for (size_t j = 0; j < 64; ++j) acc[j] += a[i + j];
      for (float v : acc) total += v;
    }
    if (r > 0) best = std::min(best, seconds_since(t0));
  }
  if (total < 0) std::puts("");  // keeps the sums
  return static_cast<double>(n * sizeof(float)) / best / 1e9;
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
  int64_t tokens = 0;
  moe_config eff{};
  Timing tf, tb;
  moe_stats st{};
  bool have_stats = false;
  int64_t experts_touched = 0;  // experts with at least one row in this batch
  size_t ctx_bytes = 0;         // what a training step keeps (moe_context_memory after it)
  moe_memory mem{};
  size_t pool_after = 0;        // CUDA: the layer's memory pool once the context is destroyed
  // CPU: the read bandwidth measured just before each timing, that timing's memory bound (the
  // machine's bandwidth moves with what else runs on it: 30 to 60 GB/s within one sweep on a
  // shared 2-core AMD EPYC, where a rate measured once at the start made the bounds of later
  // rows a matter of luck). 0: none (CUDA).
  double read_f = 0, read_b = 0;
};

constexpr int kRowReads = 3;  // best of, before each timing

Measured run_single(const Options &o, int64_t tokens, Cuda *cu) {
  Measured m;
  m.tokens = tokens;
  moe_layer *layer = nullptr;
  check(moe_layer_create(&o.cfg, &layer), "moe_layer_create");
  m.eff.struct_size = sizeof m.eff;
  check(moe_layer_get_config(layer, &m.eff), "moe_layer_get_config");
  moe_context *ctx = nullptr;
  check(moe_context_create(layer, &ctx), "moe_context_create");

  // Random, non-zero activations on the layer's device.
  Rng rng{m.eff.seed ^ 0xA5A5A5A5DEADBEEFull};
  const int64_t n = tokens * m.eff.d_model;
  DeviceBuffer x(cu, random_activations(n, m.eff.dtype, rng));
  DeviceBuffer dy(cu, random_activations(n, m.eff.dtype, rng));
  const size_t act_bytes = static_cast<size_t>(n) * (m.eff.dtype == MOE_DTYPE_F32 ? 4 : 2);
  DeviceBuffer y(cu, std::vector<unsigned char>(act_bytes));
  DeviceBuffer dx(cu, std::vector<unsigned char>(act_bytes));

  check(moe_route(layer, x.p, tokens, ctx), "moe_route");
  std::vector<int64_t> counts(static_cast<size_t>(m.eff.num_experts));
  check(moe_context_expert_counts(ctx, counts.data()), "moe_context_expert_counts");
  for (int64_t c : counts) m.experts_touched += c > 0;

  if (o.fwd) {
    if (!cu) m.read_f = measure_read_gbs(kRowReads);
    m.tf = time_it(o.warmup, o.iters, cu, [&] { check(moe_forward(layer, x.p, tokens, y.p, nullptr), "moe_forward"); });
  }
  if (o.fwdbwd) {
    if (!cu) m.read_b = measure_read_gbs(kRowReads);
    m.tb = time_it(o.warmup, o.iters, cu, [&] {
      check(moe_forward(layer, x.p, tokens, y.p, ctx), "moe_forward (training)");
      check(moe_backward(layer, ctx, dy.p, dx.p), "moe_backward");
    });
    check(moe_context_memory(ctx, &m.ctx_bytes), "moe_context_memory");
  }
  m.st.struct_size = sizeof m.st;
  m.have_stats = o.fwdbwd && moe_context_stats(ctx, &m.st) == MOE_OK;
  m.mem.struct_size = sizeof m.mem;
  check(moe_layer_memory(layer, &m.mem), "moe_layer_memory");
  moe_context_destroy(ctx);
  moe_memory after{};
  after.struct_size = sizeof after;
  check(moe_layer_memory(layer, &after), "moe_layer_memory");
  m.pool_after = after.device_pool;
  moe_layer_destroy(layer);
  return m;
}

// FLOPs and weight bytes of one forward over T tokens (DESIGN section 8).
struct Work {
  double fwd_flops = 0, fwdbwd_flops = 0, fwd_bytes = 0, fwdbwd_bytes = 0;
};

Work work_of(const moe_config &eff, int64_t tokens, int64_t experts_touched) {
  const double T = static_cast<double>(tokens), d = static_cast<double>(eff.d_model);
  const double E = static_cast<double>(eff.num_experts), k = static_cast<double>(eff.top_k);
  const bool gated = eff.activation == MOE_ACT_SWIGLU || eff.activation == MOE_ACT_GEGLU ||
                     eff.activation == MOE_ACT_SWIGLU_CLAMPED;
  const double glu = gated ? 3.0 : 2.0;
  double slots = T * k;
  if (eff.routing == MOE_ROUTE_EXPERT_CHOICE)
    slots = E * std::min(T, std::ceil(static_cast<double>(eff.capacity_factor) * T * k / E));
  const double S = static_cast<double>(eff.num_shared_experts), ffs = static_cast<double>(eff.d_ff_shared);
  Work w;
  w.fwd_flops = 2.0 * slots * d * static_cast<double>(eff.d_ff) * glu + 2.0 * T * d * E + 2.0 * T * S * d * ffs * glu;
  w.fwdbwd_flops = 3.0 * w.fwd_flops;
  const double es = eff.dtype == MOE_DTYPE_F32 ? 4.0 : 2.0;
  const double expert_bytes = glu * d * static_cast<double>(eff.d_ff) * es;
  w.fwd_bytes = static_cast<double>(experts_touched) * expert_bytes + S * glu * d * ffs * es + E * d * 4.0;
  w.fwdbwd_bytes = 4.0 * w.fwd_bytes;
  return w;
}

}  // namespace

int run(int argc, char **argv) {
  Options o = parse(argc, argv);
  if (o.threads > 0) set_threads(o.threads);
  const int threads = omp_get_max_threads();
  const bool on_cuda = o.cfg.device == MOE_DEVICE_CUDA;

  // The machine's GEMM rates and memory bandwidths with the same library and thread count (CPU).
  const double f32_gflops = on_cuda ? 0.0 : measure_gemm(o.sgemm_size, MOE_DTYPE_F32, 5);
  const double bf16_gflops = on_cuda ? 0.0 : measure_gemm(o.sgemm_size, MOE_DTYPE_BF16, 5);
  const double copy_gbs = on_cuda ? 0.0 : measure_copy_gbs(3);
  const double read_gbs = on_cuda ? 0.0 : measure_read_gbs(7);
  // A bfloat16 layer runs on bfloat16 kernels where they are faster, else on float32 copies
  // (src/cpu/expert_ffn.cpp): its yardstick is the faster of the two rates. float16: float32.
  const double gemm_gflops = o.cfg.dtype == MOE_DTYPE_BF16 ? std::max(f32_gflops, bf16_gflops) : f32_gflops;

  Cuda cuda;
  if (on_cuda) {
    cuda.open();
    // The current device is per thread: the bench's buffers and synchronisations follow the layer's.
    cuda.ok(cuda.set_device(o.cfg.device_index), "cudaSetDevice");
  }
  Cuda *cu = on_cuda ? &cuda : nullptr;

  std::vector<Measured> rows;
  std::optional<EpResult> ep;
  if (o.ep_ranks > 1) {
    EpParams p;
    p.cfg = o.cfg;
    p.ranks = o.ep_ranks;
    p.tokens = o.tokens.front();
    p.warmup = o.warmup;
    p.iters = o.iters;
    p.fwd = o.fwd;
    p.fwdbwd = o.fwdbwd;
    // The ranks share the machine: each gets its share of the threads.
    p.threads_per_rank = std::max(1, threads / o.ep_ranks);
    p.cuda = cu;
    ep = run_expert_parallel(p);
    Measured m;
    m.tokens = p.tokens;
    m.eff = ep->eff;
    m.tf = ep->fwd;
    m.tb = ep->fwdbwd;
    m.st = ep->stats;
    m.have_stats = ep->have_stats;
    m.experts_touched = m.eff.num_experts;
    rows.push_back(m);
  } else {
    for (int64_t t : o.tokens) rows.push_back(run_single(o, t, cu));
  }
  const moe_config &eff = rows.front().eff;

  const std::string cpu = on_cuda ? std::string("n/a (cuda)") : cpu_description();
  const std::string blas = on_cuda ? std::string("n/a (cuda)") : moe::cpu::gemm_library();
  // A timing's read rate: its own where measured, else (expert-parallel rows) the run's.
  auto read_of = [&](double row) { return row > 0 ? row : read_gbs; };
  auto bound_ms = [&](double flops, double bytes, double read) {
    if (gemm_gflops <= 0 || read <= 0) return 0.0;
    return std::max(flops / (gemm_gflops * 1e9), bytes / (read * 1e9)) * 1e3;
  };
  const unsigned v = moe_version();

  if (o.json) {
    std::printf("{\"libmoe\": \"%u.%u.%u\", \"device\": \"%s\", \"cpu\": \"%s\", \"blas\": \"%s\", \"threads\": %d, ",
                v / 10000, v / 100 % 100, v % 100, on_cuda ? "cuda" : "cpu", cpu.c_str(), blas.c_str(), threads);
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
    std::printf("\"fields\": %s, ", fields_json(eff).c_str());
    std::printf("\"iters\": %d, \"warmup\": %d, \"gemm_size\": %lld, \"gemm_gflops\": {\"f32\": %.2f, \"bf16\": %.2f}, "
                "\"copy_gbs\": %.2f, \"read_gbs\": %.2f, \"param_bytes\": %zu, \"rows\": [",
                o.iters, o.warmup, (long long)o.sgemm_size, f32_gflops, bf16_gflops, copy_gbs, read_gbs,
                rows.front().mem.parameters);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Measured &m = rows[i];
      const Work w = work_of(eff, m.tokens, m.experts_touched);
      std::printf("%s{\"tokens\": %lld, \"experts_touched\": %lld, \"flops\": {\"fwd\": %.6g, \"fwdbwd\": %.6g}, "
                  "\"weight_bytes\": {\"fwd\": %.6g, \"fwdbwd\": %.6g}, \"saved_bytes_per_token\": %.1f",
                  i ? ", " : "", (long long)m.tokens, (long long)m.experts_touched, w.fwd_flops, w.fwdbwd_flops,
                  w.fwd_bytes, w.fwdbwd_bytes, m.tokens ? static_cast<double>(m.ctx_bytes) / m.tokens : 0.0);
      if (on_cuda)
        std::printf(", \"device_pool_bytes\": {\"with_context\": %zu, \"context_destroyed\": %zu}", m.mem.device_pool,
                    m.pool_after);
      auto entry = [&](const char *name, double flops, double bytes, const Timing &t, double read) {
        const double b = bound_ms(flops, bytes, read);
        std::printf(", \"%s\": {\"ms_median\": %.4f, \"ms_min\": %.4f, \"tokens_per_s\": %.1f, \"gflops\": %.2f, "
                    "\"read_gbs\": %.2f, \"bound_ms\": %.4f, \"of_bound\": %s, \"sgemm_fraction\": %s}",
                    name, t.median_ms, t.min_ms, m.tokens / (t.median_ms * 1e-3),
                    flops / (t.median_ms * 1e-3) / 1e9, read, b,
                    b > 0 ? std::to_string(t.median_ms / b).c_str() : "null",
                    f32_gflops > 0 ? std::to_string(flops / (t.median_ms * 1e-3) / 1e9 / f32_gflops).c_str() : "null");
      };
      if (o.fwd) entry("fwd", w.fwd_flops, w.fwd_bytes, m.tf, read_of(m.read_f));
      if (o.fwdbwd) entry("fwdbwd", w.fwdbwd_flops, w.fwdbwd_bytes, m.tb, read_of(m.read_b));
      if (m.have_stats)
        std::printf(", \"routing\": {\"dropped_slots\": %lld, \"load_cv\": %.4f, \"max_load_ratio\": %.4f}",
                    (long long)m.st.dropped_slots, m.st.load_cv, m.st.max_load_ratio);
      std::printf("}");
    }
    std::printf("], \"ep_ranks\": %d", o.ep_ranks);
    if (ep) print_ep_json(*ep);
    std::printf("}\n");
    return 0;
  }
  std::printf("moe-bench  libmoe %u.%u.%u  device %s  threads %d\n", v / 10000, v / 100 % 100, v % 100,
              on_cuda ? "cuda" : "cpu", threads);
  std::printf("cpu        %s\ngemm       %s\n", cpu.c_str(), blas.c_str());
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
  std::printf("memory     parameters %.1f MB, gradients %.1f MB\n", rows.front().mem.parameters / 1e6,
              rows.front().mem.gradients / 1e6);
  std::printf("run        iters %d (median)  warmup %d\n", o.iters, o.warmup);
  if (ep)
    std::printf("           %d expert-parallel ranks in this process: times below are of the in-process exchange\n"
                "           path (copies and barriers), not a speed claim\n",
                o.ep_ranks);
  if (!on_cuda)
    std::printf("yardsticks GEMM %lld^3: float32 %.1f GFLOP/s, bfloat16 %.1f GFLOP/s (best of 5, same library and "
                "threads); read %.1f GB/s (copy %.1f) at the start, and before each timing (read GB/s, best of %d)\n",
                (long long)o.sgemm_size, f32_gflops, bf16_gflops, read_gbs, copy_gbs, kRowReads);
  std::printf("\n%7s %-8s %10s %9s %9s %10s %9s %8s %12s\n", "tokens", "mode", "ms", "GFLOP/s", "read GB/s",
              "bound ms", "of bound", "experts", "saved B/tok");
  for (const Measured &m : rows) {
    const Work w = work_of(eff, m.tokens, m.experts_touched);
    auto row = [&](const char *name, double flops, double bytes, const Timing &t, double read) {
      const double b = bound_ms(flops, bytes, read);
      std::printf("%7lld %-8s %10.3f %9.1f %9.1f %10.3f %8.2fx %8lld", (long long)m.tokens, name, t.median_ms,
                  flops / (t.median_ms * 1e-3) / 1e9, read, b, b > 0 ? t.median_ms / b : 0.0,
                  (long long)m.experts_touched);
      if (std::string(name) == "fwd+bwd" && m.tokens)
        std::printf(" %12.0f\n", static_cast<double>(m.ctx_bytes) / m.tokens);
      else
        std::printf(" %12s\n", "");
    };
    if (o.fwd) row("fwd", w.fwd_flops, w.fwd_bytes, m.tf, read_of(m.read_f));
    if (o.fwdbwd) row("fwd+bwd", w.fwdbwd_flops, w.fwdbwd_bytes, m.tb, read_of(m.read_b));
  }
  if (on_cuda) {
    // What each row's layer held from the device: its buffers, its context's, its scratch and what
    // its pool kept for reuse; then what it still held once the context was destroyed.
    std::printf("\ndevice pool (the layer's, after its last step)\n");
    for (const Measured &m : rows)
      std::printf("%7lld tokens: %9.1f MB with the training context, %9.1f MB once it is destroyed\n",
                  (long long)m.tokens, m.mem.device_pool / 1e6, m.pool_after / 1e6);
  }
  if (rows.back().have_stats)
    std::printf("\nrouting    dropped slots %lld  load CV %.3f  max/mean load %.3f (last row)\n",
                (long long)rows.back().st.dropped_slots, rows.back().st.load_cv, rows.back().st.max_load_ratio);
  if (ep) print_ep_text(*ep);
  return 0;
}

int main(int argc, char **argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception &e) {  // the GEMM wrapper reports failures as exceptions
    std::fprintf(stderr, "moe-bench: %s\n", e.what());
    return 1;
  }
}
