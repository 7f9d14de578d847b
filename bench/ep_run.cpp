#include "ep_run.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "ep_comm.h"

namespace moe_bench {
namespace {

// A failure on one rank leaves the others waiting in a hook for ever: end the process at once
// (std::exit from a rank thread would run destructors under the others' feet).
void rank_check(moe_status st, int rank, const char *what) {
  if (st == MOE_OK) return;
  std::fprintf(stderr, "moe-bench: rank %d: %s failed: %s: %s\n", rank, what, moe_status_name(st), moe_last_error());
  std::fflush(stderr);
  std::_Exit(1);
}

size_t element_size(moe_dtype d) { return d == MOE_DTYPE_F32 ? 4 : 2; }

struct RankState {
  moe_layer *layer = nullptr;
  moe_context *ctx = nullptr;
  std::unique_ptr<DeviceBuffer> x, dy, y, dx;
  ~RankState() {
    moe_context_destroy(ctx);
    moe_layer_destroy(layer);
  }
};

PerToken per_token(const std::vector<uint64_t> &bytes, const std::vector<int64_t> &tokens) {
  PerToken p;
  int counted = 0;
  for (size_t r = 0; r < bytes.size(); ++r) {
    if (tokens[r] == 0) {
      p.per_rank.push_back(-1);
      continue;
    }
    const double v = static_cast<double>(bytes[r]) / static_cast<double>(tokens[r]);
    p.per_rank.push_back(v);
    p.mean += v;
    p.max = std::max(p.max, v);
    ++counted;
  }
  if (counted) p.mean /= counted;
  return p;
}

}  // namespace

EpResult run_expert_parallel(const EpParams &p) {
  const int R = p.ranks;
  EpResult res;
  res.threads_per_rank = p.threads_per_rank;
  for (int r = 0; r < R; ++r) res.tokens.push_back(p.tokens / R + (r < p.tokens % R ? 1 : 0));

  Cuda *cuda = p.cuda;
  auto copy = [cuda](void *dst, const void *src, size_t n) {
    if (cuda)
      cuda->ok(cuda->memcpy_(dst, src, n, 4 /* cudaMemcpyDefault: either side may be host or device */),
               "cudaMemcpy (in-process exchange)");
    else
      std::memcpy(dst, src, n);
  };
  std::function<void()> after;
  if (cuda) after = [cuda] { cuda->ok(cuda->sync(), "cudaDeviceSynchronize (in-process exchange)"); };
  // Token rows are d_model values of the layer's dtype.
  InProcessWorld world(R, p.cfg.d_model, {element_size(p.cfg.dtype)}, copy, after);

  // Layers and buffers are made here, before any rank thread starts: creation is not collective,
  // and a bad configuration then fails before any rank waits for another.
  std::vector<RankState> st(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    moe_config c = p.cfg;
    c.comm = world.comm(r);
    check(moe_layer_create(&c, &st[r].layer), "moe_layer_create (expert-parallel rank)");
    check(moe_context_create(st[r].layer, &st[r].ctx), "moe_context_create");
    Rng rng{p.cfg.seed ^ (0x5DEECE66Dull * static_cast<uint64_t>(r + 1))};
    const int64_t n = res.tokens[r] * p.cfg.d_model;
    st[r].x = std::make_unique<DeviceBuffer>(cuda, random_activations(n, p.cfg.dtype, rng));
    st[r].dy = std::make_unique<DeviceBuffer>(cuda, random_activations(n, p.cfg.dtype, rng));
    const std::vector<unsigned char> zeros(static_cast<size_t>(n) * element_size(p.cfg.dtype));
    st[r].y = std::make_unique<DeviceBuffer>(cuda, zeros);
    st[r].dx = std::make_unique<DeviceBuffer>(cuda, zeros);
  }
  res.eff.struct_size = sizeof res.eff;
  check(moe_layer_get_config(st[0].layer, &res.eff), "moe_layer_get_config");

  std::vector<double> fwd_ms, fwdbwd_ms;
  using Clock = std::chrono::steady_clock;
  auto rank_main = [&](int r) {
    omp_set_num_threads(p.threads_per_rank);
    if (cuda) cuda->ok(cuda->set_device(p.cfg.device_index), "cudaSetDevice (rank thread)");
    RankState &s = st[r];
    const int64_t T = res.tokens[r];
    auto forward = [&](moe_context *ctx) {
      rank_check(moe_forward(s.layer, s.x->p, T, s.y->p, ctx), r, ctx ? "moe_forward (training)" : "moe_forward");
    };
    auto backward = [&] { rank_check(moe_backward(s.layer, s.ctx, s.dy->p, s.dx->p), r, "moe_backward"); };
    auto timed = [&](const std::function<void()> &step, std::vector<double> &ms) {
      for (int i = 0; i < p.warmup; ++i) step();
      for (int i = 0; i < p.iters; ++i) {
        world.arrive_and_wait();
        const auto t0 = Clock::now();
        step();
        if (cuda) cuda->ok(cuda->sync(), "cudaDeviceSynchronize");
        world.arrive_and_wait();  // the step ends when the slowest rank is done
        if (r == 0) ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
    };
    if (p.fwd) timed([&] { forward(nullptr); }, fwd_ms);
    if (p.fwdbwd)
      timed(
          [&] {
            forward(s.ctx);
            backward();
          },
          fwdbwd_ms);
    // One training step after the timed ones, counted phase by phase.
    world.arrive_and_wait();
    if (r == 0) world.reset_traffic();
    world.arrive_and_wait();
    world.set_phase(r, Phase::kForward);
    forward(s.ctx);
    world.set_phase(r, Phase::kBackward);
    backward();
    world.set_phase(r, Phase::kUntracked);
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r) threads.emplace_back(rank_main, r);
  for (auto &t : threads) t.join();

  res.fwd = summarize(fwd_ms);
  res.fwdbwd = summarize(fwdbwd_ms);
  res.stats.struct_size = sizeof res.stats;
  res.have_stats = moe_context_stats(st[0].ctx, &res.stats) == MOE_OK;
  for (int ph = 0; ph < 2; ++ph) {
    std::vector<uint64_t> remote, self, meta;
    for (int r = 0; r < R; ++r) {
      const Traffic &t = world.traffic(r, static_cast<Phase>(ph));
      remote.push_back(t.rows_remote);
      self.push_back(t.rows_self);
      meta.push_back(t.meta_remote);
      if (t.row_bytes) res.row_bytes = t.row_bytes;
    }
    res.phase[ph].rows_remote = per_token(remote, res.tokens);
    res.phase[ph].rows_self = per_token(self, res.tokens);
    res.phase[ph].meta_remote = per_token(meta, res.tokens);
  }
  // Uniform routing: each of a token's k rows leaves the rank with probability (R-1)/R, goes to
  // its expert and comes back (two exchanges per phase); in backward the gradients do the same.
  const double d = static_cast<double>(res.eff.d_model);
  const double element = res.row_bytes ? static_cast<double>(res.row_bytes) / d : 4.0;
  res.expected_uniform = 2.0 * static_cast<double>(res.eff.top_k) * (R - 1) / R * d * element;
  return res;
}

}  // namespace moe_bench
