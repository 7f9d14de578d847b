// Expert parallelism of CUDA layers on one GPU: R = 2 and 4 ranks as threads of one process (NCCL
// will not put two ranks on one device), each a CUDA layer whose cfg.comm is an in-process all-to-all
// that copies rows between the ranks' device buffers with cudaMemcpyAsync on the stream the hook is
// given. The ranks together must equal one CUDA layer holding every expert on the global batch:
// outputs, input gradients, every parameter gradient (experts.*: the rank's slice; router.* and
// shared.*: the sum over ranks), the aux losses, counts and routing, in float32 and in bfloat16
// (rows exchanged in 16 bits). A failing hook gives MOE_ERR_COMM naming the hook and leaves every
// layer usable. (tests/mpi/test_ep_threads.cpp is the CPU version of this test.)
//
// Without a CUDA device every case reports SKIPPED (gtest skip; ctest counts it as skipped).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "gpu_test_util.h"
#include "moe/moe.h"
#include "support/layer.h"
#include "support/router.h"

namespace {

using moe_test::close;
using moe_test::close_scalar;
using moe_test::is_expert_param;
using moe_test::LayerPtr;
using moe_test::Rng;
using moe_test::same;
using ParamDesc = moe_test::Param;

// float32: the ranks compute what one layer computes, in another grouping. bfloat16 (moe.h's
// precision rule, moe_test::stored_tol): a stored value may land on its neighbour, one unit in the
// last place, where the two groupings' float32 results differ in their last bits; per-rank
// gradients of the replicated 16-bit parameters (shared.w*) are rounded before they are summed:
// three units at each tensor's scale.
double tol_of(int dtype) { return moe_test::stored_tol(dtype, 3); }

// ---- the in-process communicator ----------------------------------------------------------------------

// A barrier that gives up: after a timeout, or once any rank calls abort(), every wait returns false
// and the hooks fail (MOE_ERR_COMM) instead of hanging the test.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  bool wait() {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_) return false;
    const uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return true;
    }
    cv_.wait_for(lock, std::chrono::seconds(60), [&] { return gen_ != gen || broken_; });
    if (gen_ != gen) return true;
    broken_ = true;
    cv_.notify_all();
    return false;
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    broken_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  uint64_t gen_ = 0;
  bool broken_ = false;
};

struct World {
  explicit World(int n)
      : size(n), barrier(n), send(n), send_counts(n), row_bytes(n), fail_rows(n, 0), fail_counts(n, 0),
        streams(n, nullptr) {}
  int size;
  Barrier barrier;
  // Published by each rank between the two barriers of a collective.
  std::vector<const char *> send;
  std::vector<const int64_t *> send_counts;
  std::vector<size_t> row_bytes;
  // Each entry is touched only by its own rank's thread.
  std::vector<int> fail_rows, fail_counts;
  std::vector<cudaStream_t> streams;  // the stream each rank's layer was given (NULL: none)
  std::mutex mu;
  std::vector<std::string> errors;  // contract violations seen by the hooks
  void error(const std::string &e) {
    std::lock_guard<std::mutex> lock(mu);
    errors.push_back(e);
  }
};

struct RankRef {
  World *world;
  int rank;
};

moe_status counts_hook(void *user, const int64_t *send, int64_t *recv) {
  auto *me = static_cast<RankRef *>(user);
  World &w = *me->world;
  if (w.fail_counts[me->rank] > 0) {
    --w.fail_counts[me->rank];
    return MOE_ERR_COMM;
  }
  w.send_counts[me->rank] = send;
  if (!w.barrier.wait()) return MOE_ERR_COMM;
  for (int q = 0; q < w.size; ++q) recv[q] = w.send_counts[q][me->rank];
  if (!w.barrier.wait()) return MOE_ERR_COMM;
  return MOE_OK;
}

moe_status rows_hook(void *user, const void *send, const int64_t *send_counts, void *recv, const int64_t *recv_counts,
                     size_t row_bytes, void *stream_arg) {
  auto *me = static_cast<RankRef *>(user);
  World &w = *me->world;
  const int r = me->rank;
  if (w.fail_rows[r] > 0) {
    --w.fail_rows[r];
    return MOE_ERR_COMM;
  }
  // A CUDA layer passes its stream: the one it was given, else its own (never NULL, moe.h).
  auto stream = static_cast<cudaStream_t>(stream_arg);
  if (!stream) w.error("rank " + std::to_string(r) + ": a CUDA layer called exchange_rows with a NULL stream");
  if (stream && w.streams[r] && stream != w.streams[r])
    w.error("rank " + std::to_string(r) + ": exchange_rows was given a stream that is not the layer's");
  bool ok = true;
  // moe.h: send is ready when the hook is called. Synchronizing the stream once more costs little
  // and keeps this hook correct for a library that only queued the rows.
  cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    w.error(std::string("cudaStreamSynchronize before sending: ") + cudaGetErrorString(e));
    ok = false;
  }
  w.send[r] = static_cast<const char *>(send);
  w.send_counts[r] = send_counts;
  w.row_bytes[r] = row_bytes;
  if (!w.barrier.wait()) return MOE_ERR_COMM;
  // Pull from every peer the rows it holds for this rank, in rank order.
  char *out = static_cast<char *>(recv);
  for (int q = 0; q < w.size && ok; ++q) {
    if (w.send_counts[q][r] != recv_counts[q] || w.row_bytes[q] != row_bytes) {
      w.error("rank " + std::to_string(r) + " expects " + std::to_string(recv_counts[q]) + " rows of " +
              std::to_string(row_bytes) + " bytes from rank " + std::to_string(q) + ", which sends " +
              std::to_string(w.send_counts[q][r]) + " rows of " + std::to_string(w.row_bytes[q]));
      ok = false;
      break;
    }
    const char *src = w.send[q];
    for (int p = 0; p < r; ++p) src += w.send_counts[q][p] * row_bytes;
    const size_t bytes = static_cast<size_t>(recv_counts[q]) * row_bytes;
    if (bytes > 0) {
      e = cudaMemcpyAsync(out, src, bytes, cudaMemcpyDeviceToDevice, stream);
      if (e != cudaSuccess) {
        w.error(std::string("cudaMemcpyAsync: ") + cudaGetErrorString(e));
        ok = false;
      }
    }
    out += bytes;
  }
  // The peers may reuse their send buffers once everyone passes the next barrier: finish reading.
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    w.error(std::string("cudaStreamSynchronize after receiving: ") + cudaGetErrorString(e));
    ok = false;
  }
  if (!w.barrier.wait()) return MOE_ERR_COMM;
  return ok ? MOE_OK : MOE_ERR_COMM;
}

// ---- layers -----------------------------------------------------------------------------------------

// Config A: softmax top-2, z and importance losses, a gated shared expert, SwiGLU.
// Config B: sigmoid with groups, routed_scale, bias balancing, an ungated shared expert, GELU.
moe_config config(int which) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = 64;
  c.num_experts = 8;
  c.top_k = 2;
  c.num_shared_experts = 1;
  c.device = MOE_DEVICE_CUDA;
  c.device_index = 0;
  c.seed = 5;
  if (which == 0) {
    c.d_ff = 96;
    c.z_loss_coef = 0.01f;
    c.importance_loss_coef = 0.01f;
    c.d_ff_shared = 48;
    c.shared_gate = 1;
  } else {
    c.d_ff = 64;
    c.activation = MOE_ACT_GELU;
    c.score = MOE_SCORE_SIGMOID;
    c.routed_scale = 2.5f;
    c.num_groups = 4;
    c.topk_groups = 2;
    c.bias_update_rate = 0.001f;
    c.z_loss_coef = 1e-3f;
    c.d_ff_shared = 32;
  }
  return c;
}

std::vector<float> random_param(const std::string &name, int64_t numel, int64_t fan_in, Rng &rng) {
  if (name == "router.bias") return rng.nonzeros(static_cast<size_t>(numel), 0.02f);
  return rng.nonzeros(static_cast<size_t>(numel), 1.0f / std::sqrt(static_cast<float>(fan_in)));
}

// A device tensor of n values in dtype (at least one byte, so that an empty rank still passes a valid
// pointer), filled and read as float32 on the host.
struct DevTensor {
  DevTensor(int dtype, size_t n) : dtype(dtype), n(n) {
    const size_t bytes = std::max<size_t>(1, n * moe_test::dtype_size(dtype));
    if (cudaMalloc(&p, bytes) != cudaSuccess) p = nullptr;
    else (void)cudaMemset(p, 0xff, bytes);  // NaN in every dtype
  }
  ~DevTensor() {
    if (p) cudaFree(p);
  }
  DevTensor(const DevTensor &) = delete;
  DevTensor &operator=(const DevTensor &) = delete;
  // Complete when it returns (a pageable cudaMemcpy may return before the data lands, and a layer
  // on a non-blocking stream is not ordered after it).
  cudaError_t put(const float *host) {
    const std::vector<unsigned char> bytes = moe_test::encode(dtype, std::vector<float>(host, host + n));
    const cudaError_t e = cudaMemcpy(p, bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
    return e != cudaSuccess ? e : cudaDeviceSynchronize();
  }
  std::vector<float> take() {
    std::vector<unsigned char> bytes(n * moe_test::dtype_size(dtype));
    if (n && cudaMemcpy(bytes.data(), p, bytes.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
      return std::vector<float>(n, NAN);
    return moe_test::decode(dtype, bytes);
  }
  int dtype;
  void *p = nullptr;
  size_t n;
};

struct Outcome {
  std::vector<float> y_inf, y, dx, bias_after;
  moe_stats stats{};
  std::vector<int64_t> counts;
  std::vector<int32_t> ids;
  std::vector<std::vector<float>> grads;  // by parameter index
};

// ---- the test -----------------------------------------------------------------------------------------

class GpuEp : public ::testing::TestWithParam<std::tuple<int, int, bool, int>> {  // ranks, config, own streams, dtype
 protected:
  void SetUp() override { MOE_GPU_REQUIRE_DEVICE(); }
};

TEST_P(GpuEp, RanksEqualOneLayer) {
  const int R = std::get<0>(GetParam()), which = std::get<1>(GetParam());
  const bool own_streams = std::get<2>(GetParam());
  const int dtype = std::get<3>(GetParam());
  const double tol = tol_of(dtype);
  moe_config cfg = config(which);
  cfg.dtype = static_cast<moe_dtype>(dtype);
  const int64_t d = cfg.d_model, E = cfg.num_experts, El = E / R, k = cfg.top_k;
  // Uneven token counts; with 4 ranks one rank has none.
  std::vector<int64_t> T = R == 2 ? std::vector<int64_t>{29, 35} : std::vector<int64_t>{24, 0, 31, 17};
  std::vector<int64_t> first(R);
  int64_t Tg = 0;
  for (int r = 0; r < R; ++r) {
    first[r] = Tg;
    Tg += T[r];
  }
  Rng rng(40 + 10 * which + R);
  std::vector<float> x = moe_test::rounded(dtype, rng.nonzeros(static_cast<size_t>(Tg * d), 1.0f));
  const std::vector<float> dy = moe_test::rounded(dtype, rng.nonzeros(static_cast<size_t>(Tg * d), 1.0f));

  // The reference: one CUDA layer with every expert, on the global batch.
  const LayerPtr ref = moe_test::make_layer(cfg);
  ASSERT_NE(ref, nullptr);
  const std::vector<ParamDesc> params = moe_test::params(ref.get());
  std::vector<std::vector<float>> values;
  moe_test::RouterInputs router;
  router.cfg = cfg;
  router.T = Tg;
  for (const ParamDesc &p : params) {
    values.push_back(moe_test::rounded(dtype, random_param(p.name, p.numel, p.shape.back(), rng)));
    ASSERT_EQ(moe_layer_set_param(ref.get(), p.name.c_str(), values.back().data(), p.numel), MOE_OK)
        << moe_last_error();
    if (p.name == "router.weight") router.weight = values.back();
    if (p.name == "router.bias") router.bias = values.back();
  }
  // The ranks' GEMMs see other row counts than the reference's and may differ in the last bits of
  // the logits: x without near-ties, so that the top-k ids must agree exactly.
  router.x = x;
  ASSERT_TRUE(moe_test::draw_without_near_ties(
      router, 0, rng, [&](Rng &g) { return moe_test::rounded(dtype, g.nonzeros(static_cast<size_t>(d), 1.0f)); }))
      << "could not draw x without near-ties";
  x = router.x;
  Outcome want;
  {
    const size_t n = static_cast<size_t>(Tg * d);
    DevTensor xd(dtype, n), yd(dtype, n), yi(dtype, n), dyd(dtype, n), dxd(dtype, n);
    ASSERT_EQ(xd.put(x.data()), cudaSuccess);
    ASSERT_EQ(dyd.put(dy.data()), cudaSuccess);
    ASSERT_EQ(moe_forward(ref.get(), xd.p, Tg, yi.p, nullptr), MOE_OK) << moe_last_error();
    moe_context *ctx = nullptr;
    ASSERT_EQ(moe_context_create(ref.get(), &ctx), MOE_OK);
    const moe_test::ContextPtr owner(ctx);
    ASSERT_EQ(moe_forward(ref.get(), xd.p, Tg, yd.p, ctx), MOE_OK) << moe_last_error();
    ASSERT_EQ(moe_backward(ref.get(), ctx, dyd.p, dxd.p), MOE_OK) << moe_last_error();
    CUDA_ASSERT(cudaDeviceSynchronize());
    want.y_inf = yi.take();
    want.y = yd.take();
    want.dx = dxd.take();
    want.stats.struct_size = sizeof(moe_stats);
    ASSERT_EQ(moe_context_stats(ctx, &want.stats), MOE_OK);
    want.counts.assign(E, -7);
    ASSERT_EQ(moe_context_expert_counts(ctx, want.counts.data()), MOE_OK);
    want.ids.assign(Tg * k, -7);
    ASSERT_EQ(moe_context_topk(ctx, want.ids.data(), nullptr), MOE_OK);
    for (const ParamDesc &p : params) {
      std::vector<float> g;
      if (p.trainable) {
        g.assign(p.numel, NAN);
        EXPECT_EQ(moe_layer_get_grad(ref.get(), p.name.c_str(), g.data(), p.numel), MOE_OK);
      }
      want.grads.push_back(g);
      if (p.name == "router.bias") {
        want.bias_after.assign(p.numel, NAN);
        EXPECT_EQ(moe_layer_get_param(ref.get(), p.name.c_str(), want.bias_after.data(), p.numel), MOE_OK);
      }
    }
  }

  // The ranks: layers made (not collective) and given their share of the parameters here.
  World world(R);
  std::vector<RankRef> refs(R);
  std::vector<moe_comm> comms(R);
  // Destroyed in reverse order: the layers before the streams they were given.
  std::vector<cudaStream_t> streams(R, nullptr);
  struct StreamsOwner {
    std::vector<cudaStream_t> &s;
    ~StreamsOwner() {
      for (cudaStream_t x : s)
        if (x) cudaStreamDestroy(x);
    }
  } streams_owner{streams};
  std::vector<LayerPtr> layers;
  for (int r = 0; r < R; ++r) {
    refs[r] = RankRef{&world, r};
    comms[r] = moe_comm{sizeof(moe_comm), R, r, &refs[r], counts_hook, rows_hook, nullptr};
    moe_config c = cfg;
    c.comm = &comms[r];
    layers.push_back(moe_test::make_layer(c));
    moe_layer *raw = layers.back().get();
    ASSERT_NE(raw, nullptr) << "rank " << r;
    const std::vector<ParamDesc> mine = moe_test::params(raw);
    ASSERT_EQ(mine.size(), params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      ASSERT_EQ(mine[i].name, params[i].name);
      const bool expert = is_expert_param(params[i].name);
      ASSERT_EQ(mine[i].numel, expert ? params[i].numel / R : params[i].numel) << mine[i].name;
      const float *src = values[i].data() + (expert ? r * mine[i].numel : 0);
      ASSERT_EQ(moe_layer_set_param(raw, mine[i].name.c_str(), src, mine[i].numel), MOE_OK) << moe_last_error();
    }
    if (own_streams) {
      CUDA_ASSERT(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
      world.streams[r] = streams[r];
      ASSERT_EQ(moe_layer_set_stream(raw, streams[r]), MOE_OK) << moe_last_error();
    }
  }
  struct RankResult {
    Outcome got;
    moe_status rows_fail = MOE_OK, bwd_after_fail = MOE_OK, counts_fail = MOE_OK;
    std::string rows_msg, counts_msg;
    std::vector<std::string> errors;
  };
  std::vector<RankResult> results(R);
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      RankResult &res = results[r];
      moe_layer *l = layers[r].get();
      auto fail = [&](const std::string &what) {
        res.errors.push_back(what + ": " + moe_last_error());
        world.barrier.abort();  // the other ranks' hooks fail instead of waiting
      };
      const size_t n = static_cast<size_t>(T[r] * d);
      DevTensor xd(dtype, n), yd(dtype, n), yi(dtype, n), dyd(dtype, n), dxd(dtype, n);
      if (!xd.p || !yd.p || !yi.p || !dyd.p || !dxd.p || xd.put(x.data() + first[r] * d) != cudaSuccess ||
          dyd.put(dy.data() + first[r] * d) != cudaSuccess) {
        res.errors.push_back("device buffers");
        world.barrier.abort();
        return;
      }
      moe_context *ctx = nullptr;
      if (moe_context_create(l, &ctx) != MOE_OK) return fail("moe_context_create");
      const moe_test::ContextPtr owner(ctx);

      // Inference first, before the training forward updates router.bias.
      if (moe_forward(l, xd.p, T[r], yi.p, nullptr) != MOE_OK) return fail("inference forward");
      // Every rank's exchange_rows fails once at the same collective: MOE_ERR_COMM, context left empty.
      world.fail_rows[r] = 1;
      res.rows_fail = moe_forward(l, xd.p, T[r], yd.p, ctx);
      res.rows_msg = moe_last_error();
      world.fail_rows[r] = 0;
      res.bwd_after_fail = moe_backward(l, ctx, dyd.p, dxd.p);
      // Then exchange_counts.
      world.fail_counts[r] = 1;
      res.counts_fail = moe_forward(l, xd.p, T[r], yd.p, ctx);
      res.counts_msg = moe_last_error();
      world.fail_counts[r] = 0;
      // The layers still work.
      if (moe_forward(l, xd.p, T[r], yd.p, ctx) != MOE_OK) return fail("training forward");
      if (moe_backward(l, ctx, dyd.p, dxd.p) != MOE_OK) return fail("backward");
      if (cudaDeviceSynchronize() != cudaSuccess) return fail("cudaDeviceSynchronize");
      Outcome &o = res.got;
      o.y_inf = yi.take();
      o.y = yd.take();
      o.dx = dxd.take();
      o.stats.struct_size = sizeof(moe_stats);
      if (moe_context_stats(ctx, &o.stats) != MOE_OK) return fail("moe_context_stats");
      o.counts.assign(E, -7);
      if (moe_context_expert_counts(ctx, o.counts.data()) != MOE_OK) return fail("moe_context_expert_counts");
      o.ids.assign(T[r] * k, -7);
      if (moe_context_topk(ctx, o.ids.data(), nullptr) != MOE_OK) return fail("moe_context_topk");
      for (const ParamDesc &p : moe_test::params(l)) {
        std::vector<float> g;
        if (p.trainable) {
          g.assign(p.numel, NAN);
          if (moe_layer_get_grad(l, p.name.c_str(), g.data(), p.numel) != MOE_OK) return fail("get_grad " + p.name);
        }
        o.grads.push_back(g);
        if (p.name == "router.bias") {
          o.bias_after.assign(p.numel, NAN);
          if (moe_layer_get_param(l, p.name.c_str(), o.bias_after.data(), p.numel) != MOE_OK)
            return fail("get_param router.bias");
        }
      }
    });
  for (std::thread &t : threads) t.join();

  for (const std::string &e : world.errors) ADD_FAILURE() << "comm hook: " << e;
  bool all_ran = true;
  for (int r = 0; r < R; ++r)
    for (const std::string &e : results[r].errors) {
      ADD_FAILURE() << "rank " << r << ": " << e;
      all_ran = false;
    }
  ASSERT_TRUE(all_ran);

  std::vector<int64_t> count_sum(E, 0);
  std::vector<int32_t> ids;
  for (int r = 0; r < R; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(R));
    const RankResult &res = results[r];
    EXPECT_EQ(res.rows_fail, MOE_ERR_COMM) << res.rows_msg;
    EXPECT_NE(res.rows_msg.find("exchange_rows"), std::string::npos) << res.rows_msg;
    EXPECT_EQ(res.bwd_after_fail, MOE_ERR_STATE) << "backward after a failed forward";
    EXPECT_EQ(res.counts_fail, MOE_ERR_COMM) << res.counts_msg;
    EXPECT_NE(res.counts_msg.find("exchange_counts"), std::string::npos) << res.counts_msg;

    const Outcome &o = res.got;
    const size_t b = static_cast<size_t>(first[r] * d), n = static_cast<size_t>(T[r] * d);
    const std::vector<float> y_want(want.y.begin() + b, want.y.begin() + b + n),
        yi_want(want.y_inf.begin() + b, want.y_inf.begin() + b + n),
        dx_want(want.dx.begin() + b, want.dx.begin() + b + n);
    EXPECT_TRUE(close("y", o.y, y_want, tol));
    EXPECT_TRUE(close("inference y", o.y_inf, yi_want, tol));
    EXPECT_TRUE(close("dx", o.dx, dx_want, tol));
    // Every rank reports the losses of the global batch.
    EXPECT_TRUE(close_scalar("load_balance_loss", o.stats.load_balance_loss, want.stats.load_balance_loss, tol, 1e-6));
    EXPECT_TRUE(close_scalar("z_loss", o.stats.z_loss, want.stats.z_loss, tol, 1e-6));
    EXPECT_TRUE(close_scalar("importance_loss", o.stats.importance_loss, want.stats.importance_loss, tol, 1e-6));
    EXPECT_TRUE(close_scalar("load_loss", o.stats.load_loss, want.stats.load_loss, tol, 1e-6));
    EXPECT_TRUE(close_scalar("aux_loss_total", o.stats.aux_loss_total, want.stats.aux_loss_total, tol, 1e-6));
    EXPECT_EQ(o.stats.num_tokens, T[r]);
    for (int64_t e = 0; e < E; ++e) count_sum[e] += o.counts[e];
    ids.insert(ids.end(), o.ids.begin(), o.ids.end());
    // Balancing uses the global loads: the same bias everywhere.
    EXPECT_TRUE(same("router.bias after the training forward", o.bias_after, want.bias_after));
    // Expert gradients: this rank's slice, complete.
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].trainable || !is_expert_param(params[i].name)) continue;
      const int64_t per = params[i].numel / R;
      const std::vector<float> slice(want.grads[i].begin() + r * per, want.grads[i].begin() + (r + 1) * per);
      EXPECT_TRUE(close("grad " + params[i].name + " (this rank's experts " + std::to_string(r * El) + ".." +
                            std::to_string((r + 1) * El - 1) + ")",
                        o.grads[i], slice, tol));
    }
  }
  EXPECT_TRUE(same("expert counts summed over ranks", count_sum, want.counts));
  EXPECT_TRUE(same("top-k ids of all ranks' tokens", ids, want.ids));
  // Replicated parameters: each rank holds its tokens' share; the sum is the global gradient.
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable || is_expert_param(params[i].name)) continue;
    std::vector<double> sum(static_cast<size_t>(params[i].numel), 0.0);
    for (int r = 0; r < R; ++r)
      for (size_t j = 0; j < sum.size(); ++j) sum[j] += results[r].got.grads[i][j];
    std::vector<float> total(sum.begin(), sum.end());
    EXPECT_TRUE(close("grad " + params[i].name + " summed over ranks", total, want.grads[i], tol));
  }
  // Layers go before the comms and streams they use.
  for (int r = 0; r < R; ++r)
    if (own_streams) { EXPECT_EQ(moe_layer_set_stream(layers[r].get(), nullptr), MOE_OK); }
  layers.clear();
}

INSTANTIATE_TEST_SUITE_P(Ranks, GpuEp,
                         ::testing::Combine(::testing::Values(2, 4), ::testing::Values(0, 1), ::testing::Bool(),
                                            ::testing::Values(static_cast<int>(MOE_DTYPE_F32),
                                                              static_cast<int>(MOE_DTYPE_BF16))),
                         [](const ::testing::TestParamInfo<std::tuple<int, int, bool, int>> &info) {
                           return "R" + std::to_string(std::get<0>(info.param)) + "_config" +
                                  (std::get<1>(info.param) == 0 ? "A" : "B") +
                                  (std::get<2>(info.param) ? "_own_streams" : "_default_stream") +
                                  (std::get<3>(info.param) == MOE_DTYPE_BF16 ? "_bf16" : "");
                         });

}  // namespace
