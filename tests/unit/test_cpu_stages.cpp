// The CPU backend's stage kernels, called directly through the moe_cpu_backend() table (the
// same table the core drives), on small integer-valued inputs where float results are exact:
// a naive loop in this file is the reference, compared bit for bit.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "core/backend.h"
#include "cpu/gemm.h"
#include "support/random.h"
#include "support/stages.h"

namespace {

using moe_test::Plan;
using moe_test::Rng;
using moe_test::rows_args;
using moe_test::SelectOut;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class CpuStages : public moe_test::CpuBackendTest<> {};

// ---- the table itself ---------------------------------------------------------------------------

TEST_F(CpuStages, TableIsComplete) {
  EXPECT_EQ(ops->abi, static_cast<uint32_t>(MOE_BACKEND_ABI));
  EXPECT_STREQ(ops->name, "cpu");
  const void *fns[] = {
      reinterpret_cast<const void *>(ops->create),           reinterpret_cast<const void *>(ops->destroy),
      reinterpret_cast<const void *>(ops->last_error),       reinterpret_cast<const void *>(ops->set_stream),
      reinterpret_cast<const void *>(ops->alloc),            reinterpret_cast<const void *>(ops->free),
      reinterpret_cast<const void *>(ops->memset_zero),      reinterpret_cast<const void *>(ops->upload),
      reinterpret_cast<const void *>(ops->download),         reinterpret_cast<const void *>(ops->copy),
      reinterpret_cast<const void *>(ops->check_pointer),    reinterpret_cast<const void *>(ops->find_nonfinite),
      reinterpret_cast<const void *>(ops->synchronize),      reinterpret_cast<const void *>(ops->gate),
      reinterpret_cast<const void *>(ops->select),           reinterpret_cast<const void *>(ops->plan),
      reinterpret_cast<const void *>(ops->dispatch),         reinterpret_cast<const void *>(ops->expert_ffn),
      reinterpret_cast<const void *>(ops->combine),          reinterpret_cast<const void *>(ops->shared_combine),
      reinterpret_cast<const void *>(ops->shared_combine_bwd), reinterpret_cast<const void *>(ops->combine_bwd),
      reinterpret_cast<const void *>(ops->expert_ffn_bwd),   reinterpret_cast<const void *>(ops->dispatch_bwd),
      reinterpret_cast<const void *>(ops->select_bwd),       reinterpret_cast<const void *>(ops->gate_bwd),
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; ++i) EXPECT_NE(fns[i], nullptr) << "entry " << i;
}

TEST_F(CpuStages, MemoryOps) {
  void *p = nullptr;
  ASSERT_EQ(ops->alloc(state, 100, &p), MOE_OK);
  ASSERT_NE(p, nullptr);
  std::vector<unsigned char> src(100), dst(100, 0xEE);
  std::iota(src.begin(), src.end(), 0);
  ASSERT_EQ(ops->upload(state, p, src.data(), 100), MOE_OK);
  ASSERT_EQ(ops->download(state, dst.data(), p, 100), MOE_OK);
  EXPECT_EQ(src, dst);
  void *q = nullptr;
  ASSERT_EQ(ops->alloc(state, 100, &q), MOE_OK);
  ASSERT_EQ(ops->copy(state, q, p, 100), MOE_OK);
  ASSERT_EQ(ops->memset_zero(state, p, 100), MOE_OK);
  ASSERT_EQ(ops->download(state, dst.data(), p, 100), MOE_OK);
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(), [](unsigned char c) { return c == 0; }));
  ASSERT_EQ(ops->download(state, dst.data(), q, 100), MOE_OK);
  EXPECT_EQ(src, dst);
  EXPECT_EQ(ops->synchronize(state), MOE_OK);
  EXPECT_EQ(ops->check_pointer(state, p), MOE_OK);
  ops->free(state, p);
  ops->free(state, q);
  // Zero bytes still gives a pointer that can be freed.
  void *z = nullptr;
  ASSERT_EQ(ops->alloc(state, 0, &z), MOE_OK);
  ops->free(state, z);
}

TEST_F(CpuStages, SetStream) {
  EXPECT_EQ(ops->set_stream(state, nullptr), MOE_OK);
  int dummy = 0;
  EXPECT_EQ(ops->set_stream(state, &dummy), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_NE(err().find("stream"), std::string::npos) << err();
}

TEST_F(CpuStages, FindNonfinite) {
  std::vector<float> v(37, 1.0f);
  int64_t first = 123;
  ASSERT_EQ(ops->find_nonfinite(state, v.data(), MOE_DTYPE_F32, 37, &first), MOE_OK);
  EXPECT_EQ(first, -1);
  v[20] = std::numeric_limits<float>::infinity();
  v[30] = kNaN;
  ASSERT_EQ(ops->find_nonfinite(state, v.data(), MOE_DTYPE_F32, 37, &first), MOE_OK);
  EXPECT_EQ(first, 20);
  v[20] = 0.0f;
  ASSERT_EQ(ops->find_nonfinite(state, v.data(), MOE_DTYPE_F32, 37, &first), MOE_OK);
  EXPECT_EQ(first, 30);
  v[0] = -std::numeric_limits<float>::infinity();
  ASSERT_EQ(ops->find_nonfinite(state, v.data(), MOE_DTYPE_F32, 37, &first), MOE_OK);
  EXPECT_EQ(first, 0);
  ASSERT_EQ(ops->find_nonfinite(state, v.data(), MOE_DTYPE_F32, 0, &first), MOE_OK);
  EXPECT_EQ(first, -1);
}

// ---- gate ---------------------------------------------------------------------------------------

// The gate's forward arguments: logits = x w^T, T tokens of d, E experts.
moe_gate_args gate_args(int64_t T, int64_t d, int64_t E, const std::vector<float> &x, const std::vector<float> &w,
                        std::vector<float> &logits) {
  moe_gate_args a{};
  a.T = T;
  a.d = d;
  a.E = E;
  a.x = x.data();
  a.w = w.data();
  a.logits = logits.data();
  return a;
}

// logits equal x w^T summed in order in float32 (exact on small integers, in any order).
void expect_exact_logits(const moe_gate_args &a, const std::vector<float> &x, const std::vector<float> &w,
                         const std::vector<float> &logits) {
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t e = 0; e < a.E; ++e) {
      float ref = 0.0f;
      for (int64_t c = 0; c < a.d; ++c) ref += x[t * a.d + c] * w[e * a.d + c];
      ASSERT_EQ(logits[t * a.E + e], ref) << "T " << a.T << " E " << a.E << ": " << t << "," << e;
    }
}

// dx equals dx0 + dlogits w, summed over the experts in order in float32 (exact on small
// integers, in any order).
void expect_exact_dx(const moe_gate_args &a, const std::vector<float> &dx0, const std::vector<float> &dl,
                     const std::vector<float> &w, const std::vector<float> &dx) {
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t c = 0; c < a.d; ++c) {
      float ref = dx0[t * a.d + c];  // accumulated (+=)
      for (int64_t e = 0; e < a.E; ++e) ref += dl[t * a.E + e] * w[e * a.d + c];
      ASSERT_EQ(dx[t * a.d + c], ref) << "dx, T " << a.T << " E " << a.E << ": " << t << "," << c;
    }
}

TEST_F(CpuStages, GateForwardAndBackwardAreExactOnIntegers) {
  const int64_t T = 7, d = 5, E = 3;
  Rng rng(1);
  std::vector<float> x = rng.ints(T * d, -3, 3), w = rng.ints(E * d, -2, 2), dl = rng.ints(T * E, -2, 2);
  std::vector<float> logits(T * E, kNaN);
  std::vector<float> dx0 = rng.ints(T * d, -1, 1), dw0 = rng.ints(E * d, -1, 1);
  std::vector<float> dx = dx0, dw = dw0;
  moe_gate_args a = gate_args(T, d, E, x, w, logits);
  ASSERT_EQ(ops->gate(state, &a), MOE_OK) << err();
  expect_exact_logits(a, x, w, logits);
  a.dlogits = dl.data();
  a.dx = dx.data();
  a.dw = dw.data();
  ASSERT_EQ(ops->gate_bwd(state, &a), MOE_OK) << err();
  expect_exact_dx(a, dx0, dl, w, dx);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < d; ++c) {
      float ref = dw0[e * d + c];
      for (int64_t t = 0; t < T; ++t) ref += dl[t * E + e] * x[t * d + c];
      EXPECT_EQ(dw[e * d + c], ref) << "dw " << e << "," << c;
    }
  // dx NULL: only dw is accumulated (again).
  std::vector<float> dw1 = dw;
  a.dx = nullptr;
  ASSERT_EQ(ops->gate_bwd(state, &a), MOE_OK) << err();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < d; ++c) EXPECT_EQ(dw[e * d + c] - dw1[e * d + c], dw1[e * d + c] - dw0[e * d + c]);
}

// The logits of many tokens and experts (the tokens in slices, the experts in chunks of router
// rows, shared by the threads) and their input gradient: exact on integers; on random values, the
// logits within float32 rounding of float64 sums and, on the few-rows kernels, both the same bits
// at 1 and 3 threads (each one fixed-order sum).
TEST_F(CpuStages, GateLogitsOfManyTokensAndExperts) {
  const int64_t d = 300;  // not a multiple of the kernels' 16 or 32 elements
  for (const int64_t E : {8, 70})
    for (const int64_t T : {1, 13, 100, 1000}) {
      Rng rng(static_cast<uint64_t>(T * 100 + E));
      std::vector<float> x = rng.ints(T * d, -3, 3), w = rng.ints(E * d, -2, 2), logits(T * E, kNaN);
      moe_gate_args a = gate_args(T, d, E, x, w, logits);
      ASSERT_EQ(ops->gate(state, &a), MOE_OK) << err();
      expect_exact_logits(a, x, w, logits);
      // Their input gradient, dx += dlogits w: exact on integers too.
      std::vector<float> dl = rng.ints(T * E, -2, 2), dx0 = rng.ints(T * d, -1, 1), dx = dx0, dw(E * d, 0.0f);
      a.dlogits = dl.data();
      a.dx = dx.data();
      a.dw = dw.data();
      ASSERT_EQ(ops->gate_bwd(state, &a), MOE_OK) << err();
      expect_exact_dx(a, dx0, dl, w, dx);
      x = rng.uniforms(T * d);
      w = rng.uniforms(E * d);
      a = gate_args(T, d, E, x, w, logits);
      dl = rng.uniforms(T * E);
      a.dlogits = dl.data();
      a.dx = dx.data();
      a.dw = dw.data();
      // The logits and dx (from zero) at a thread count.
      auto at_threads = [&](int threads) {
        const int before = omp_get_max_threads();
        omp_set_num_threads(threads);
        std::fill(logits.begin(), logits.end(), kNaN);
        std::fill(dx.begin(), dx.end(), 0.0f);
        EXPECT_EQ(ops->gate(state, &a), MOE_OK) << err();
        EXPECT_EQ(ops->gate_bwd(state, &a), MOE_OK) << err();
        omp_set_num_threads(before);
        std::vector<float> both = logits;
        both.insert(both.end(), dx.begin(), dx.end());
        return both;
      };
      const std::vector<float> one = at_threads(1), three = at_threads(3);
      if (moe::cpu::small_rows().router) {  // oneDNN's sums (elsewhere) may depend on the thread count
        EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float))) << "T " << T << " E " << E;
      }
      for (int64_t t = 0; t < T; t += 7)
        for (int64_t e = 0; e < E; ++e) {
          double ref = 0.0, mag = 0.0;
          for (int64_t c = 0; c < d; ++c) {
            ref += double(x[t * d + c]) * w[e * d + c];
            mag += std::abs(double(x[t * d + c]) * w[e * d + c]);
          }
          ASSERT_NEAR(one[t * E + e], ref, 1e-6 * mag) << "T " << T << " E " << E << ": " << t << "," << e;
        }
    }
}

TEST_F(CpuStages, GateWithNoTokens) {
  std::vector<float> w(6, 1.0f);
  moe_gate_args a{};
  a.T = 0;
  a.d = 2;
  a.E = 3;
  a.w = w.data();
  EXPECT_EQ(ops->gate(state, &a), MOE_OK) << err();
}

// ---- select -------------------------------------------------------------------------------------

class CpuSelect : public CpuStages {
 protected:
  moe_status run(int64_t T, int64_t E, int64_t k, const std::vector<float> &logits, const std::vector<float> &bias,
                 SelectOut &o, int score = MOE_SCORE_SOFTMAX, int normalize = 1, float routed_scale = 1.0f,
                 int64_t groups = 1, int64_t topk_groups = 1) {
    return moe_test::run_select(ops, state, T, E, {k, score, normalize, routed_scale, groups, topk_groups}, logits,
                                bias, o);
  }

  // Every token has k distinct ids in [0, E); counts is their histogram.
  static void check_ids(const SelectOut &o, int64_t T, int64_t E, int64_t k) {
    std::vector<int64_t> hist(E, 0);
    for (int64_t t = 0; t < T; ++t) {
      std::set<int32_t> seen;
      for (int64_t j = 0; j < k; ++j) {
        int32_t e = o.ids[t * k + j];
        ASSERT_GE(e, 0) << "token " << t;
        ASSERT_LT(e, E) << "token " << t;
        EXPECT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
        ++hist[e];
      }
    }
    EXPECT_EQ(o.counts, hist);
    EXPECT_EQ(std::accumulate(o.counts.begin(), o.counts.end(), int64_t{0}), T * k);
  }
};

TEST_F(CpuSelect, TopKMatchesNaiveSortOnDistinctLogits) {
  const int64_t T = 64, E = 8, k = 3;
  Rng rng(2);
  std::vector<float> logits(T * E), bias(E, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    for (int64_t i = E - 1; i > 0; --i) std::swap(perm[i], perm[rng.range(0, static_cast<int>(i))]);
    for (int64_t e = 0; e < E; ++e) logits[t * E + e] = static_cast<float>(perm[e]) - 3.0f;  // distinct integers
  }
  SelectOut o;
  ASSERT_EQ(run(T, E, k, logits, bias, o), MOE_OK) << err();
  check_ids(o, T, E, k);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int x, int y) { return logits[t * E + x] > logits[t * E + y]; });
    double m = -1e30, s = 0.0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(logits[t * E + e]));
    for (int64_t e = 0; e < E; ++e) s += std::exp(logits[t * E + e] - m);
    double wsum = 0.0;
    for (int64_t j = 0; j < k; ++j) wsum += std::exp(logits[t * E + order[j]] - m) / s;
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(o.ids[t * k + j], order[j]) << "token " << t << " choice " << j;
      const double p = std::exp(logits[t * E + order[j]] - m) / s;
      EXPECT_NEAR(o.scores[t * E + order[j]], p, 1e-6);
      EXPECT_NEAR(o.topk_w[t * k + j], p / wsum, 1e-6);
    }
    EXPECT_NEAR(o.lse[t], m + std::log(s), 1e-5);
    double row = 0.0;
    for (int64_t e = 0; e < E; ++e) row += o.scores[t * E + e];
    EXPECT_NEAR(row, 1.0, 1e-5);
  }
}

TEST_F(CpuSelect, TiesGoToTheLowerIndex) {
  const int64_t E = 6, k = 3;
  // Row 0: all equal -> 0,1,2. Row 1: two tied maxima at 4 and 2 -> 2,4 then the tied 1.0s at 0,5 -> 0.
  std::vector<float> logits = {0, 0, 0, 0, 0, 0,  //
                               1, 0, 3, -1, 3, 1};
  std::vector<float> bias(E, 0.0f);
  SelectOut o;
  ASSERT_EQ(run(2, E, k, logits, bias, o), MOE_OK) << err();
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin(), o.ids.begin() + 3), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin() + 3, o.ids.end()), (std::vector<int32_t>{2, 4, 0}));
  // Equal scores give equal normalized weights.
  EXPECT_EQ(o.topk_w[0], o.topk_w[1]);
  EXPECT_EQ(o.topk_w[1], o.topk_w[2]);
  EXPECT_EQ(o.topk_w[3], o.topk_w[4]);
  // Same with sigmoid scores.
  ASSERT_EQ(run(2, E, k, logits, bias, o, MOE_SCORE_SIGMOID), MOE_OK) << err();
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin(), o.ids.begin() + 3), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin() + 3, o.ids.end()), (std::vector<int32_t>{2, 4, 0}));
}

TEST_F(CpuSelect, NaNLogitsStillGiveKDistinctIds) {
  const int64_t E = 5, k = 3, T = 4;
  std::vector<float> logits = {kNaN, kNaN, kNaN, kNaN, kNaN,  // all NaN
                               1,    kNaN, 2,    0,    3,     // one NaN
                               kNaN, 0,    0,    0,    kNaN,  // NaN at both ends
                               0,    1,    2,    3,    4};    // clean
  std::vector<float> bias(E, 0.0f);
  for (int score : {MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID}) {
    SelectOut o;
    ASSERT_EQ(run(T, E, k, logits, bias, o, score), MOE_OK) << err();
    check_ids(o, T, E, k);
    EXPECT_EQ(std::vector<int32_t>(o.ids.begin() + 9, o.ids.end()), (std::vector<int32_t>{4, 3, 2})) << score;
  }
  // With sigmoid scores a NaN score counts as -inf and the other experts keep their order.
  SelectOut o;
  ASSERT_EQ(run(T, E, k, logits, bias, o, MOE_SCORE_SIGMOID), MOE_OK) << err();
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin() + 3, o.ids.begin() + 6), (std::vector<int32_t>{4, 2, 0}));
  EXPECT_EQ(std::vector<int32_t>(o.ids.begin() + 6, o.ids.begin() + 9), (std::vector<int32_t>{1, 2, 3}));
  // NaN selection bias also counts as -inf.
  std::vector<float> nbias = {kNaN, 0, 0, 0, kNaN};
  std::vector<float> zero(E, 0.0f);
  ASSERT_EQ(run(1, E, k, zero, nbias, o, MOE_SCORE_SIGMOID), MOE_OK) << err();
  check_ids(o, 1, E, k);
  EXPECT_EQ(o.ids, (std::vector<int32_t>{1, 2, 3}));
}

TEST_F(CpuSelect, BiasSteersSelectionButNotWeights) {
  const int64_t E = 4, k = 2;
  std::vector<float> logits(E, 0.0f);  // sigmoid(0) = 0.5 exactly for every expert
  std::vector<float> bias = {0.0f, 0.0f, 1.0f, 0.5f};
  SelectOut o;
  ASSERT_EQ(run(1, E, k, logits, bias, o, MOE_SCORE_SIGMOID, /*normalize=*/0, /*routed_scale=*/2.0f), MOE_OK)
      << err();
  EXPECT_EQ(o.ids, (std::vector<int32_t>{2, 3}));
  for (int e = 0; e < E; ++e) EXPECT_EQ(o.scores[e], 0.5f);
  EXPECT_EQ(o.topk_w, (std::vector<float>{1.0f, 1.0f}));  // S (not S + bias) times routed_scale
  ASSERT_EQ(run(1, E, k, logits, bias, o, MOE_SCORE_SIGMOID, /*normalize=*/1, /*routed_scale=*/1.0f), MOE_OK)
      << err();
  EXPECT_EQ(o.ids, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(o.topk_w, (std::vector<float>{0.5f, 0.5f}));
  ASSERT_EQ(run(1, E, k, logits, bias, o, MOE_SCORE_SIGMOID, /*normalize=*/1, /*routed_scale=*/2.5f), MOE_OK)
      << err();
  EXPECT_EQ(o.topk_w, (std::vector<float>{1.25f, 1.25f}));
}

TEST_F(CpuSelect, GroupLimitedRoutingMasksLosingGroups) {
  const int64_t E = 8, k = 2;
  std::vector<float> logits(E, 0.0f);  // sigmoid: S = 0.5, selection = 0.5 + bias
  // Groups of 2: {0,1} top-2 sum 3.5 + -9.5 = -6; {2,3}: 3; {4,5}: 2; {6,7}: 1.
  std::vector<float> bias = {3.0f, -10.0f, 1.0f, 1.0f, 0.5f, 0.5f, 0.0f, 0.0f};
  SelectOut o;
  ASSERT_EQ(run(1, E, k, logits, bias, o, MOE_SCORE_SIGMOID, 1, 1.0f, /*groups=*/4, /*topk_groups=*/2), MOE_OK)
      << err();
  EXPECT_EQ(o.ids, (std::vector<int32_t>{2, 3}));  // expert 0 is best alone but its group loses
  ASSERT_EQ(run(1, E, k, logits, bias, o, MOE_SCORE_SIGMOID, 1, 1.0f, /*groups=*/1, /*topk_groups=*/1), MOE_OK)
      << err();
  EXPECT_EQ(o.ids, (std::vector<int32_t>{0, 2}));  // without groups
  // k = 4 from the 2 kept groups {2,3} and {4,5}: all four of them.
  SelectOut o4;
  ASSERT_EQ(run(1, E, 4, logits, bias, o4, MOE_SCORE_SIGMOID, 1, 1.0f, 4, 2), MOE_OK) << err();
  EXPECT_EQ(o4.ids, (std::vector<int32_t>{2, 3, 4, 5}));
}

TEST_F(CpuSelect, AuxSumsOnUniformLogits) {
  const int64_t T = 300, E = 4, k = 2;  // more than one reduction block of tokens
  std::vector<float> logits(T * E, 0.0f), bias(E, 0.0f);
  SelectOut o;
  ASSERT_EQ(run(T, E, k, logits, bias, o), MOE_OK) << err();
  check_ids(o, T, E, k);
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(o.ids[t * k], 0);
    EXPECT_EQ(o.ids[t * k + 1], 1);
  }
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(o.scores[e], 0.25f);
  for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(o.prob_sum[e], T * 0.25, 1e-9);
  EXPECT_NEAR(o.lse_sq_sum, T * std::log(4.0) * std::log(4.0), 1e-3);
  EXPECT_EQ(o.counts, (std::vector<int64_t>{T, T, 0, 0}));
  // Sigmoid: P = S / sum_e S = 1/E.
  ASSERT_EQ(run(T, E, k, logits, bias, o, MOE_SCORE_SIGMOID), MOE_OK) << err();
  for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(o.prob_sum[e], T * 0.25, 1e-9);
}

TEST_F(CpuSelect, DenseMixtureTakesEveryExpert) {
  const int64_t T = 5, E = 4, k = 4;
  Rng rng(3);
  std::vector<float> logits = rng.ints(T * E, -4, 4), bias(E, 0.0f);
  SelectOut o;
  ASSERT_EQ(run(T, E, k, logits, bias, o), MOE_OK) << err();
  check_ids(o, T, E, k);
  for (int64_t t = 0; t < T; ++t) {
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += o.topk_w[t * k + j];
    EXPECT_NEAR(s, 1.0, 1e-6);
  }
}

TEST_F(CpuSelect, NoTokens) {
  std::vector<float> logits, bias(4, 0.0f);
  SelectOut o;
  ASSERT_EQ(run(0, 4, 2, logits, bias, o), MOE_OK) << err();
  EXPECT_EQ(o.counts, (std::vector<int64_t>(4, 0)));
  EXPECT_EQ(o.prob_sum, (std::vector<double>(4, 0.0)));
  EXPECT_EQ(o.lse_sq_sum, 0.0);
}

TEST_F(CpuSelect, BackwardOfSoftmaxSumsToZeroPerToken) {
  // Softmax logits are shift invariant, so each token's dlogits must sum to 0 whatever dLoss/dS.
  const int64_t T = 6, E = 5, k = 2;
  Rng rng(4);
  std::vector<float> logits = rng.ints(T * E, -3, 3), bias(E, 0.0f);
  SelectOut o;
  ASSERT_EQ(run(T, E, k, logits, bias, o), MOE_OK) << err();
  std::vector<int32_t> row_of_slot(T * k);
  std::iota(row_of_slot.begin(), row_of_slot.end(), 0);
  std::vector<float> drow = rng.ints(T * k, -2, 2), lb(E), dlogits(T * E, kNaN);
  for (int64_t e = 0; e < E; ++e) lb[e] = 0.25f * static_cast<float>(e);
  moe_select_bwd_args b{};
  b.T = T;
  b.E = E;
  b.k = k;
  b.score = MOE_SCORE_SOFTMAX;
  b.normalize = 1;
  b.routed_scale = 1.0f;
  b.logits = logits.data();
  b.scores = o.scores.data();
  b.lse = o.lse.data();
  b.topk_ids = o.ids.data();
  b.row_of_slot = row_of_slot.data();
  b.drow_weight = drow.data();
  b.lb_coef = lb.data();
  b.z_coef = 0.5f;
  b.dlogits = dlogits.data();
  ASSERT_EQ(ops->select_bwd(state, &b), MOE_OK) << err();
  for (int64_t t = 0; t < T; ++t) {
    double s = 0.0, sabs = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      ASSERT_TRUE(std::isfinite(dlogits[t * E + e]));
      s += dlogits[t * E + e];
      sabs += std::fabs(dlogits[t * E + e]);
    }
    // The z-loss term adds z_coef * 2/T * lse * softmax, which sums to z_coef * 2/T * lse.
    EXPECT_NEAR(s, 0.5 * 2.0 / T * o.lse[t], 1e-5 * sabs + 1e-6) << "token " << t;
  }
}

// ---- plan ---------------------------------------------------------------------------------------

class CpuPlan : public CpuStages {
 protected:
  moe_status run(int64_t T, int64_t E, int64_t k, int64_t capacity, int policy, const std::vector<int32_t> &ids,
                 const std::vector<float> &w, Plan &o) {
    return moe_test::run_plan(ops, state, T, E, k, capacity, policy, ids, w, o);
  }

  // The invariants every plan must keep.
  static void check_plan(int64_t T, int64_t E, int64_t k, int64_t capacity, const std::vector<int32_t> &ids,
                         const std::vector<float> &w, const Plan &o) {
    const int64_t n = T * k;
    std::vector<int64_t> counts(E, 0);
    for (int32_t e : ids) ++counts[e];
    ASSERT_EQ(o.offsets[0], 0);
    for (int64_t e = 0; e < E; ++e) {
      EXPECT_EQ(o.offsets[e + 1] - o.offsets[e], o.kept[e]) << "expert " << e;
      // Both policies keep exactly min(n_e, C) slots; dropless keeps all.
      const int64_t expect = capacity < 0 ? counts[e] : std::min(counts[e], capacity);
      EXPECT_EQ(o.kept[e], expect) << "expert " << e;
      if (capacity >= 0) {
        EXPECT_LE(o.kept[e], capacity) << "expert " << e;
      }
    }
    const int64_t R = o.offsets[E];
    int64_t dropped = 0;
    for (int64_t s = 0; s < n; ++s) dropped += o.row_of_slot[s] < 0;
    EXPECT_EQ(R + dropped, n) << "token conservation: kept + dropped == T*k";
    EXPECT_EQ(std::accumulate(o.kept.begin(), o.kept.end(), int64_t{0}), R);
    // row_of_slot and (row_slot, row_token, row_weight) are inverse maps; rows sit in their expert's range.
    std::vector<int> hit(R, 0);
    for (int64_t s = 0; s < n; ++s) {
      const int32_t r = o.row_of_slot[s];
      if (r < 0) continue;
      ASSERT_LT(r, R);
      ++hit[r];
      EXPECT_EQ(o.row_slot[r], s);
      EXPECT_EQ(o.row_token[r], s / k);
      EXPECT_EQ(o.row_weight[r], w[s]);
      const int32_t e = ids[s];
      EXPECT_GE(r, o.offsets[e]);
      EXPECT_LT(r, o.offsets[e + 1]);
    }
    for (int64_t r = 0; r < R; ++r) EXPECT_EQ(hit[r], 1) << "row " << r;
    // Within an expert, rows are in token order (deterministic layout).
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = o.offsets[e] + 1; r < o.offsets[e + 1]; ++r) EXPECT_LT(o.row_slot[r - 1], o.row_slot[r]);
    for (int64_t e = 0; e < E; ++e) {
      double s = 0.0;
      for (int64_t r = o.offsets[e]; r < o.offsets[e + 1]; ++r) s += o.row_weight[r];
      EXPECT_EQ(o.weight_sum[e], s) << "expert " << e;
    }
  }
};

// Random top-k ids (distinct per token, skewed so that capacity bites) and dyadic weights (exact in float).
void random_routing(Rng &rng, int64_t T, int64_t E, int64_t k, std::vector<int32_t> &ids, std::vector<float> &w) {
  ids = moe_test::skewed_ids(rng, T, E, k);
  w.resize(T * k);
  for (float &v : w) v = static_cast<float>(rng.range(1, 64)) / 64.0f;
}

TEST_F(CpuPlan, DroplessKeepsEverySlot) {
  const int64_t T = 40, E = 6, k = 2;
  Rng rng(5);
  std::vector<int32_t> ids;
  std::vector<float> w;
  random_routing(rng, T, E, k, ids, w);
  Plan o;
  ASSERT_EQ(run(T, E, k, -1, MOE_DROP_POSITION, ids, w, o), MOE_OK) << err();
  check_plan(T, E, k, -1, ids, w, o);
  for (int64_t s = 0; s < T * k; ++s) EXPECT_GE(o.row_of_slot[s], 0);
}

TEST_F(CpuPlan, CapacityPositionKeepsFirstChoicesFirst) {
  for (uint64_t seed = 10; seed < 20; ++seed) {
    const int64_t T = 32, E = 4, k = 2;
    Rng rng(seed);
    std::vector<int32_t> ids;
    std::vector<float> w;
    random_routing(rng, T, E, k, ids, w);
    const int64_t C = static_cast<int64_t>(std::ceil(1.0 * T * k / E));  // capacity factor 1
    Plan o;
    ASSERT_EQ(run(T, E, k, C, MOE_DROP_POSITION, ids, w, o), MOE_OK) << err();
    check_plan(T, E, k, C, ids, w, o);
    // Reference: per expert, the first C slots in the order (choice j, then token t).
    std::vector<int64_t> used(E, 0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = t * k + j, e = ids[s];
        const bool keep = used[e] < C;
        used[e] += keep;
        EXPECT_EQ(o.row_of_slot[s] >= 0, keep) << "seed " << seed << " token " << t << " choice " << j;
      }
  }
}

TEST_F(CpuPlan, PositionPrefersAnyFirstChoiceOverAnEarlierTokensSecondChoice) {
  // Token 0 picks expert 0 second; tokens 1 and 2 pick expert 0 first. C = 2: token 0's second
  // choice is the one dropped although token 0 comes first.
  const int64_t T = 3, E = 3, k = 2;
  std::vector<int32_t> ids = {1, 0, 0, 2, 0, 1};
  std::vector<float> w = {0.75f, 0.25f, 0.5f, 0.5f, 0.5f, 0.5f};
  Plan o;
  ASSERT_EQ(run(T, E, k, 2, MOE_DROP_POSITION, ids, w, o), MOE_OK) << err();
  check_plan(T, E, k, 2, ids, w, o);
  EXPECT_LT(o.row_of_slot[1], 0);  // token 0, choice 1 (expert 0): dropped
  EXPECT_GE(o.row_of_slot[2], 0);  // token 1, choice 0
  EXPECT_GE(o.row_of_slot[4], 0);  // token 2, choice 0
  EXPECT_EQ(o.kept, (std::vector<int64_t>{2, 2, 1}));
}

TEST_F(CpuPlan, CapacityProbsKeepsLargestWeights) {
  for (uint64_t seed = 30; seed < 40; ++seed) {
    const int64_t T = 32, E = 4, k = 2;
    Rng rng(seed);
    std::vector<int32_t> ids;
    std::vector<float> w;
    random_routing(rng, T, E, k, ids, w);
    const int64_t C = 10;
    Plan o;
    ASSERT_EQ(run(T, E, k, C, MOE_DROP_PROBS, ids, w, o), MOE_OK) << err();
    check_plan(T, E, k, C, ids, w, o);
    // Every kept slot of an expert weighs at least as much as every dropped slot of it.
    for (int64_t e = 0; e < E; ++e) {
      float min_kept = 2.0f, max_dropped = -1.0f;
      for (int64_t s = 0; s < T * k; ++s) {
        if (ids[s] != e) continue;
        if (o.row_of_slot[s] >= 0) min_kept = std::min(min_kept, w[s]);
        else max_dropped = std::max(max_dropped, w[s]);
      }
      EXPECT_GE(min_kept, max_dropped) << "seed " << seed << " expert " << e;
    }
  }
}

TEST_F(CpuPlan, ProbsDropsTheSmallWeightEvenIfItComesFirst) {
  const int64_t T = 3, E = 2, k = 1;
  std::vector<int32_t> ids = {0, 0, 0};
  std::vector<float> w = {0.125f, 0.5f, 0.25f};
  Plan o;
  ASSERT_EQ(run(T, E, k, 2, MOE_DROP_PROBS, ids, w, o), MOE_OK) << err();
  check_plan(T, E, k, 2, ids, w, o);
  EXPECT_LT(o.row_of_slot[0], 0);
  EXPECT_GE(o.row_of_slot[1], 0);
  EXPECT_GE(o.row_of_slot[2], 0);
  ASSERT_EQ(run(T, E, k, 2, MOE_DROP_POSITION, ids, w, o), MOE_OK) << err();
  EXPECT_GE(o.row_of_slot[0], 0);
  EXPECT_GE(o.row_of_slot[1], 0);
  EXPECT_LT(o.row_of_slot[2], 0);
}

TEST_F(CpuPlan, CapacityZeroDropsEverything) {
  const int64_t T = 5, E = 3, k = 2;
  Rng rng(6);
  std::vector<int32_t> ids;
  std::vector<float> w;
  random_routing(rng, T, E, k, ids, w);
  for (int policy : {MOE_DROP_POSITION, MOE_DROP_PROBS}) {
    Plan o;
    ASSERT_EQ(run(T, E, k, 0, policy, ids, w, o), MOE_OK) << err();
    check_plan(T, E, k, 0, ids, w, o);
    EXPECT_EQ(o.offsets[E], 0);
  }
}

// weight_sum follows the order backend.h fixes (128 lanes of 32-row chunks, then the lanes
// pairwise), so that the CUDA plan gives the same bits: here with weights whose sums round, on
// experts with thousands of rows (every lane used, several chunks each) and with a few rows.
TEST_F(CpuPlan, WeightSumFollowsTheFixedOrder) {
  const int64_t T = 8000, E = 5, k = 2;
  Rng rng(41);
  std::vector<int32_t> ids(T * k);
  for (int64_t t = 0; t < T; ++t) {
    // Experts 0-2 get almost every token; 3 and 4 a handful (fewer than one chunk).
    const bool rare = rng.below(1000) < 4;
    ids[t * k] = static_cast<int32_t>(rare ? 3 + rng.below(2) : rng.below(3));
    ids[t * k + 1] = static_cast<int32_t>((ids[t * k] + 1 + rng.below(2)) % 3);
  }
  std::vector<float> w(T * k);
  for (float &v : w) v = rng.uniform(1e-4f, 1.0f) * (rng.chance(10) ? 1e-3f : 1.0f);
  Plan o;
  ASSERT_EQ(run(T, E, k, -1, MOE_DROP_POSITION, ids, w, o), MOE_OK) << err();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t b = o.offsets[e], n = o.offsets[e + 1] - b;
    ASSERT_GT(n, 0) << "expert " << e;
    // The order, written out: row i of the expert goes to lane (i / 32) % 128.
    std::vector<double> lanes(128, 0.0);
    for (int64_t i = 0; i < n; ++i) lanes[(i / 32) % 128] += o.row_weight[b + i];
    for (size_t s = 64; s > 0; s /= 2)
      for (size_t i = 0; i < s; ++i) lanes[i] += lanes[i + s];
    EXPECT_EQ(o.weight_sum[e], lanes[0]) << "expert " << e << " (" << n << " rows)";
    long double exact = 0.0L;
    double plain = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      exact += o.row_weight[b + i];
      plain += o.row_weight[b + i];
    }
    EXPECT_NEAR(o.weight_sum[e], static_cast<double>(exact), 1e-13 * static_cast<double>(exact)) << "expert " << e;
    if (n <= 32) {
      EXPECT_EQ(o.weight_sum[e], plain) << "a single chunk is the plain row-order sum";
    } else {
      EXPECT_GT(n, 128 * 32) << "expert " << e << ": the test wants every lane and several chunks per lane";
    }
  }
}

// ---- dispatch / combine -------------------------------------------------------------------------

struct Routed {
  int64_t T, E, k, d, R;
  std::vector<int32_t> ids;
  std::vector<float> w;
  Plan plan;
};

class CpuRows : public CpuPlan {
 protected:
  Routed route(int64_t T, int64_t E, int64_t k, int64_t d, int64_t capacity, uint64_t seed, float unit = -1.0f) {
    Routed r{T, E, k, d, 0, {}, {}, {}};
    Rng rng(seed);
    random_routing(rng, T, E, k, r.ids, r.w);
    if (unit >= 0) std::fill(r.w.begin(), r.w.end(), unit);
    EXPECT_EQ(run(T, E, k, capacity, MOE_DROP_POSITION, r.ids, r.w, r.plan), MOE_OK) << err();
    r.R = r.plan.offsets[E];
    return r;
  }
};

TEST_F(CpuRows, DispatchGathersRowsInExpertOrder) {
  Routed r = route(20, 5, 2, 6, -1, 7);
  Rng rng(8);
  std::vector<float> x = rng.ints(r.T * r.d, -9, 9), xe(r.R * r.d, kNaN);
  moe_rows_args a = rows_args(r.plan, r.d);
  a.x = x.data();
  a.xe = xe.data();
  ASSERT_EQ(ops->dispatch(state, &a), MOE_OK) << err();
  for (int64_t row = 0; row < r.R; ++row)
    for (int64_t c = 0; c < r.d; ++c) EXPECT_EQ(xe[row * r.d + c], x[r.plan.row_token[row] * r.d + c]);
}

TEST_F(CpuRows, DispatchThenCombineWithUnitWeightsRestoresInput) {
  // k = 1, weight 1: y == x bit for bit.
  {
    Routed r = route(33, 4, 1, 8, -1, 9, 1.0f);
    Rng rng(10);
    std::vector<float> x = rng.ints(r.T * r.d, -100, 100), xe(r.R * r.d), y(r.T * r.d, kNaN);
    moe_rows_args a = rows_args(r.plan, r.d);
    a.x = x.data();
    a.xe = xe.data();
    ASSERT_EQ(ops->dispatch(state, &a), MOE_OK) << err();
    a.ye = xe.data();  // identity experts
    a.y = y.data();
    ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
    EXPECT_EQ(y, x);
  }
  // k = 4, weights 1/4: the four copies sum back to x exactly.
  {
    Routed r = route(17, 6, 4, 5, -1, 11, 0.25f);
    Rng rng(12);
    std::vector<float> x = rng.ints(r.T * r.d, -100, 100), xe(r.R * r.d), y(r.T * r.d, kNaN);
    moe_rows_args a = rows_args(r.plan, r.d);
    a.x = x.data();
    a.xe = xe.data();
    ASSERT_EQ(ops->dispatch(state, &a), MOE_OK) << err();
    a.ye = xe.data();
    a.y = y.data();
    ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
    EXPECT_EQ(y, x);
  }
}

TEST_F(CpuRows, CombineIsTheWeightedSumOfKeptRows) {
  Routed r = route(24, 4, 2, 3, 8, 13);  // capacity 8 < 12 average: some slots dropped
  ASSERT_LT(r.R, r.T * r.k);
  Rng rng(14);
  std::vector<float> ye = rng.ints(r.R * r.d, -8, 8), y(r.T * r.d, kNaN);
  moe_rows_args a = rows_args(r.plan, r.d);
  a.ye = ye.data();
  a.y = y.data();
  ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
  for (int64_t t = 0; t < r.T; ++t)
    for (int64_t c = 0; c < r.d; ++c) {
      float ref = 0.0f;  // in choice order, as the kernel documents
      for (int64_t j = 0; j < r.k; ++j) {
        int32_t row = r.plan.row_of_slot[t * r.k + j];
        if (row >= 0) ref += r.w[t * r.k + j] * ye[row * r.d + c];
      }
      EXPECT_EQ(y[t * r.d + c], ref) << t << "," << c;
    }
}

TEST_F(CpuRows, DispatchBackwardSumsEachTokensRows) {
  Routed r = route(24, 4, 3, 4, 12, 15);
  Rng rng(16);
  std::vector<float> dxe = rng.ints(r.R * r.d, -5, 5), dx(r.T * r.d, kNaN);
  moe_rows_args a = rows_args(r.plan, r.d);
  a.dxe = dxe.data();
  a.dx = dx.data();
  ASSERT_EQ(ops->dispatch_bwd(state, &a), MOE_OK) << err();
  for (int64_t t = 0; t < r.T; ++t)
    for (int64_t c = 0; c < r.d; ++c) {
      float ref = 0.0f;
      for (int64_t j = 0; j < r.k; ++j) {
        int32_t row = r.plan.row_of_slot[t * r.k + j];
        if (row >= 0) ref += dxe[row * r.d + c];
      }
      EXPECT_EQ(dx[t * r.d + c], ref);
    }
}

TEST_F(CpuRows, CombineBackward) {
  Routed r = route(16, 4, 2, 5, -1, 17);
  Rng rng(18);
  std::vector<float> ye = rng.ints(r.R * r.d, -4, 4), dy = rng.ints(r.T * r.d, -4, 4);
  std::vector<float> dye(r.R * r.d, kNaN), dw(r.R, kNaN);
  moe_rows_args a = rows_args(r.plan, r.d);
  a.ye = ye.data();
  a.dy = dy.data();
  a.dye = dye.data();
  a.drow_weight = dw.data();
  ASSERT_EQ(ops->combine_bwd(state, &a), MOE_OK) << err();
  for (int64_t row = 0; row < r.R; ++row) {
    const int64_t t = r.plan.row_token[row];
    float dot = 0.0f;
    for (int64_t c = 0; c < r.d; ++c) {
      EXPECT_EQ(dye[row * r.d + c], r.plan.row_weight[row] * dy[t * r.d + c]);
      dot += dy[t * r.d + c] * ye[row * r.d + c];
    }
    EXPECT_EQ(dw[row], dot) << "row " << row;
  }
}

TEST_F(CpuRows, CombineWithVariableRowsPerToken) {
  // token_offsets given (expert choice): token t owns token_rows[token_offsets[t] .. token_offsets[t+1]).
  const int64_t T = 4, d = 3, R = 5;
  std::vector<int64_t> toff = {0, 2, 2, 5, 5};  // token 1 and 3 have no rows
  std::vector<int32_t> trows = {3, 0, 1, 4, 2};
  std::vector<int32_t> rtok = {0, 2, 2, 0, 2};
  std::vector<float> rw = {0.5f, 1.0f, 2.0f, 0.25f, -1.0f};
  Rng rng(19);
  std::vector<float> ye = rng.ints(R * d, -6, 6), y(T * d, kNaN);
  moe_rows_args a{};
  a.T = T;
  a.d = d;
  a.R = R;
  a.token_offsets = toff.data();
  a.token_rows = trows.data();
  a.row_token = rtok.data();
  a.row_weight = rw.data();
  a.ye = ye.data();
  a.y = y.data();
  ASSERT_EQ(ops->combine(state, &a), MOE_OK) << err();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) {
      float ref = 0.0f;
      for (int64_t i = toff[t]; i < toff[t + 1]; ++i) ref += rw[trows[i]] * ye[trows[i] * d + c];
      EXPECT_EQ(y[t * d + c], ref);
    }
}

// ---- expert FFN ---------------------------------------------------------------------------------

// Naive ReLU FFN of one row: y = relu(x W1^T) W2^T; returns h too.
void naive_relu_ffn(const float *x, const float *w1, const float *w2, int64_t d, int64_t ff, float *h, float *y) {
  std::vector<float> a(ff);
  for (int64_t f = 0; f < ff; ++f) {
    float s = 0.0f;
    for (int64_t c = 0; c < d; ++c) s += x[c] * w1[f * d + c];
    h[f] = s;
    a[f] = s > 0.0f ? s : 0.0f;
  }
  for (int64_t c = 0; c < d; ++c) {
    float s = 0.0f;
    for (int64_t f = 0; f < ff; ++f) s += a[f] * w2[c * ff + f];
    y[c] = s;
  }
}

TEST_F(CpuStages, ExpertFfnReluMatchesNaiveLoops) {
  const int64_t E = 4, d = 6, ff = 5;
  std::vector<int64_t> offsets = {0, 3, 3, 7, 12};  // expert 1 has no rows
  const int64_t R = offsets[E];
  Rng rng(20);
  std::vector<float> x = rng.ints(R * d, -3, 3), w1 = rng.ints(E * ff * d, -2, 2), w2 = rng.ints(E * d * ff, -2, 2);
  std::vector<float> h(R * ff, kNaN), a_(R * ff, kNaN), y(R * d, kNaN);
  moe_ffn_args a = moe_test::ffn_args(E, d, ff, MOE_ACT_RELU, offsets);
  a.x = x.data();
  a.w1 = w1.data();
  a.w2 = w2.data();
  a.h = h.data();
  a.a = a_.data();
  a.y = y.data();
  ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << err();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<float> href(ff), yref(d);
      naive_relu_ffn(&x[r * d], &w1[e * ff * d], &w2[e * d * ff], d, ff, href.data(), yref.data());
      for (int64_t f = 0; f < ff; ++f) EXPECT_EQ(h[r * ff + f], href[f]) << "h row " << r;
      for (int64_t c = 0; c < d; ++c) EXPECT_EQ(y[r * d + c], yref[c]) << "y row " << r << " col " << c;
    }

  // Backward: dW2 += dY^T A, dA = dY W2, dH = dA * [H > 0], dW1 += dH^T X, dX = dH W1.
  std::vector<float> dy = rng.ints(R * d, -2, 2);
  std::vector<float> dw1_0 = rng.ints(E * ff * d, -1, 1), dw2_0 = rng.ints(E * d * ff, -1, 1);
  std::vector<float> dw1 = dw1_0, dw2 = dw2_0, dx(R * d, kNaN), dh(R * ff, kNaN);
  a.dy = dy.data();
  a.dx = dx.data();
  a.dw1 = dw1.data();
  a.dw2 = dw2.data();
  a.dh = dh.data();
  ASSERT_EQ(ops->expert_ffn_bwd(state, &a), MOE_OK) << err();
  std::vector<float> rdw1 = dw1_0, rdw2 = dw2_0, rdx(R * d, 0.0f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<float> hr(ff), yr(d), dhr(ff);
      naive_relu_ffn(&x[r * d], &w1[e * ff * d], &w2[e * d * ff], d, ff, hr.data(), yr.data());
      for (int64_t f = 0; f < ff; ++f) {
        float da = 0.0f;
        for (int64_t c = 0; c < d; ++c) da += dy[r * d + c] * w2[e * d * ff + c * ff + f];
        dhr[f] = hr[f] > 0.0f ? da : 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          rdw2[e * d * ff + c * ff + f] += dy[r * d + c] * (hr[f] > 0.0f ? hr[f] : 0.0f);
          rdw1[e * ff * d + f * d + c] += dhr[f] * x[r * d + c];
        }
      }
      for (int64_t c = 0; c < d; ++c)
        for (int64_t f = 0; f < ff; ++f) rdx[r * d + c] += dhr[f] * w1[e * ff * d + f * d + c];
    }
  EXPECT_EQ(dw1, rdw1);
  EXPECT_EQ(dw2, rdw2);
  EXPECT_EQ(dx, rdx);
}

// A ReLU expert FFN over experts of the given rows, with biases and without (then also as an
// inference forward), checked bit for bit against naive loops at one thread and at two. Integer
// values keep every sum exact, so each row, its expert's biases and where it lands are checked
// exactly.
// Runs check(t) at t = 1 thread and at 2, then restores the thread count.
template <class Check>
void at_1_and_2_threads(Check &&check) {
  const int threads = omp_get_max_threads();
  for (int t : {1, 2}) {
    omp_set_num_threads(t);
    check(t);
  }
  omp_set_num_threads(threads);
}

void expect_exact_ffn(const moe_backend_ops *ops, void *state, int64_t d, int64_t ff, std::vector<int64_t> offsets) {
  SCOPED_TRACE("d " + std::to_string(d) + " ff " + std::to_string(ff));
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t R = offsets[E];
  Rng rng(22);
  const std::vector<float> x = rng.ints(R * d, -3, 3), w1 = rng.ints(E * ff * d, -2, 2),
                           w2 = rng.ints(E * d * ff, -2, 2), b1 = rng.ints(E * ff, -4, 4), b2 = rng.ints(E * d, -4, 4);
  // [1]: with the biases, [0]: without.
  std::vector<float> href[2], aref[2], yref[2];
  for (int biases : {0, 1}) {
    href[biases].resize(R * ff);
    aref[biases].resize(R * ff);
    yref[biases].resize(R * d);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        for (int64_t f = 0; f < ff; ++f) {
          float s = biases ? b1[e * ff + f] : 0.0f;
          for (int64_t c = 0; c < d; ++c) s += x[r * d + c] * w1[(e * ff + f) * d + c];
          href[biases][r * ff + f] = s;
          aref[biases][r * ff + f] = s > 0.0f ? s : 0.0f;
        }
        for (int64_t c = 0; c < d; ++c) {
          float s = biases ? b2[e * d + c] : 0.0f;
          for (int64_t f = 0; f < ff; ++f) s += aref[biases][r * ff + f] * w2[(e * d + c) * ff + f];
          yref[biases][r * d + c] = s;
        }
      }
  }
  at_1_and_2_threads([&](int t) {
    std::vector<float> h(R * ff, kNaN), a_(R * ff, kNaN), y(R * d, kNaN);
    moe_ffn_args a = moe_test::ffn_args(E, d, ff, MOE_ACT_RELU, offsets);
    a.x = x.data();
    a.w1 = w1.data();
    a.w2 = w2.data();
    a.b1 = b1.data();
    a.b2 = b2.data();
    a.h = h.data();
    a.a = a_.data();
    a.y = y.data();
    ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << ops->last_error(state);
    EXPECT_EQ(h, href[1]) << t << " threads";
    EXPECT_EQ(a_, aref[1]) << t << " threads";
    EXPECT_EQ(y, yref[1]) << t << " threads";
    // Without biases, saved for backward (h and a as rows) and in an inference forward (h and a
    // scratch, perhaps left transposed: y alone counts).
    for (int inference : {0, 1}) {
      std::fill(h.begin(), h.end(), kNaN);
      std::fill(a_.begin(), a_.end(), kNaN);
      std::fill(y.begin(), y.end(), kNaN);
      a.b1 = a.b2 = nullptr;
      a.inference = inference;
      ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << ops->last_error(state);
      EXPECT_EQ(y, yref[0]) << t << " threads, inference " << inference;
      if (!inference) {
        EXPECT_EQ(h, href[0]) << t << " threads";
        EXPECT_EQ(a_, aref[0]) << t << " threads";
      }
    }
  });
}

// Experts with one, a few, tens and hundreds of rows in one call: the CPU backend runs the experts
// with few rows together (one stream of products over all of them, then their rows) and the others
// one by one, on either side of the few-rows threshold of every CPU (4 to 64 rows); 777 rows run,
// on Intel CPUs with AVX-512, as 768 and 9 (SmallRows::f32_sixteens_from). Weights large enough
// for a team of threads.
TEST_F(CpuStages, ExpertFfnFewAndManyRowsInOneCall) {
  // 1, 0, 60, 7, 200, 3 and 777 rows
  expect_exact_ffn(ops, state, 256, 256, {0, 1, 1, 61, 68, 268, 271, 1048});
}

// Rows of x (d) or of a (ff) 4 KB long: the experts with few rows read them through copies at a
// wider stride (see few_rows_input_ld); experts of 2 to 16 rows, each copied row where it belongs.
// Weights large enough for a team of threads.
TEST_F(CpuStages, ExpertFfnFewRowsOf4KB) {
  const std::vector<int64_t> offsets = {0, 2, 7, 7, 23, 30};  // 2, 5, 0, 16 and 7 rows
  expect_exact_ffn(ops, state, 1024, 64, offsets);
  expect_exact_ffn(ops, state, 64, 1024, offsets);
}

// A ReLU expert FFN's backward over experts of the given rows against naive loops, bit for bit
// (integer values keep every sum exact), at one thread and at two.
void expect_exact_ffn_bwd(const moe_backend_ops *ops, void *state, int64_t d, int64_t ff,
                          std::vector<int64_t> offsets) {
  SCOPED_TRACE("d " + std::to_string(d) + " ff " + std::to_string(ff));
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, R = offsets[E];
  Rng rng(23);
  const std::vector<float> x = rng.ints(R * d, -3, 3), w1 = rng.ints(E * ff * d, -2, 2),
                           w2 = rng.ints(E * d * ff, -2, 2), dy = rng.ints(R * d, -2, 2),
                           dw1_0 = rng.ints(E * ff * d, -1, 1), dw2_0 = rng.ints(E * d * ff, -1, 1);
  std::vector<float> h(R * ff), rdw1 = dw1_0, rdw2 = dw2_0, rdx(R * d, 0.0f), rdh(R * ff);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<float> yr(d);
      naive_relu_ffn(&x[r * d], &w1[e * ff * d], &w2[e * d * ff], d, ff, &h[r * ff], yr.data());
      for (int64_t f = 0; f < ff; ++f) {
        float da = 0.0f;
        for (int64_t c = 0; c < d; ++c) da += dy[r * d + c] * w2[e * d * ff + c * ff + f];
        rdh[r * ff + f] = h[r * ff + f] > 0.0f ? da : 0.0f;
      }
    }
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t f = 0; f < ff; ++f)
        for (int64_t c = 0; c < d; ++c) {
          rdw2[e * d * ff + c * ff + f] += dy[r * d + c] * (h[r * ff + f] > 0.0f ? h[r * ff + f] : 0.0f);
          rdw1[e * ff * d + f * d + c] += rdh[r * ff + f] * x[r * d + c];
          rdx[r * d + c] += rdh[r * ff + f] * w1[e * ff * d + f * d + c];
        }
  at_1_and_2_threads([&](int t) {
    std::vector<float> a_(R * ff), dw1 = dw1_0, dw2 = dw2_0, dx(R * d, kNaN), dh(R * ff, kNaN);
    for (int64_t i = 0; i < R * ff; ++i) a_[i] = h[i] > 0.0f ? h[i] : 0.0f;
    moe_ffn_args a = moe_test::ffn_args(E, d, ff, MOE_ACT_RELU, offsets);
    a.x = x.data();
    a.w1 = w1.data();
    a.w2 = w2.data();
    a.h = h.data();
    a.a = a_.data();
    a.dy = dy.data();
    a.dx = dx.data();
    a.dw1 = dw1.data();
    a.dw2 = dw2.data();
    a.dh = dh.data();
    ASSERT_EQ(ops->expert_ffn_bwd(state, &a), MOE_OK) << ops->last_error(state);
    EXPECT_EQ(dh, rdh) << t << " threads";
    EXPECT_EQ(dx, rdx) << t << " threads";
    EXPECT_EQ(dw1, rdw1) << t << " threads";
    EXPECT_EQ(dw2, rdw2) << t << " threads";
  });
}

// Weights whose rows lie 4 KB apart, read along their rows in backward (dY W2, dH W1), by experts
// of 5 to 300 rows: on AVX2 CPUs those of 32 to 352 rows read a copy at a padded stride
// (gemm_weight_rows in cpu/expert_ffn.cpp).
TEST_F(CpuStages, ExpertFfnBackwardWeightRowsOf4KB) {
  expect_exact_ffn_bwd(ops, state, 1024, 1024, {0, 5, 5, 37, 101});  // 5, 0, 32 and 64 rows
  expect_exact_ffn_bwd(ops, state, 1024, 256, {0, 300, 331});       // 300 and 31 rows
}

TEST_F(CpuStages, ExpertFfnGluMatchesNaiveLoops) {
  // SwiGLU / GeGLU involve exp/erf: compare with a double reference to float rounding.
  const int64_t E = 2, d = 4, ff = 3;
  std::vector<int64_t> offsets = {0, 2, 5};
  const int64_t R = 5;
  Rng rng(21);
  std::vector<float> x = rng.ints(R * d, -2, 2), w1 = rng.ints(E * ff * d, -1, 1), w3 = rng.ints(E * ff * d, -1, 1),
                     w2 = rng.ints(E * d * ff, -1, 1);
  for (int act : {MOE_ACT_SWIGLU, MOE_ACT_GEGLU, MOE_ACT_SILU, MOE_ACT_GELU}) {
    const bool glu = act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU;
    std::vector<float> h(R * ff), g(R * ff), a_(R * ff), y(R * d, kNaN);
    moe_ffn_args a = moe_test::ffn_args(E, d, ff, act, offsets);
    a.x = x.data();
    a.w1 = w1.data();
    a.w3 = glu ? w3.data() : nullptr;
    a.w2 = w2.data();
    a.h = h.data();
    a.g = glu ? g.data() : nullptr;
    a.a = a_.data();
    a.y = y.data();
    ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << err();
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
        for (int64_t c = 0; c < d; ++c) {
          double s = 0.0, sabs = 0.0;
          for (int64_t f = 0; f < ff; ++f) {
            double hv = 0.0, gv = 0.0;
            for (int64_t i = 0; i < d; ++i) {
              hv += x[r * d + i] * w1[e * ff * d + f * d + i];
              gv += x[r * d + i] * w3[e * ff * d + f * d + i];
            }
            double av = (act == MOE_ACT_SWIGLU || act == MOE_ACT_SILU) ? hv / (1.0 + std::exp(-hv))
                                                                       : 0.5 * hv * (1.0 + std::erf(hv / std::sqrt(2.0)));
            if (glu) av *= gv;
            s += av * w2[e * d * ff + c * ff + f];
            sabs += std::fabs(av * w2[e * d * ff + c * ff + f]);
          }
          EXPECT_NEAR(y[r * d + c], s, 2e-6 * sabs + 1e-6) << "activation " << act << " row " << r;
        }
  }
}

TEST_F(CpuStages, ExpertFfnSharedInputReadsAllRows) {
  // shared_input: every expert reads rows [0, offsets[1]) and writes its own [T, d] block.
  const int64_t S = 2, T = 3, d = 4, ff = 2;
  std::vector<int64_t> offsets = {0, T};
  Rng rng(22);
  std::vector<float> x = rng.ints(T * d, -3, 3), w1 = rng.ints(S * ff * d, -2, 2), w2 = rng.ints(S * d * ff, -2, 2);
  std::vector<float> h(S * T * ff), a_(S * T * ff), y(S * T * d, kNaN);
  moe_ffn_args a = moe_test::ffn_args(S, d, ff, MOE_ACT_RELU, offsets);
  a.shared_input = 1;
  a.x = x.data();
  a.w1 = w1.data();
  a.w2 = w2.data();
  a.h = h.data();
  a.a = a_.data();
  a.y = y.data();
  ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << err();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<float> href(ff), yref(d);
      naive_relu_ffn(&x[t * d], &w1[s * ff * d], &w2[s * d * ff], d, ff, href.data(), yref.data());
      for (int64_t c = 0; c < d; ++c) EXPECT_EQ(y[(s * T + t) * d + c], yref[c]);
    }
}

// ---- shared combine -----------------------------------------------------------------------------

TEST_F(CpuStages, SharedCombineAddsSharedOutputs) {
  const int64_t T = 4, d = 3, S = 2;
  Rng rng(23);
  std::vector<float> x = rng.ints(T * d, -3, 3), ys = rng.ints(S * T * d, -5, 5), y0 = rng.ints(T * d, -5, 5);
  std::vector<float> y = y0, gate(T, kNaN);
  moe_shared_args a = moe_test::shared_args(T, d, S);
  a.x = x.data();
  a.ys = ys.data();
  a.gate = gate.data();
  a.y = y.data();
  ASSERT_EQ(ops->shared_combine(state, &a), MOE_OK) << err();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) {
      float ref = y0[t * d + c];
      for (int64_t s = 0; s < S; ++s) ref += ys[(s * T + t) * d + c];
      EXPECT_EQ(y[t * d + c], ref);
    }
  // Gate weights of zero: sigmoid(0) = 0.5 exactly.
  std::vector<float> gw(d, 0.0f);
  y = y0;
  a.gate_w = gw.data();
  ASSERT_EQ(ops->shared_combine(state, &a), MOE_OK) << err();
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(gate[t], 0.5f);
    for (int64_t c = 0; c < d; ++c) {
      float ref = y0[t * d + c];
      for (int64_t s = 0; s < S; ++s) ref += 0.5f * ys[(s * T + t) * d + c];
      EXPECT_EQ(y[t * d + c], ref);
    }
  }
  // Backward with the gate: dys = gate * dy; dx and dgate_w get dgate * gate (1 - gate) terms.
  std::vector<float> dy = rng.ints(T * d, -2, 2), dys(S * T * d, kNaN), dx(T * d, 0.0f), dgw(d, 0.0f);
  a.dy = dy.data();
  a.dys = dys.data();
  a.dx = dx.data();
  a.dgate_w = dgw.data();
  ASSERT_EQ(ops->shared_combine_bwd(state, &a), MOE_OK) << err();
  std::vector<float> rdgw(d, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    float dg = 0.0f;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < d; ++c) {
        EXPECT_EQ(dys[(s * T + t) * d + c], 0.5f * dy[t * d + c]);
        dg += dy[t * d + c] * ys[(s * T + t) * d + c];
      }
    const float dp = dg * 0.25f;
    for (int64_t c = 0; c < d; ++c) {
      EXPECT_EQ(dx[t * d + c], dp * gw[c]);
      rdgw[c] += dp * x[t * d + c];
    }
  }
  EXPECT_EQ(dgw, rdgw);
}

}  // namespace

// ---- gpt-oss: clamped SwiGLU with expert biases, against float64 finite differences -------------

namespace {

// The expert FFN of moe.h (MOE_ACT_SWIGLU_CLAMPED with expert biases) in float64: the objective
// sum(y * dy) over the rows of one expert.
struct ClampedFfn {
  int64_t d, ff;
  double alpha, limit;
  double objective(const std::vector<double> &x, const std::vector<double> &w1, const std::vector<double> &w3,
                   const std::vector<double> &w2, const std::vector<double> &b1, const std::vector<double> &b3,
                   const std::vector<double> &b2, const std::vector<double> &dy, int64_t rows) const {
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> a(ff);
      for (int64_t f = 0; f < ff; ++f) {
        double h = b1[f], u = b3[f];
        for (int64_t i = 0; i < d; ++i) {
          h += x[r * d + i] * w1[f * d + i];
          u += x[r * d + i] * w3[f * d + i];
        }
        const double hc = std::min(h, limit), uc = std::clamp(u, -limit, limit);
        a[f] = (uc + 1.0) * hc / (1.0 + std::exp(-alpha * hc));
      }
      for (int64_t c = 0; c < d; ++c) {
        double y = b2[c];
        for (int64_t f = 0; f < ff; ++f) y += a[f] * w2[c * ff + f];
        total += y * dy[r * d + c];
      }
    }
    return total;
  }
};

std::vector<double> wide(const std::vector<float> &v) { return std::vector<double>(v.begin(), v.end()); }

}  // namespace

TEST_F(CpuStages, SwigluClampedWithBiasesMatchesFiniteDifferences) {
  const int64_t d = 5, ff = 6, R = 7;
  const float alpha = 1.702f, limit = 0.9f;  // a small limit: random rows reach both clamps
  std::vector<int64_t> offsets = {0, R};
  Rng rng(31);
  std::vector<float> x = rng.uniforms(R * d, -1.5f, 1.5f), w1 = rng.uniforms(ff * d, -1.0f, 1.0f),
                     w3 = rng.uniforms(ff * d, -1.0f, 1.0f), w2 = rng.uniforms(d * ff, -1.0f, 1.0f),
                     b1 = rng.uniforms(ff, -0.5f, 0.5f), b3 = rng.uniforms(ff, -0.5f, 0.5f),
                     b2 = rng.uniforms(d, -0.5f, 0.5f), dy = rng.uniforms(R * d, -1.0f, 1.0f);
  const ClampedFfn ref{d, ff, alpha, limit};
  // The case reaches every branch of both clamps, and no pre-activation sits near a kink (where a
  // central difference straddles it).
  int above = 0, below = 0, up_above = 0, inside = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t f = 0; f < ff; ++f) {
      double h = b1[f], u = b3[f];
      for (int64_t i = 0; i < d; ++i) {
        h += double(x[r * d + i]) * w1[f * d + i];
        u += double(x[r * d + i]) * w3[f * d + i];
      }
      above += h > limit;
      up_above += u > limit;
      below += u < -limit;
      inside += std::fabs(u) < limit && h < limit;
      ASSERT_GT(std::fabs(std::fabs(u) - limit), 1e-3);
      ASSERT_GT(std::fabs(h - limit), 1e-3);
    }
  ASSERT_TRUE(above > 0 && below > 0 && up_above > 0 && inside > 0) << above << below << up_above << inside;

  std::vector<float> h(R * ff), g(R * ff), a_(R * ff), y(R * d, kNaN);
  moe_ffn_args a = moe_test::ffn_args(1, d, ff, MOE_ACT_SWIGLU_CLAMPED, offsets);
  a.swiglu_alpha = alpha;
  a.swiglu_limit = limit;
  a.x = x.data();
  a.w1 = w1.data();
  a.w3 = w3.data();
  a.w2 = w2.data();
  a.b1 = b1.data();
  a.b3 = b3.data();
  a.b2 = b2.data();
  a.h = h.data();
  a.g = g.data();
  a.a = a_.data();
  a.y = y.data();
  ASSERT_EQ(ops->expert_ffn(state, &a), MOE_OK) << err();
  // Forward: the objective of the float64 reference, from libmoe's y.
  double obj = 0.0;
  for (int64_t i = 0; i < R * d; ++i) obj += double(y[i]) * dy[i];
  auto X = wide(x), W1 = wide(w1), W3 = wide(w3), W2 = wide(w2), B1 = wide(b1), B3 = wide(b3), B2 = wide(b2);
  const auto DY = wide(dy);
  EXPECT_NEAR(obj, ref.objective(X, W1, W3, W2, B1, B3, B2, DY, R), 1e-4);

  std::vector<float> dx(R * d, kNaN), dw1(ff * d, 0.25f), dw3(ff * d, 0.25f), dw2(d * ff, 0.25f), db1(ff, 0.25f),
      db3(ff, 0.25f), db2(d, 0.25f), dh(R * ff), dg(R * ff);  // gradients accumulate onto 0.25
  a.dy = dy.data();
  a.dx = dx.data();
  a.dw1 = dw1.data();
  a.dw3 = dw3.data();
  a.dw2 = dw2.data();
  a.db1 = db1.data();
  a.db3 = db3.data();
  a.db2 = db2.data();
  a.dh = dh.data();
  a.dg = dg.data();
  ASSERT_EQ(ops->expert_ffn_bwd(state, &a), MOE_OK) << err();

  // Central differences in float64 of every input and parameter element.
  const double step = 1e-6;
  auto check = [&](const char *name, std::vector<double> *v, const std::vector<float> &got, float base) {
    for (size_t i = 0; i < v->size(); ++i) {
      const double keep = (*v)[i];
      (*v)[i] = keep + step;
      const double plus = ref.objective(X, W1, W3, W2, B1, B3, B2, DY, R);
      (*v)[i] = keep - step;
      const double minus = ref.objective(X, W1, W3, W2, B1, B3, B2, DY, R);
      (*v)[i] = keep;
      const double fd = (plus - minus) / (2 * step);
      EXPECT_NEAR(got[i] - base, fd, 2e-5 * (1.0 + std::fabs(fd))) << name << "[" << i << "]";
    }
  };
  check("dx", &X, dx, 0.0f);
  check("dw1", &W1, dw1, 0.25f);
  check("dw3", &W3, dw3, 0.25f);
  check("dw2", &W2, dw2, 0.25f);
  check("db1", &B1, db1, 0.25f);
  check("db3", &B3, db3, 0.25f);
  check("db2", &B2, db2, 0.25f);
}
