// The thread-safety contract of moe.h: different layers may be used from different threads at
// once; one layer (and its contexts) by one thread at a time, so threads sharing a layer hold the
// caller's lock; errors are per thread. Run in the ordinary build (results must equal the
// single-threaded reference bit for bit) and under ThreadSanitizer (scripts/sanitize.sh), where any
// data race inside libmoe between the threads is reported.
#include <moe/moe.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "support/random.h"

namespace {

std::atomic<int> g_failures{0};

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
      ++g_failures;                                       \
    }                                                     \
  } while (0)

using moe_test::inputs;

constexpr int64_t kT = 16;

// A config per layer index: the recipes differ so that the threads run different code paths.
moe_config config_for(int i) {
  moe_config cfg;
  moe_config_init(&cfg);
  const char *presets[] = {"mixtral", "switch", "shazeer", "expert-choice", "qwen2-moe"};
  if (i % 6 < 5) moe_config_preset(&cfg, presets[i % 6]);
  cfg.d_model = 8;
  cfg.d_ff = 12;
  if (cfg.num_experts > 8) cfg.num_experts = 8;
  if (cfg.top_k > 2) cfg.top_k = 2;
  cfg.seed = static_cast<uint64_t>(100 + i);
  cfg.z_loss_coef = 0.001f;
  return cfg;
}

// What one layer produces over `steps` training steps: y and dx of each, the final gradients.
struct Result {
  std::vector<float> bits;
};

void append(Result &r, const std::vector<float> &v) { r.bits.insert(r.bits.end(), v.begin(), v.end()); }

Result run_layer(int i, int steps) {
  Result r;
  const moe_config cfg = config_for(i);
  moe_layer *l = nullptr;
  moe_status s = moe_layer_create(&cfg, &l);
  CHECK(s == MOE_OK, "layer %d: %s", i, moe_last_error());
  if (s != MOE_OK) return r;
  moe_context *ctx = nullptr, *rctx = nullptr;
  CHECK(moe_context_create(l, &ctx) == MOE_OK, "%s", moe_last_error());
  CHECK(moe_context_create(l, &rctx) == MOE_OK, "%s", moe_last_error());
  const int64_t d = cfg.d_model;
  for (int step = 0; step < steps; ++step) {
    const std::vector<float> x = inputs(kT * d, 10 * i + step), dy = inputs(kT * d, 1000 + step);
    std::vector<float> y(kT * d), dx(kT * d), yi(kT * d);
    CHECK(moe_forward(l, x.data(), kT, y.data(), ctx) == MOE_OK, "layer %d: %s", i, moe_last_error());
    CHECK(moe_backward(l, ctx, dy.data(), dx.data()) == MOE_OK, "layer %d: %s", i, moe_last_error());
    CHECK(moe_forward(l, x.data(), kT, yi.data(), nullptr) == MOE_OK, "layer %d: %s", i, moe_last_error());
    CHECK(moe_route(l, x.data(), kT, rctx) == MOE_OK, "layer %d: %s", i, moe_last_error());
    // An error on this thread: its text is this thread's, whatever the others do.
    const std::string want = "num_tokens is -" + std::to_string(i + 1);
    CHECK(moe_forward(l, x.data(), -(i + 1), y.data(), nullptr) == MOE_ERR_INVALID_ARGUMENT, "layer %d", i);
    CHECK(std::string(moe_last_error()).find(want) != std::string::npos, "thread %d sees \"%s\"", i, moe_last_error());
    moe_stats st;
    std::memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK(moe_context_stats(ctx, &st) == MOE_OK, "%s", moe_last_error());
    append(r, y);
    append(r, dx);
    append(r, yi);
    r.bits.push_back(st.aux_loss_total);
  }
  for (int p = 0; p < moe_layer_num_params(l); ++p) {
    moe_param_info info{};
    CHECK(moe_layer_param_info(l, p, &info) == MOE_OK, "%s", moe_last_error());
    int64_t n = 1;
    for (int j = 0; j < info.ndim; ++j) n *= info.shape[j];
    std::vector<float> v(n);
    if (info.trainable) {
      CHECK(moe_layer_get_grad(l, info.name, v.data(), n) == MOE_OK, "%s", moe_last_error());
      append(r, v);
    }
    CHECK(moe_layer_get_param(l, info.name, v.data(), n) == MOE_OK, "%s", moe_last_error());
    append(r, v);
  }
  moe_context_destroy(rctx);
  moe_layer_destroy(l);  // before its last context: the deferred path
  moe_context_destroy(ctx);
  return r;
}

bool same(const Result &a, const Result &b) {
  return a.bits.size() == b.bits.size() && std::memcmp(a.bits.data(), b.bits.data(), a.bits.size() * 4) == 0;
}

// Many layers, each used by its own thread, all at once.
void many_layers(int threads, int steps) {
  std::vector<Result> ref(threads), got(threads);
  for (int i = 0; i < threads; ++i) ref[i] = run_layer(i, steps);
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back([&, i] { got[i] = run_layer(i, steps); });
  for (auto &t : pool) t.join();
  for (int i = 0; i < threads; ++i) CHECK(same(ref[i], got[i]), "layer %d differs when run beside others", i);
  std::printf("[ threads  ] %d layers on %d threads at once, %d training steps each: identical to single-threaded\n",
              threads, threads, steps);
}

// One layer shared by several threads behind the caller's lock; each thread has its own context.
// Inference results must equal the reference; the gradients add up over every thread's backward.
void shared_layer(int threads, int iters) {
  moe_config cfg = config_for(0);  // no noise, no bias update: outputs do not depend on the order
  moe_layer *l = nullptr;
  CHECK(moe_layer_create(&cfg, &l) == MOE_OK, "%s", moe_last_error());
  const int64_t d = cfg.d_model;
  const std::vector<float> x = inputs(kT * d, 7), dy = inputs(kT * d, 8);
  std::vector<float> y_ref(kT * d), yt_ref(kT * d), dx_ref(kT * d);
  moe_context *c0 = nullptr;
  CHECK(moe_context_create(l, &c0) == MOE_OK, "%s", moe_last_error());
  CHECK(moe_forward(l, x.data(), kT, y_ref.data(), nullptr) == MOE_OK, "%s", moe_last_error());
  CHECK(moe_forward(l, x.data(), kT, yt_ref.data(), c0) == MOE_OK, "%s", moe_last_error());
  CHECK(moe_backward(l, c0, dy.data(), dx_ref.data()) == MOE_OK, "%s", moe_last_error());
  const int64_t nw = cfg.num_experts * cfg.d_ff * d;
  std::vector<float> g1(nw);
  CHECK(moe_layer_get_grad(l, "experts.w1", g1.data(), nw) == MOE_OK, "%s", moe_last_error());
  CHECK(moe_layer_zero_grad(l) == MOE_OK, "%s", moe_last_error());
  moe_context_destroy(c0);

  std::mutex lock;
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&] {
      moe_context *ctx = nullptr;
      {
        std::lock_guard<std::mutex> g(lock);
        CHECK(moe_context_create(l, &ctx) == MOE_OK, "%s", moe_last_error());
      }
      for (int it = 0; it < iters; ++it) {
        std::vector<float> y(kT * d), yt(kT * d), dx(kT * d);
        std::lock_guard<std::mutex> g(lock);
        CHECK(moe_forward(l, x.data(), kT, y.data(), nullptr) == MOE_OK, "%s", moe_last_error());
        CHECK(moe_forward(l, x.data(), kT, yt.data(), ctx) == MOE_OK, "%s", moe_last_error());
        CHECK(moe_backward(l, ctx, dy.data(), dx.data()) == MOE_OK, "%s", moe_last_error());
        CHECK(std::memcmp(y.data(), y_ref.data(), y.size() * 4) == 0, "shared layer: inference output differs");
        CHECK(std::memcmp(yt.data(), yt_ref.data(), yt.size() * 4) == 0, "shared layer: training output differs");
        CHECK(std::memcmp(dx.data(), dx_ref.data(), dx.size() * 4) == 0, "shared layer: dx differs");
      }
      std::lock_guard<std::mutex> g(lock);
      moe_context_destroy(ctx);
    });
  for (auto &t : pool) t.join();
  std::vector<float> g(nw);
  CHECK(moe_layer_get_grad(l, "experts.w1", g.data(), nw) == MOE_OK, "%s", moe_last_error());
  const float n = static_cast<float>(threads * iters);
  for (int64_t i = 0; i < nw; ++i)
    CHECK(std::fabs(g[i] - n * g1[i]) <= 1e-4f * (1.0f + std::fabs(n * g1[i])), "grad %lld: %g vs %g", (long long)i,
          g[i], n * g1[i]);
  moe_layer_destroy(l);
  std::printf("[ threads  ] one layer shared by %d threads behind a lock, %d steps each: consistent\n", threads, iters);
}

}  // namespace

int main(int argc, char **argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 8;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 3;
  many_layers(threads, steps);
  shared_layer(4, steps * 2);
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures.load());
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}
