// The moe_comm contract without MPI: R ranks as threads of one process, exchanging through an
// in-process all-to-all. Checks that (1) the expert-parallel layers together equal one layer holding
// all experts on the global batch, and (2) a failing hook gives MOE_ERR_COMM naming the hook and
// leaves every layer usable. Runs in float32 and in bfloat16 (activations and experts' weights on
// the wire are 2-byte elements). (3) With a capacity per sequence (capacity_group_size) and ranks
// holding whole sequences, the ranks drop what one layer on the global batch drops.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ep_world.h"
#include "moe/moe.h"
#include "support/half.h"
#include "support/random.h"

using ep_world::counts_hook;
using ep_world::Rank;
using ep_world::rows_hook;
using ep_world::World;

namespace {

double rel(const float *a, const float *b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num) / (std::sqrt(den) + 1e-30);
}

std::vector<std::string> errors;
std::mutex errors_mu;
void check(bool ok, const std::string &what) {
  if (ok) return;
  std::lock_guard<std::mutex> lock(errors_mu);
  errors.push_back(what);
}

// gpt: gpt-oss's pieces (router logit bias, expert biases, the clamped SwiGLU with a limit that
// random rows reach).
void configure(moe_config &cfg, int dtype, bool gpt) {
  moe_config_init(&cfg);
  cfg.dtype = static_cast<moe_dtype>(dtype);
  cfg.d_model = 12;
  cfg.d_ff = 20;
  cfg.num_experts = 8;
  cfg.top_k = 3;
  cfg.z_loss_coef = 0.01f;
  cfg.importance_loss_coef = 0.01f;
  cfg.num_shared_experts = 1;
  cfg.seed = 5;
  if (gpt) {
    cfg.activation = MOE_ACT_SWIGLU_CLAMPED;
    cfg.swiglu_limit = 0.3f;
    cfg.router_logit_bias = 1;
    cfg.expert_bias = 1;
  }
}

// The biases of a gpt layer (they start at zero): global values, each rank given its experts' rows.
void set_biases(moe_layer *l, int64_t first_expert, int64_t experts) {
  const int64_t d = 12, ff = 20, E = 8;
  const std::vector<float> lb = moe_test::inputs(E, 11, 0.5f), b1 = moe_test::inputs(E * ff, 12, 0.5f),
                           b3 = moe_test::inputs(E * ff, 13, 0.5f), b2 = moe_test::inputs(E * d, 14, 0.5f);
  check(moe_layer_set_param(l, "router.logit_bias", lb.data(), E) == MOE_OK, moe_last_error());
  check(moe_layer_set_param(l, "experts.b1", b1.data() + first_expert * ff, experts * ff) == MOE_OK, moe_last_error());
  check(moe_layer_set_param(l, "experts.b3", b3.data() + first_expert * ff, experts * ff) == MOE_OK, moe_last_error());
  check(moe_layer_set_param(l, "experts.b2", b2.data() + first_expert * d, experts * d) == MOE_OK, moe_last_error());
}

// (3): each rank routes its own sequences of kSeq tokens with the capacity of a sequence, as one
// layer does on the global batch grouped the same way; one capacity per call would not agree.
constexpr int64_t kSeq = 6;

void configure_groups(moe_config &cfg, int64_t group_size) {
  configure(cfg, MOE_DTYPE_F32, false);
  cfg.capacity_factor = 0.5f;  // C = ceil(0.5 * 6 * 3 / 8) = 2 per sequence
  cfg.capacity_group_size = group_size;
}

void capacity_per_sequence(int R) {
  const int64_t d = 12;
  std::vector<int64_t> T(R), first(R);
  int64_t Tg = 0;
  for (int r = 0; r < R; ++r) {
    T[r] = r == 1 ? 0 : kSeq * (r + 2);  // whole sequences, uneven, one rank empty
    first[r] = Tg;
    Tg += T[r];
  }
  const std::vector<float> x = moe_test::inputs(Tg * d, 3, 0.8f), dy = moe_test::inputs(Tg * d, 4, 0.8f);
  auto single = [&](int64_t group_size, std::vector<float> &y, std::vector<float> &dx, std::vector<float> &g2,
                    moe_stats &st) {
    moe_config cfg;
    configure_groups(cfg, group_size);
    moe_layer *l = nullptr;
    moe_context *ctx = nullptr;
    y.assign(Tg * d, 0.0f);
    dx.assign(Tg * d, 0.0f);
    g2.assign(8 * d * 20, 0.0f);
    check(moe_layer_create(&cfg, &l) == MOE_OK, std::string("create: ") + moe_last_error());
    moe_context_create(l, &ctx);
    check(moe_forward(l, x.data(), Tg, y.data(), ctx) == MOE_OK, std::string("forward: ") + moe_last_error());
    check(moe_backward(l, ctx, dy.data(), dx.data()) == MOE_OK, std::string("backward: ") + moe_last_error());
    moe_layer_get_grad(l, "experts.w2", g2.data(), g2.size());
    st = moe_stats{sizeof(moe_stats)};
    moe_context_stats(ctx, &st);
    moe_context_destroy(ctx);
    moe_layer_destroy(l);
  };
  std::vector<float> yr, dxr, g2r, yc, dxc, g2c;
  moe_stats sr, sc;
  single(kSeq, yr, dxr, g2r, sr);
  single(0, yc, dxc, g2c, sc);
  check(sr.dropped_slots > 0, "the capacity per sequence should drop slots");
  check(rel(yc.data(), yr.data(), Tg * d) > 1e-3, "one capacity per call should route otherwise than per sequence");

  World world(R);
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      Rank me{&world, r};
      moe_comm comm{sizeof(moe_comm), R, r, &me, counts_hook, rows_hook, nullptr};
      moe_config c;
      configure_groups(c, kSeq);
      c.comm = &comm;
      moe_layer *ep = nullptr;
      if (moe_layer_create(&c, &ep) != MOE_OK) {
        check(false, std::string("create: ") + moe_last_error());
        std::abort();  // the other ranks would wait for this one
      }
      moe_context *ctx;
      moe_context_create(ep, &ctx);
      std::vector<float> y(T[r] * d + 1), dx(T[r] * d + 1);
      check(moe_forward(ep, x.data() + first[r] * d, T[r], y.data(), ctx) == MOE_OK,
            std::string("forward: ") + moe_last_error());
      check(moe_backward(ep, ctx, dy.data() + first[r] * d, dx.data()) == MOE_OK,
            std::string("backward: ") + moe_last_error());
      if (T[r] > 0) {
        check(rel(y.data(), yr.data() + first[r] * d, T[r] * d) < 1e-5, "grouped y differs from the single-rank layer");
        check(rel(dx.data(), dxr.data() + first[r] * d, T[r] * d) < 1e-5,
              "grouped dx differs from the single-rank layer");
      }
      moe_stats st{sizeof(moe_stats)};
      moe_context_stats(ctx, &st);
      check(std::fabs(st.load_balance_loss - sr.load_balance_loss) <= 1e-5f * sr.load_balance_loss,
            "grouped LB differs");
      check(std::fabs(st.importance_loss - sr.importance_loss) <= 1e-5f * sr.importance_loss,
            "grouped importance loss differs");
      const int64_t El = 8 / R;
      std::vector<float> g2(El * d * 20);
      moe_layer_get_grad(ep, "experts.w2", g2.data(), g2.size());
      check(rel(g2.data(), g2r.data() + r * El * d * 20, g2.size()) < 1e-5, "grouped experts.w2 gradient differs");
      moe_context_destroy(ctx);
      moe_layer_destroy(ep);
    });
  for (auto &t : threads) t.join();
  std::printf("expert parallel over %d in-process ranks, capacity per sequence: %zu failed checks\n", R,
              errors.size());
}

}  // namespace

int main() {
  const int64_t d = 12;
  for (bool gpt : {false, true})
  for (int dt : {MOE_DTYPE_F32, MOE_DTYPE_BF16})
    for (int R : {2, 4}) {
      const size_t es = moe_test::dtype_size(dt);
      // The same rows reach the same experts in the same order: float32 agrees to rounding, and
      // bfloat16 to its precision.
      const double tol = dt == MOE_DTYPE_F32 ? 1e-5 : 1e-2;
      std::vector<int64_t> T(R), first(R);
      int64_t Tg = 0;
      for (int r = 0; r < R; ++r) {
        T[r] = r == 1 ? 0 : 4 + 3 * r;  // uneven, one rank empty
        first[r] = Tg;
        Tg += T[r];
      }
      const std::vector<unsigned char> x = moe_test::encode(dt, moe_test::inputs(Tg * d, 1, 0.8f)),
                                       dy = moe_test::encode(dt, moe_test::inputs(Tg * d, 2, 0.8f));
      std::vector<unsigned char> yrb(Tg * d * es), dxrb(Tg * d * es);
      moe_config cfg;
      configure(cfg, dt, gpt);
      moe_layer *ref;
      moe_context *rctx;
      moe_layer_create(&cfg, &ref);
      if (gpt) set_biases(ref, 0, 8);
      moe_context_create(ref, &rctx);
      moe_forward(ref, x.data(), Tg, yrb.data(), rctx);
      moe_backward(ref, rctx, dy.data(), dxrb.data());
      const std::vector<float> yr = moe_test::decode(dt, yrb), dxr = moe_test::decode(dt, dxrb);
      moe_stats sr{sizeof(moe_stats)};
      moe_context_stats(rctx, &sr);
      std::vector<float> w2r(8 * d * 20), g2r(8 * d * 20);
      moe_layer_get_grad(ref, "experts.w2", g2r.data(), g2r.size());
      std::vector<float> gb2r(8 * d);
      if (gpt) moe_layer_get_grad(ref, "experts.b2", gb2r.data(), gb2r.size());

      World world(R);
      std::vector<std::thread> threads;
      for (int r = 0; r < R; ++r)
        threads.emplace_back([&, r] {
          Rank me{&world, r};
          moe_comm comm{sizeof(moe_comm), R, r, &me, counts_hook, rows_hook, nullptr};
          moe_config c;
          configure(c, dt, gpt);
          c.comm = &comm;
          moe_layer *ep = nullptr;
          moe_status s = moe_layer_create(&c, &ep);
          check(s == MOE_OK, std::string("create: ") + moe_last_error());
          if (s != MOE_OK) std::abort();
          if (gpt) set_biases(ep, r * (8 / R), 8 / R);
          moe_context *ctx;
          moe_context_create(ep, &ctx);
          std::vector<unsigned char> yb(T[r] * d * es + 4), dxb(T[r] * d * es + 4), y2(T[r] * d * es + 4);
          const unsigned char *xs = x.data() + first[r] * d * es, *dys = dy.data() + first[r] * d * es;

          // Every rank's exchange_rows fails once at the same collective, then exchange_counts.
          world.fail_rows[r] = 1;
          s = moe_forward(ep, xs, T[r], yb.data(), ctx);
          check(s == MOE_ERR_COMM, "failing exchange_rows gave " + std::string(moe_status_name(s)));
          check(std::strstr(moe_last_error(), "exchange_rows") != nullptr, std::string("message: ") + moe_last_error());
          s = moe_backward(ep, ctx, dys, dxb.data());
          check(s == MOE_ERR_STATE, "backward after a failed forward gave " + std::string(moe_status_name(s)));
          world.fail_counts[r] = 1;
          s = moe_forward(ep, xs, T[r], yb.data(), ctx);
          check(s == MOE_ERR_COMM, "failing exchange_counts gave " + std::string(moe_status_name(s)));
          check(std::strstr(moe_last_error(), "exchange_counts") != nullptr,
                std::string("message: ") + moe_last_error());

          s = moe_forward(ep, xs, T[r], yb.data(), ctx);
          check(s == MOE_OK, std::string("forward: ") + moe_last_error());
          s = moe_backward(ep, ctx, dys, dxb.data());
          check(s == MOE_OK, std::string("backward: ") + moe_last_error());
          s = moe_forward(ep, xs, T[r], y2.data(), nullptr);
          check(s == MOE_OK && std::memcmp(yb.data(), y2.data(), T[r] * d * es) == 0,
                "inference differs from the training forward");
          if (T[r] > 0) {
            const std::vector<float> y = moe_test::decode(dt, yb), dx = moe_test::decode(dt, dxb);
            check(rel(y.data(), yr.data() + first[r] * d, T[r] * d) < tol, "y differs from the single-rank layer");
            check(rel(dx.data(), dxr.data() + first[r] * d, T[r] * d) < tol, "dx differs from the single-rank layer");
          }
          moe_stats st{sizeof(moe_stats)};
          moe_context_stats(ctx, &st);
          check(std::fabs(st.load_balance_loss - sr.load_balance_loss) <= 1e-5f * sr.load_balance_loss, "LB differs");
          check(std::fabs(st.z_loss - sr.z_loss) <= 1e-5f * sr.z_loss, "z-loss differs");
          check(std::fabs(st.aux_loss_total - sr.aux_loss_total) <= 1e-5f * sr.aux_loss_total, "aux total differs");
          const int64_t El = 8 / R;
          std::vector<float> g2(El * d * 20);
          moe_layer_get_grad(ep, "experts.w2", g2.data(), g2.size());
          check(rel(g2.data(), g2r.data() + r * El * d * 20, g2.size()) < tol, "experts.w2 gradient differs");
          if (gpt) {
            std::vector<float> gb2(El * d);
            moe_layer_get_grad(ep, "experts.b2", gb2.data(), gb2.size());
            check(rel(gb2.data(), gb2r.data() + r * El * d, gb2.size()) < tol, "experts.b2 gradient differs");
          }
          moe_context_destroy(ctx);
          moe_layer_destroy(ep);
        });
      for (auto &t : threads) t.join();
      moe_context_destroy(rctx);
      moe_layer_destroy(ref);
      std::printf("expert parallel over %d in-process ranks, %s%s: %zu failed checks\n", R,
                  dt == MOE_DTYPE_F32 ? "float32" : "bfloat16", gpt ? ", gpt-oss pieces" : "", errors.size());
    }
  for (int R : {2, 4}) capacity_per_sequence(R);
  for (const auto &e : errors) std::fprintf(stderr, "FAIL: %s\n", e.c_str());
  return errors.empty() ? 0 : 1;
}
