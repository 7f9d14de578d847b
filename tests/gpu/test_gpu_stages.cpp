// Every stage of the CUDA backend's table against the CPU backend's, on the same random inputs
// (never zeros): float32 to 1e-5 of each tensor's scale, routing decisions (top-k ids, the plan)
// exactly, on inputs drawn without near-ties. The activation stages run in every dtype: a tensor
// stored in bfloat16 / float16 to two units in its last place at its scale (tol_of), a float32
// output of 16-bit inputs (combine, the backward row sums) to 1e-5, conversions bit for bit. Both
// tables are driven the same way the core drives them (src/core/pipeline.cpp): every buffer is
// allocated with the backend's alloc and filled with its upload; outputs start as NaN (floats) or
// -7 (integers) so that an output a stage forgets to write shows. Inputs that a stage reads from
// an earlier stage are produced once on the host by the CPU stages and given to both backends, so
// each stage is compared on its own.
//
// Without a CUDA device every case reports SKIPPED (gtest skip; ctest counts it as skipped).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/error.h"
#include "core/module.h"
#include "gpu_test_util.h"
#include "support/layer.h"
#include "support/router.h"
#include "support/stages.h"

namespace {

using moe_test::close;
using moe_test::close_scalar;
using moe_test::Plan;
using moe_test::Rng;
using moe_test::same;
using moe_test::SelectOut;
using moe_test::skewed_ids;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kDNaN = std::numeric_limits<double>::quiet_NaN();
// float32 against float32, scale-aware (moe_test::close). TF32 is off: cfg.allow_tf32 = 0.
constexpr double kTol = moe_test::kFloat32Tol;
// A tensor a stage stores in dtype, from the same inputs on both backends (moe.h's precision rule;
// moe_test::stored_tol): two units in the last place at the tensor's scale, one for its own
// rounding of float32 results that differ in their last bits, one for the values stored upstream
// within the stage (h and a before y; dA and dh before dW1 and dx).
double tol_of(int dtype) { return moe_test::stored_tol(dtype, 2); }
const char *dtype_name(int dtype) { return dtype == MOE_DTYPE_F32 ? "f32" : dtype == MOE_DTYPE_BF16 ? "bf16" : "f16"; }
constexpr int kDtypes[] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16};

const char *noise_name(int n) {
  return n == MOE_NOISE_GAUSSIAN ? "GAUSSIAN" : n == MOE_NOISE_JITTER ? "JITTER" : "NONE";
}

// ---- one backend: its table, its state, and the memory a test allocates through it ---------------

class Side {
 public:
  Side(const moe_backend_ops *ops, void *st) : ops_(ops), st_(st) {}
  ~Side() {
    for (void *p : allocs_) ops_->free(st_, p);
  }
  Side(const Side &) = delete;
  Side &operator=(const Side &) = delete;

  const moe_backend_ops *ops() const { return ops_; }
  void *st() const { return st_; }
  std::string name() const { return ops_->name ? ops_->name : "?"; }
  std::string err() const {
    const char *e = ops_->last_error(st_);
    return e ? e : "(last_error returned NULL)";
  }

  void *raw(size_t bytes) {
    void *p = nullptr;
    const moe_status s = ops_->alloc(st_, bytes, &p);
    if (s != MOE_OK || (p == nullptr && bytes > 0)) {
      ADD_FAILURE() << name() << " alloc(" << bytes << "): " << moe_status_name(s) << ": " << err();
      return nullptr;
    }
    allocs_.push_back(p);
    return p;
  }
  // A copy of host on this backend.
  template <class T>
  T *put(const std::vector<T> &host) {
    const size_t bytes = host.size() * sizeof(T);
    void *p = raw(bytes);
    if (p && bytes) {
      const moe_status s = ops_->upload(st_, p, host.data(), bytes);
      if (s != MOE_OK) ADD_FAILURE() << name() << " upload(" << bytes << "): " << moe_status_name(s) << ": " << err();
    }
    return static_cast<T *>(p);
  }
  // An output buffer of n values, each set to fill.
  template <class T>
  T *out(size_t n, T fill) {
    return put(std::vector<T>(n, fill));
  }
  // n values read back after synchronize.
  template <class T>
  std::vector<T> get(const T *p, size_t n) {
    std::vector<T> host(n);
    if (n == 0) return host;
    moe_status s = ops_->synchronize(st_);
    if (s != MOE_OK) ADD_FAILURE() << name() << " synchronize: " << moe_status_name(s) << ": " << err();
    s = ops_->download(st_, host.data(), p, n * sizeof(T));
    if (s != MOE_OK) ADD_FAILURE() << name() << " download(" << n * sizeof(T) << "): " << moe_status_name(s) << ": " << err();
    return host;
  }
  // Activations in dtype: host float32 values (rounded to dtype) as a buffer of that dtype, an
  // output buffer of n NaNs, and n values read back as float32.
  void *put_as(int dtype, const std::vector<float> &host) { return put(moe_test::encode(dtype, host)); }
  void *out_as(int dtype, size_t n) { return put_as(dtype, std::vector<float>(n, kNaN)); }
  std::vector<float> get_as(int dtype, const void *p, size_t n) {
    return moe_test::decode(dtype, get(static_cast<const unsigned char *>(p), n * moe_test::dtype_size(dtype)));
  }
  ::testing::AssertionResult ok(moe_status s, const char *stage) const {
    if (s == MOE_OK) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << name() << " backend, " << stage << ": " << moe_status_name(s) << ": "
                                         << err();
  }

 private:
  const moe_backend_ops *ops_;
  void *st_;
  std::vector<void *> allocs_;
};

// ---- the CUDA module, loaded once per process -----------------------------------------------------

struct LoadedModule {
  const moe_backend_ops *ops = nullptr;
  std::string error;
};

const LoadedModule &cuda_module() {
  static const LoadedModule m = [] {
    LoadedModule l;
    try {
      l.ops = moe::cuda_backend_ops();  // loaded once per process, never unloaded
    } catch (const moe::Error &e) {
      l.error = std::string(moe_status_name(e.status())) + ": " + e.what();
    }
    return l;
  }();
  return m;
}

// ---- host-side routing, from the CPU stages --------------------------------------------------------

struct SelectSpec {
  const char *name;
  int64_t k;
  int score;
  int normalize;
  float routed_scale;
  int64_t groups, topk_groups;
  float bias_bound;  // 0: bias all zero
  int expert_choice;
  bool load;         // GAUSSIAN training: clean_logits and noise_std given, load_sum wanted
};
moe_test::SelectParams params_of(const SelectSpec &sp) {
  return {sp.k, sp.score, sp.normalize, sp.routed_scale, sp.groups, sp.topk_groups, sp.expert_choice};
}

// Router logits whose selection values S + bias, and group scores, are well apart within every
// token (relative gap 1e-4, against float rounding of about 1e-7), so that the top-k cannot be
// reordered by rounding and ids can be compared exactly. Rejection per token.
std::vector<float> separated_logits(Rng &rng, int64_t T, int64_t E, int score, const std::vector<float> &bias,
                                    int64_t groups) {
  std::vector<float> L(static_cast<size_t>(T * E));
  std::vector<double> S(E), sel(E), gs(groups);
  const int64_t gsize = E / groups;
  auto apart = [](const std::vector<double> &v) {
    for (size_t i = 0; i < v.size(); ++i)
      for (size_t j = i + 1; j < v.size(); ++j)
        if (std::fabs(v[i] - v[j]) < 1e-4 * std::max(std::fabs(v[i]), std::fabs(v[j]))) return false;
    return true;
  };
  for (int64_t t = 0; t < T; ++t) {
    for (int attempt = 0;; ++attempt) {
      if (attempt == 10000) {
        ADD_FAILURE() << "could not draw well-separated logits";
        return L;
      }
      float *row = &L[t * E];
      for (int64_t e = 0; e < E; ++e) row[e] = rng.nonzero(3.0f);
      double m = -1e300, sum = 0.0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(row[e]));
      for (int64_t e = 0; e < E; ++e) sum += std::exp(row[e] - m);
      for (int64_t e = 0; e < E; ++e) {
        S[e] = score == MOE_SCORE_SOFTMAX ? std::exp(row[e] - m) / sum : 1.0 / (1.0 + std::exp(-double(row[e])));
        sel[e] = S[e] + bias[e];
      }
      if (!apart(sel)) continue;
      if (groups > 1) {
        for (int64_t g = 0; g < groups; ++g) {
          std::vector<double> v(sel.begin() + g * gsize, sel.begin() + (g + 1) * gsize);
          std::sort(v.rbegin(), v.rend());
          gs[g] = gsize == 1 ? v[0] : v[0] + v[1];
        }
        if (!apart(gs)) continue;
      }
      break;
    }
  }
  return L;
}

// ---- the fixture -------------------------------------------------------------------------------------

class GpuStages : public ::testing::Test {
 protected:
  void SetUp() override {
    MOE_GPU_REQUIRE_DEVICE();
    cpu_ = moe_cpu_backend();
    ASSERT_NE(cpu_, nullptr);
    const LoadedModule &m = cuda_module();
    ASSERT_NE(m.ops, nullptr) << "a CUDA device is present but the CUDA module did not load: " << m.error;
    gpu_ = m.ops;
    moe_config cfg;
    moe::config_defaults(&cfg);
    cfg.d_model = 256;
    cfg.d_ff = 192;
    ASSERT_EQ(cpu_->create(&cfg, &cs_), MOE_OK);
    cfg.device = MOE_DEVICE_CUDA;
    cfg.device_index = 0;
    cfg.allow_tf32 = 0;
    const moe_status s = gpu_->create(&cfg, &gs_);  // on failure gs_ may hold the reason (TearDown frees it)
    ASSERT_EQ(s, MOE_OK) << "the CUDA table's create failed on device 0: " << moe_status_name(s) << ": "
                         << (gs_ ? gpu_->last_error(gs_) : "(no state handed back)");
    ASSERT_NE(gs_, nullptr);
  }
  void TearDown() override {
    if (gs_) gpu_->destroy(gs_);
    if (cs_) cpu_->destroy(cs_);
    gs_ = cs_ = nullptr;
  }

  // The CPU stages on host vectors, to produce the inputs of later stages.
  SelectOut host_select(const SelectSpec &sp, int64_t T, int64_t E, const std::vector<float> &logits,
                        const std::vector<float> &bias, const std::vector<float> *clean = nullptr,
                        const std::vector<float> *noise_std = nullptr) {
    SelectOut o;
    EXPECT_EQ(moe_test::run_select(cpu_, cs_, T, E, params_of(sp), logits, bias, o, clean, noise_std), MOE_OK)
        << cpu_->last_error(cs_);
    return o;
  }
  Plan host_plan(int64_t T, int64_t E, int64_t k, int64_t capacity, int policy, const std::vector<int32_t> &ids,
                 const std::vector<float> &w) {
    Plan p;
    EXPECT_EQ(moe_test::run_plan(cpu_, cs_, T, E, k, capacity, policy, ids, w, p), MOE_OK) << cpu_->last_error(cs_);
    return p;
  }
  Plan host_plan_ec(int64_t T, int64_t E, int64_t k, int64_t capacity, const std::vector<float> &scores) {
    Plan p;
    EXPECT_EQ(moe_test::run_plan_ec(cpu_, cs_, T, E, k, capacity, scores, p), MOE_OK) << cpu_->last_error(cs_);
    return p;
  }

  const moe_backend_ops *cpu_ = nullptr, *gpu_ = nullptr;
  void *cs_ = nullptr, *gs_ = nullptr;
};

// The routing arguments of dispatch / combine and their backward, as rows_args in pipeline.cpp.
moe_rows_args rows_args(Side &s, const Plan &p, int64_t d, int dtype = MOE_DTYPE_F32) {
  moe_rows_args a{};
  a.T = p.T;
  a.d = d;
  a.dtype = dtype;
  a.R = p.R;
  a.k = p.k;
  if (p.ec) {
    a.token_offsets = s.put(p.token_offsets);
    a.token_rows = s.put(p.token_rows);
  } else {
    a.token_rows = s.put(p.row_of_slot);
  }
  a.row_token = s.put(p.row_token);
  a.row_weight = s.put(p.row_weight);
  return a;
}

// ---- the table and memory -------------------------------------------------------------------------

TEST_F(GpuStages, TableIsComplete) {
  EXPECT_EQ(gpu_->abi, static_cast<uint32_t>(MOE_BACKEND_ABI));
  ASSERT_NE(gpu_->name, nullptr);
  EXPECT_STREQ(gpu_->name, "cuda");
  const void *fns[] = {
      reinterpret_cast<const void *>(gpu_->create),         reinterpret_cast<const void *>(gpu_->destroy),
      reinterpret_cast<const void *>(gpu_->last_error),     reinterpret_cast<const void *>(gpu_->set_stream),
      reinterpret_cast<const void *>(gpu_->alloc),          reinterpret_cast<const void *>(gpu_->free),
      reinterpret_cast<const void *>(gpu_->memset_zero),    reinterpret_cast<const void *>(gpu_->upload),
      reinterpret_cast<const void *>(gpu_->download),       reinterpret_cast<const void *>(gpu_->copy),
      reinterpret_cast<const void *>(gpu_->check_pointer),  reinterpret_cast<const void *>(gpu_->find_nonfinite),
      reinterpret_cast<const void *>(gpu_->convert),        reinterpret_cast<const void *>(gpu_->synchronize),
      reinterpret_cast<const void *>(gpu_->gate),
      reinterpret_cast<const void *>(gpu_->select),         reinterpret_cast<const void *>(gpu_->plan),
      reinterpret_cast<const void *>(gpu_->dispatch),       reinterpret_cast<const void *>(gpu_->expert_ffn),
      reinterpret_cast<const void *>(gpu_->combine),        reinterpret_cast<const void *>(gpu_->shared_combine),
      reinterpret_cast<const void *>(gpu_->shared_combine_bwd), reinterpret_cast<const void *>(gpu_->combine_bwd),
      reinterpret_cast<const void *>(gpu_->expert_ffn_bwd), reinterpret_cast<const void *>(gpu_->dispatch_bwd),
      reinterpret_cast<const void *>(gpu_->select_bwd),     reinterpret_cast<const void *>(gpu_->gate_bwd),
      reinterpret_cast<const void *>(gpu_->stream),         reinterpret_cast<const void *>(gpu_->reserved),
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; ++i) EXPECT_NE(fns[i], nullptr) << "entry " << i;
  EXPECT_NE(gpu_->last_error(gs_), nullptr);
  // The stream the stages run on (handed to the comm hooks): the state's own one until one is set.
  if (gpu_->stream) {
    EXPECT_NE(gpu_->stream(gs_), nullptr);
  }
}

// The pool holds what is allocated from it, keeps what is freed, and gives that back when trimmed.
TEST_F(GpuStages, ReservedAndTrim) {
  ASSERT_NE(gpu_->reserved, nullptr);
  size_t before = 0, held = 0, kept = 0, trimmed = 0;
  ASSERT_EQ(gpu_->reserved(gs_, 1, &before), MOE_OK) << gpu_->last_error(gs_);
  const size_t big = size_t{64} << 20;
  void *p = nullptr;
  ASSERT_EQ(gpu_->alloc(gs_, big, &p), MOE_OK) << gpu_->last_error(gs_);
  ASSERT_EQ(gpu_->reserved(gs_, 0, &held), MOE_OK) << gpu_->last_error(gs_);
  EXPECT_GE(held, before + big);
  gpu_->free(gs_, p);
  ASSERT_EQ(gpu_->synchronize(gs_), MOE_OK);
  ASSERT_EQ(gpu_->reserved(gs_, 0, &kept), MOE_OK) << gpu_->last_error(gs_);
  EXPECT_GE(kept, before + big) << "freed memory is kept for reuse until a trim";
  ASSERT_EQ(gpu_->reserved(gs_, 1, &trimmed), MOE_OK) << gpu_->last_error(gs_);
  EXPECT_LT(trimmed, before + big) << "a trim gives what no buffer holds back to the device";
}

TEST_F(GpuStages, CreateOnAMissingDeviceFails) {
  moe_config cfg;
  moe::config_defaults(&cfg);
  cfg.d_model = 8;
  cfg.d_ff = 8;
  cfg.device = MOE_DEVICE_CUDA;
  for (int index : {gpu_test::device_count(), -1}) {
    cfg.device_index = index;
    void *st = nullptr;
    const moe_status s = gpu_->create(&cfg, &st);
    EXPECT_TRUE(s == MOE_ERR_DEVICE || s == MOE_ERR_INVALID_ARGUMENT)
        << "device_index " << index << " gave " << moe_status_name(s);
    // On failure the table may hand back a state that only carries the reason; the caller frees it.
    if (st) {
      if (s != MOE_OK) {
        const char *msg = gpu_->last_error(st);
        EXPECT_TRUE(msg && *msg) << "create failed without a message";
      }
      gpu_->destroy(st);
    }
  }
}

TEST_F(GpuStages, MemoryRoundTrip) {
  Side g(gpu_, gs_);
  Rng rng(1);
  for (size_t bytes : {size_t{1}, size_t{3}, size_t{100}, size_t{4097}, size_t{1} << 20, (size_t{3} << 20) + 5}) {
    SCOPED_TRACE("bytes " + std::to_string(bytes));
    std::vector<unsigned char> src(bytes);
    for (auto &c : src) c = static_cast<unsigned char>(1 + rng.below(255));  // never zero
    void *p = g.raw(bytes), *q = g.raw(bytes);
    ASSERT_TRUE(p && q);
    ASSERT_TRUE(g.ok(gpu_->upload(gs_, p, src.data(), bytes), "upload"));
    ASSERT_TRUE(g.ok(gpu_->copy(gs_, q, p, bytes), "copy"));
    std::vector<unsigned char> back(bytes, 0);
    ASSERT_TRUE(g.ok(gpu_->synchronize(gs_), "synchronize"));
    ASSERT_TRUE(g.ok(gpu_->download(gs_, back.data(), p, bytes), "download"));
    EXPECT_TRUE(same("upload/download", back, src));
    ASSERT_TRUE(g.ok(gpu_->memset_zero(gs_, p, bytes), "memset_zero"));
    ASSERT_TRUE(g.ok(gpu_->synchronize(gs_), "synchronize"));
    ASSERT_TRUE(g.ok(gpu_->download(gs_, back.data(), p, bytes), "download"));
    EXPECT_TRUE(same("memset_zero", back, std::vector<unsigned char>(bytes, 0)));
    ASSERT_TRUE(g.ok(gpu_->download(gs_, back.data(), q, bytes), "download"));
    EXPECT_TRUE(same("copy", back, src));
    // A part of a buffer: copy at an odd offset, zero a middle range.
    if (bytes >= 100) {
      ASSERT_TRUE(g.ok(gpu_->copy(gs_, static_cast<char *>(p) + 7, static_cast<char *>(q) + 13, bytes - 20), "copy"));
      ASSERT_TRUE(g.ok(gpu_->memset_zero(gs_, static_cast<char *>(q) + 3, 50), "memset_zero"));
      std::vector<unsigned char> expect_p(bytes, 0), expect_q = src;
      std::copy(src.begin() + 13, src.begin() + 13 + (bytes - 20), expect_p.begin() + 7);
      std::fill(expect_q.begin() + 3, expect_q.begin() + 53, 0);
      ASSERT_TRUE(g.ok(gpu_->synchronize(gs_), "synchronize"));
      ASSERT_TRUE(g.ok(gpu_->download(gs_, back.data(), p, bytes), "download"));
      EXPECT_TRUE(same("copy at an offset", back, expect_p));
      ASSERT_TRUE(g.ok(gpu_->download(gs_, back.data(), q, bytes), "download"));
      EXPECT_TRUE(same("memset_zero of a range", back, expect_q));
    }
  }
  // Zero bytes: a pointer that can be freed (the core allocates empty buffers for empty batches).
  void *z = nullptr;
  ASSERT_TRUE(g.ok(gpu_->alloc(gs_, 0, &z), "alloc(0)"));
  gpu_->free(gs_, z);
  // Memory from alloc is device memory.
  void *d = g.raw(256);
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(g.ok(gpu_->synchronize(gs_), "synchronize"));  // allocations may be stream-ordered
  cudaPointerAttributes attr{};
  CUDA_ASSERT(cudaPointerGetAttributes(&attr, d));
  EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
}

TEST_F(GpuStages, CheckPointer) {
  Side g(gpu_, gs_);
  void *mine = g.raw(1024);
  ASSERT_NE(mine, nullptr);
  ASSERT_TRUE(g.ok(gpu_->synchronize(gs_), "synchronize"));  // allocations may be stream-ordered
  EXPECT_TRUE(g.ok(gpu_->check_pointer(gs_, mine), "check_pointer(alloc)"));
  void *dev = nullptr;
  CUDA_ASSERT(cudaMalloc(&dev, 4096));
  std::unique_ptr<void, decltype(&cudaFree)> dev_owner(dev, &cudaFree);
  EXPECT_TRUE(g.ok(gpu_->check_pointer(gs_, dev), "check_pointer(cudaMalloc)"));
  // A view into the middle of a device tensor (a slice, as frameworks pass).
  EXPECT_TRUE(g.ok(gpu_->check_pointer(gs_, static_cast<char *>(dev) + 1000), "check_pointer(cudaMalloc + 1000)"));

  void *host = std::malloc(4096);
  ASSERT_NE(host, nullptr);
  std::unique_ptr<void, decltype(&std::free)> host_owner(host, &std::free);
  EXPECT_EQ(gpu_->check_pointer(gs_, host), MOE_ERR_INVALID_ARGUMENT);
  const char *msg = gpu_->last_error(gs_);
  ASSERT_NE(msg, nullptr);
  EXPECT_GT(std::strlen(msg), 0u) << "check_pointer refused a host pointer without a message";
  float on_stack[4] = {1, 2, 3, 4};
  EXPECT_EQ(gpu_->check_pointer(gs_, on_stack), MOE_ERR_INVALID_ARGUMENT);
  // The state stays usable.
  EXPECT_TRUE(g.ok(gpu_->check_pointer(gs_, mine), "check_pointer after a refusal"));
}

TEST_F(GpuStages, FindNonfinite) {
  for (int dtype : kDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    Side g(gpu_, gs_), c(cpu_, cs_);
    Rng rng(2);
    const int64_t n = (int64_t{1} << 20) + 37;
    const std::vector<float> v = rng.nonzeros(static_cast<size_t>(n), 4.0f);
    void *p = g.put_as(dtype, v);
    ASSERT_NE(p, nullptr);
    auto first_of = [&](int64_t count) {
      int64_t first = 12345;
      EXPECT_TRUE(g.ok(gpu_->find_nonfinite(gs_, p, dtype, count, &first), "find_nonfinite"));
      return first;
    };
    EXPECT_EQ(first_of(n), -1);
    EXPECT_EQ(first_of(0), -1);
    const float inf = std::numeric_limits<float>::infinity();
    const float bad[3] = {kNaN, inf, -inf};
    for (int trial = 0; trial < 24; ++trial) {
      std::vector<int64_t> at;
      if (trial == 0) at = {0};
      else if (trial == 1) at = {n - 1};
      else if (trial == 2) at = {n - 1, 0};
      else {
        at.push_back(rng.below(n));
        if (trial % 2) at.push_back(rng.below(n));
        if (trial % 3 == 0) at.push_back(rng.below(n));
      }
      std::vector<float> w = v;
      for (size_t i = 0; i < at.size(); ++i) w[static_cast<size_t>(at[i])] = bad[(trial + i) % 3];
      const std::vector<unsigned char> bytes = moe_test::encode(dtype, w);
      ASSERT_TRUE(g.ok(gpu_->upload(gs_, p, bytes.data(), bytes.size()), "upload"));
      const int64_t expect = *std::min_element(at.begin(), at.end());
      EXPECT_EQ(first_of(n), expect) << "trial " << trial;
      // Only the first count elements are looked at.
      EXPECT_EQ(first_of(expect), -1) << "trial " << trial;
      EXPECT_EQ(first_of(expect + 1), expect) << "trial " << trial;
      // The CPU table gives the same index.
      if (trial < 4) {
        int64_t cpu_first = 12345;
        EXPECT_TRUE(c.ok(cpu_->find_nonfinite(cs_, bytes.data(), dtype, n, &cpu_first), "find_nonfinite"));
        EXPECT_EQ(cpu_first, expect) << "trial " << trial;
      }
    }
    // Small counts (one partial block).
    void *q = g.put_as(dtype, {1.0f, 2.0f, kNaN, 3.0f});
    int64_t first = 99;
    ASSERT_TRUE(g.ok(gpu_->find_nonfinite(gs_, q, dtype, 4, &first), "find_nonfinite"));
    EXPECT_EQ(first, 2);
    ASSERT_TRUE(g.ok(gpu_->find_nonfinite(gs_, q, dtype, 2, &first), "find_nonfinite"));
    EXPECT_EQ(first, -1);
    // The largest finite values are finite; one past them is not (float16 overflows at 65520).
    if (dtype != MOE_DTYPE_F32) {
      const float big = dtype == MOE_DTYPE_BF16 ? 3.3895313892515355e38f : 65504.0f;
      void *r = g.put_as(dtype, {-big, big, dtype == MOE_DTYPE_F16 ? 65520.0f : inf});
      ASSERT_TRUE(g.ok(gpu_->find_nonfinite(gs_, r, dtype, 3, &first), "find_nonfinite"));
      EXPECT_EQ(first, 2);
    }
  }
}

// Bit patterns of a dtype's element i of a buffer (float32: 32 bits, else 16).
uint32_t bits_at(int dtype, const std::vector<unsigned char> &bytes, size_t i) {
  if (dtype == MOE_DTYPE_F32) {
    uint32_t u;
    std::memcpy(&u, &bytes[i * 4], 4);
    return u;
  }
  uint16_t h;
  std::memcpy(&h, &bytes[i * 2], 2);
  return h;
}

bool is_nan_bits(int dtype, uint32_t b) {
  if (dtype == MOE_DTYPE_F32) return (b & 0x7fffffffu) > 0x7f800000u;
  if (dtype == MOE_DTYPE_BF16) return (b & 0x7fffu) > 0x7f80u;
  return (b & 0x7fffu) > 0x7c00u;
}

// Equal bit for bit, except that any NaN matches any NaN (payloads are not specified).
::testing::AssertionResult same_bits(const std::string &what, int dtype, const std::vector<unsigned char> &got,
                                     const std::vector<unsigned char> &ref) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << what << ": sizes differ";
  const size_t n = got.size() / moe_test::dtype_size(dtype);
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t a = bits_at(dtype, got, i), b = bits_at(dtype, ref, i);
    if (a == b || (is_nan_bits(dtype, a) && is_nan_bits(dtype, b))) continue;
    if (bad++ == 0) first = i;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << n << " elements differ; first [" << first
                                       << "]: got 0x" << std::hex << bits_at(dtype, got, first) << ", expected 0x"
                                       << bits_at(dtype, ref, first);
}

// Source values for the conversions: random bit patterns over the whole range (subnormals, values
// past float16's range, ties of every kind) and the special values.
std::vector<unsigned char> conversion_source(int dtype, Rng &rng, size_t n) {
  std::vector<unsigned char> out(n * moe_test::dtype_size(dtype));
  const uint32_t f32_specials[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x00000001u,
                                   0x3f808000u, 0x3f818000u, 0x3f800fffu, 0x3f801000u, 0x3f803000u, 0x477ff000u,
                                   0x477fefffu, 0x33800000u, 0x33000001u, 0x7f7fffffu, 0xff7fffffu, 0x387fc000u};
  const uint16_t h_specials[] = {0x0000, 0x8000, 0x7f80, 0xff80, 0x7c00, 0xfc00, 0x7fc0, 0x7e00, 0x0001, 0x8001,
                                 0x03ff, 0x0400, 0x7bff, 0x3c00, 0x477f, 0x4780, 0x3380, 0x7f7f};
  for (size_t i = 0; i < n; ++i) {
    if (dtype == MOE_DTYPE_F32) {
      uint32_t u;
      const size_t k = sizeof f32_specials / sizeof f32_specials[0];
      if (i < k) u = f32_specials[i];
      else if (i % 3 == 0) u = static_cast<uint32_t>(rng.next());  // anything, NaNs included
      else u = (static_cast<uint32_t>(rng.next()) & 0x807fffffu) | static_cast<uint32_t>(100 + rng.below(56)) << 23;
      std::memcpy(&out[i * 4], &u, 4);
    } else {
      const size_t k = sizeof h_specials / sizeof h_specials[0];
      const uint16_t h = i < k ? h_specials[i] : static_cast<uint16_t>(rng.next());
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

// The host's conversion of one element (gpu_test's round-to-nearest-even), as bytes of dst_dtype.
std::vector<unsigned char> host_convert(int dst_dtype, int src_dtype, const std::vector<unsigned char> &src) {
  return moe_test::encode(dst_dtype, moe_test::decode(src_dtype, src));
}

TEST_F(GpuStages, Convert) {
  Rng rng(5);
  // Odd count: a tail past the last 16-byte pack; the offset run starts 2 or 4 bytes into a buffer.
  const size_t n = (size_t{1} << 16) + 5;
  for (int from : kDtypes)
    for (int to : kDtypes)
      for (size_t offset : {size_t{0}, size_t{1}}) {
        SCOPED_TRACE(std::string(dtype_name(from)) + " to " + dtype_name(to) + (offset ? ", unaligned" : ""));
        const std::vector<unsigned char> src = conversion_source(from, rng, n);
        const size_t in = moe_test::dtype_size(from), out = moe_test::dtype_size(to);
        auto run = [&](Side &s) {
          auto *p = static_cast<unsigned char *>(s.put(src));
          auto *q = static_cast<unsigned char *>(s.put(std::vector<unsigned char>((n + 1) * out, 0xa5)));
          const int64_t count = static_cast<int64_t>(n - offset);
          EXPECT_TRUE(s.ok(s.ops()->convert(s.st(), q + offset * out, to, p + offset * in, from, count), "convert"));
          EXPECT_TRUE(s.ok(s.ops()->convert(s.st(), q, to, p, from, 0), "convert of nothing"));
          return s.get(q, (n + 1) * out);
        };
        Side c(cpu_, cs_), g(gpu_, gs_);
        std::vector<unsigned char> want = host_convert(to, from, src);
        if (from == to) want = src;
        want.resize((n + 1) * out, 0xa5);  // the element past the end is untouched
        if (offset) std::fill(want.begin(), want.begin() + out, 0xa5);
        const std::vector<unsigned char> rg = run(g), rc = run(c);
        EXPECT_TRUE(same_bits("CUDA against the host's rounding", to, rg, want));
        EXPECT_TRUE(same_bits("CUDA against the CPU table", to, rg, rc));
      }
}

// ---- gate ---------------------------------------------------------------------------------------

struct GateOut {
  std::vector<float> logits, xr, clean, noise_std, draws;
};

constexpr uint64_t kSeed = 0x5eedULL, kStep = 3;
constexpr float kEps = 0.05f;

moe_gate_args gate_fwd_args(Side &s, int noise, int64_t T, int64_t d, int64_t E, const std::vector<float> &x,
                            const std::vector<float> &w, const std::vector<float> &wn,
                            const std::vector<float> *logit_bias) {
  moe_gate_args a{};
  if (logit_bias) a.logit_bias = s.put(*logit_bias);
  a.T = T;
  a.d = d;
  a.E = E;
  a.x = s.put(x);
  a.w = s.put(w);
  a.logits = s.out<float>(T * E, kNaN);
  a.noise = noise;
  a.noise_eps = kEps;
  a.seed = kSeed;
  a.step = kStep;
  if (noise == MOE_NOISE_JITTER) a.xr = s.out<float>(T * d, kNaN);
  if (noise == MOE_NOISE_GAUSSIAN) {
    a.wn = s.put(wn);
    a.clean_logits = s.out<float>(T * E, kNaN);
    a.noise_std = s.out<float>(T * E, kNaN);
    a.noise_draws = s.out<float>(T * E, kNaN);
  }
  return a;
}

GateOut run_gate(Side &s, int noise, int64_t T, int64_t d, int64_t E, const std::vector<float> &x,
                 const std::vector<float> &w, const std::vector<float> &wn,
                 const std::vector<float> *logit_bias = nullptr) {
  moe_gate_args a = gate_fwd_args(s, noise, T, d, E, x, w, wn, logit_bias);
  EXPECT_TRUE(s.ok(s.ops()->gate(s.st(), &a), "gate"));
  GateOut o;
  o.logits = s.get(a.logits, T * E);
  if (noise == MOE_NOISE_JITTER) o.xr = s.get(a.xr, T * d);
  if (noise == MOE_NOISE_GAUSSIAN) {
    o.clean = s.get(a.clean_logits, T * E);
    o.noise_std = s.get(a.noise_std, T * E);
    o.draws = s.get(a.noise_draws, T * E);
  }
  return o;
}

TEST_F(GpuStages, Gate) {
  const int64_t T = 300, d = 256, E = 16;
  Rng rng(3);
  const auto x = rng.nonzeros(T * d, 1.0f), w = rng.nonzeros(E * d, 1.0f / 16), wn = rng.nonzeros(E * d, 1.0f / 16);
  const auto lb = rng.nonzeros(E, 0.5f);  // router_logit_bias
  for (int noise : {MOE_NOISE_NONE, MOE_NOISE_GAUSSIAN, MOE_NOISE_JITTER})
  for (const std::vector<float> *bias : {static_cast<const std::vector<float> *>(nullptr), &lb}) {
    SCOPED_TRACE(std::string(noise_name(noise)) + (bias ? ", logit bias" : ""));
    Side c(cpu_, cs_), g(gpu_, gs_);
    const GateOut rc = run_gate(c, noise, T, d, E, x, w, wn, bias), rg = run_gate(g, noise, T, d, E, x, w, wn, bias);
    EXPECT_TRUE(close("logits", rg.logits, rc.logits, kTol));
    if (noise == MOE_NOISE_JITTER) { EXPECT_TRUE(close("xr (jittered input)", rg.xr, rc.xr, kTol)); }
    if (noise == MOE_NOISE_GAUSSIAN) {
      EXPECT_TRUE(close("clean_logits", rg.clean, rc.clean, kTol));
      EXPECT_TRUE(close("noise_std", rg.noise_std, rc.noise_std, kTol));
      // The counter-based draws keyed by (seed, step, t, e): the same numbers on both backends.
      EXPECT_TRUE(close("noise_draws", rg.draws, rc.draws, kTol));
    }
  }
}

TEST_F(GpuStages, GateBackward) {
  const int64_t T = 300, d = 256, E = 16;
  Rng rng(4);
  const auto x = rng.nonzeros(T * d, 1.0f), w = rng.nonzeros(E * d, 1.0f / 16), wn = rng.nonzeros(E * d, 1.0f / 16);
  const auto dl = rng.nonzeros(T * E, 0.1f), dclean = rng.nonzeros(T * E, 0.05f), dstd = rng.nonzeros(T * E, 0.05f);
  const auto dx0 = rng.nonzeros(T * d, 0.5f), dw0 = rng.nonzeros(E * d, 0.5f), dwn0 = rng.nonzeros(E * d, 0.5f);
  const auto db0 = rng.nonzeros(E, 0.5f);  // router_logit_bias's gradient, accumulated (variant 1)
  for (int noise : {MOE_NOISE_NONE, MOE_NOISE_GAUSSIAN, MOE_NOISE_JITTER}) {
    // What the forward saved, from the CPU gate.
    GateOut saved;
    {
      Side c(cpu_, cs_);
      saved = run_gate(c, noise, T, d, E, x, w, wn);
    }
    for (int with_dx : {1, 0})
      for (int variant : {0, 1}) {  // GAUSSIAN: load-loss extras; JITTER: caller's scratch
        // NONE's variant 1: the logit bias's gradient (every noise adds it; GAUSSIAN's from dclean).
        if (noise == MOE_NOISE_JITTER && variant && !with_dx) continue;
        SCOPED_TRACE(std::string(noise_name(noise)) + (with_dx ? " with dx" : " without dx") +
                     (variant ? " variant 1" : " variant 0"));
        struct Out {
          std::vector<float> dx, dw, dwn, db;
        };
        auto run = [&](Side &s) {
          moe_gate_args a{};
          a.T = T;
          a.d = d;
          a.E = E;
          a.x = s.put(x);
          a.w = s.put(w);
          a.noise = noise;
          a.noise_eps = kEps;
          a.seed = kSeed;
          a.step = kStep;
          a.dlogits = s.put(dl);
          a.dx = with_dx ? s.put(dx0) : nullptr;
          a.dw = s.put(dw0);
          if (variant) a.dlogit_bias = s.put(db0);
          if (noise == MOE_NOISE_JITTER) {
            a.xr = s.put(saved.xr);
            if (with_dx && variant) a.scratch = s.out<float>(T * d, kNaN);
          }
          if (noise == MOE_NOISE_GAUSSIAN) {
            a.wn = s.put(wn);
            a.noise_std = s.put(saved.noise_std);
            a.noise_draws = s.put(saved.draws);
            a.clean_logits = s.put(saved.clean);
            a.dwn = s.put(dwn0);
            a.scratch = s.out<float>(2 * T * E, kNaN);
            if (variant) {
              a.dclean_extra = s.put(dclean);
              a.dstd_extra = s.put(dstd);
            }
          }
          EXPECT_TRUE(s.ok(s.ops()->gate_bwd(s.st(), &a), "gate_bwd"));
          Out o;
          if (with_dx) o.dx = s.get(a.dx, T * d);
          o.dw = s.get(a.dw, E * d);
          if (noise == MOE_NOISE_GAUSSIAN) o.dwn = s.get(a.dwn, E * d);
          if (variant) o.db = s.get(a.dlogit_bias, E);
          return o;
        };
        Side c(cpu_, cs_), g(gpu_, gs_);
        const Out rc = run(c), rg = run(g);
        if (with_dx) { EXPECT_TRUE(close("dx (accumulated)", rg.dx, rc.dx, kTol)); }
        EXPECT_TRUE(close("dw (accumulated)", rg.dw, rc.dw, kTol));
        if (noise == MOE_NOISE_GAUSSIAN) { EXPECT_TRUE(close("dwn (accumulated)", rg.dwn, rc.dwn, kTol)); }
        if (variant) { EXPECT_TRUE(close("dlogit_bias (accumulated)", rg.db, rc.db, kTol)); }
      }
  }
}

// ---- select -------------------------------------------------------------------------------------

const SelectSpec kSelectSpecs[] = {
    // name                          k  score               norm scale  G   tkg bias   ec load
    {"softmax top-4 normalized", 4, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.0f, 0, false},
    {"softmax top-2 raw, scale 0.7, bias", 2, MOE_SCORE_SOFTMAX, 0, 0.7f, 1, 1, 0.01f, 0, false},
    {"sigmoid top-4 normalized, scale 2.5, 4 groups keep 2, bias", 4, MOE_SCORE_SIGMOID, 1, 2.5f, 4, 2, 0.05f, 0, false},
    {"sigmoid top-3 raw, 8 groups keep 3, bias", 3, MOE_SCORE_SIGMOID, 0, 1.0f, 8, 3, 0.05f, 0, false},
    {"softmax top-4, 16 groups of one keep 5, bias", 4, MOE_SCORE_SOFTMAX, 1, 1.0f, 16, 5, 0.01f, 0, false},
    {"sigmoid top-1 normalized, bias", 1, MOE_SCORE_SIGMOID, 1, 1.0f, 1, 1, 0.05f, 0, false},
    {"dense softmax top-16", 16, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.0f, 0, false},
    {"expert choice", 4, MOE_SCORE_SOFTMAX, 0, 1.0f, 1, 1, 0.0f, 1, false},
    {"softmax top-2, GAUSSIAN load sums", 2, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.0f, 0, true},
    {"sigmoid top-3, GAUSSIAN load sums, bias", 3, MOE_SCORE_SIGMOID, 1, 1.0f, 1, 1, 0.02f, 0, true},
};

// Noisy logits L and the clean logits and noise scale they came from (L = clean + n * std).
void noisy_parts(Rng &rng, const std::vector<float> &L, std::vector<float> &clean, std::vector<float> &sd) {
  clean.resize(L.size());
  sd.resize(L.size());
  for (size_t i = 0; i < L.size(); ++i) {
    sd[i] = rng.uniform(0.3f, 1.5f);
    clean[i] = L[i] - rng.nonzero(2.0f) * sd[i];
  }
}

TEST_F(GpuStages, Select) {
  const int64_t T = 300, E = 16;  // more tokens than one of the CPU's reduction blocks
  int variant = 0;
  for (const SelectSpec &sp : kSelectSpecs) {
    SCOPED_TRACE(sp.name);
    Rng rng(100 + variant++);
    std::vector<float> bias(E, 0.0f);
    if (sp.bias_bound > 0) bias = rng.nonzeros(E, sp.bias_bound);
    const std::vector<float> logits = separated_logits(rng, T, E, sp.score, bias, sp.groups);
    std::vector<float> clean, sd;
    if (sp.load) noisy_parts(rng, logits, clean, sd);
    auto run = [&](Side &s) {
      SelectOut o;
      o.counts.assign(E, -7);
      o.prob_sum.assign(E, kDNaN);
      if (sp.load) o.load_sum.assign(E, kDNaN);
      moe_select_args a = moe_test::select_args(T, E, params_of(sp));
      a.logits = s.put(logits);
      a.bias = s.put(bias);
      a.scores = s.out<float>(T * E, kNaN);
      a.lse = s.out<float>(T, kNaN);
      a.topk_ids = s.out<int32_t>(T * sp.k, -7);
      a.topk_w = s.out<float>(T * sp.k, kNaN);
      if (sp.load) {
        a.clean_logits = s.put(clean);
        a.noise_std = s.put(sd);
        a.load_sum = o.load_sum.data();
      }
      a.counts = o.counts.data();
      a.prob_sum = o.prob_sum.data();
      a.lse_sq_sum = &o.lse_sq_sum;
      EXPECT_TRUE(s.ok(s.ops()->select(s.st(), &a), "select"));
      // Host outputs are complete when the stage returns (the core reads them at once).
      SelectOut now = o;
      now.scores = s.get(a.scores, T * E);
      now.lse = s.get(a.lse, T);
      if (!sp.expert_choice) {
        now.ids = s.get(a.topk_ids, T * sp.k);
        now.topk_w = s.get(a.topk_w, T * sp.k);
      }
      return now;
    };
    Side c(cpu_, cs_), g(gpu_, gs_);
    const SelectOut rc = run(c), rg = run(g);
    EXPECT_TRUE(close("scores", rg.scores, rc.scores, kTol));
    EXPECT_TRUE(close("lse", rg.lse, rc.lse, kTol));
    if (!sp.expert_choice) {
      EXPECT_TRUE(same("topk_ids", rg.ids, rc.ids));
      EXPECT_TRUE(close("topk_w", rg.topk_w, rc.topk_w, kTol));
    }
    EXPECT_TRUE(same("counts (host)", rg.counts, rc.counts));
    EXPECT_TRUE(close("prob_sum (host)", rg.prob_sum, rc.prob_sum, kTol));
    EXPECT_TRUE(close_scalar("lse_sq_sum (host)", rg.lse_sq_sum, rc.lse_sq_sum, kTol));
    if (sp.load) { EXPECT_TRUE(close("load_sum (host)", rg.load_sum, rc.load_sum, kTol)); }
  }
}

// ---- plan ---------------------------------------------------------------------------------------

struct PlanSpec {
  const char *name;
  int64_t capacity;  // -1: dropless
  int policy;
  bool tied_weights;
  int64_t group_size = 0;      // capacity per group of tokens; 0: the whole call
  int64_t last_capacity = -1;  // of a shorter last group
};

TEST_F(GpuStages, PlanTokenChoice) {
  const int64_t T = 300, E = 16, k = 4;
  const int64_t C = (T * k + E - 1) / E;  // capacity factor 1.0
  const PlanSpec specs[] = {
      {"dropless", -1, MOE_DROP_POSITION, false},
      {"capacity 1.0, position", C, MOE_DROP_POSITION, false},
      {"capacity 1.0, probs, tied weights", C, MOE_DROP_PROBS, true},
      {"capacity 0.55, probs", (C * 55 + 99) / 100, MOE_DROP_PROBS, false},
      {"capacity 0.55, position", (C * 55 + 99) / 100, MOE_DROP_POSITION, true},
      {"capacity 0, position", 0, MOE_DROP_POSITION, false},
      {"capacity 0, probs", 0, MOE_DROP_PROBS, false},
      {"capacity T*k (the largest the core passes)", T * k, MOE_DROP_PROBS, true},
      {"capacity 1", 1, MOE_DROP_PROBS, true},
      // capacity groups: 4 groups of 64 and a last one of 44 with its own capacity, groups that
      // divide T (last_capacity unused), and many small groups
      {"groups of 64, position", C * 64 / T, MOE_DROP_POSITION, false, 64, 11},
      {"groups of 64, probs, tied weights", C * 64 / T, MOE_DROP_PROBS, true, 64, 11},
      {"groups of 50, position", 8, MOE_DROP_POSITION, true, 50, 1000},
      {"groups of 7, probs", 1, MOE_DROP_PROBS, false, 7, 3},
      {"groups of 7, position, last capacity 0", 2, MOE_DROP_POSITION, false, 7, 0},
  };
  int variant = 0;
  for (const PlanSpec &sp : specs) {
    SCOPED_TRACE(sp.name);
    Rng rng(200 + variant++);
    const std::vector<int32_t> ids = skewed_ids(rng, T, E, k);
    std::vector<float> w(T * k);
    for (float &v : w) v = sp.tied_weights ? 0.125f * static_cast<float>(1 + rng.below(4)) : rng.uniform(0.01f, 1.0f);
    struct Out {
      std::vector<int32_t> row_of_slot, row_token, row_slot;
      std::vector<float> row_weight;
      std::vector<int64_t> offsets, kept;
      std::vector<double> weight_sum;
    };
    auto run = [&](Side &s) {
      Out o;
      o.offsets.assign(E + 1, -7);
      o.kept.assign(E, -7);
      o.weight_sum.assign(E, kDNaN);
      moe_plan_args a = moe_test::plan_args(T, E, k, sp.capacity, sp.policy);
      a.group_size = sp.group_size;
      a.last_capacity = sp.last_capacity;
      a.topk_ids = s.put(ids);
      a.topk_w = s.put(w);
      a.row_of_slot = s.out<int32_t>(T * k, -7);
      a.row_token = s.out<int32_t>(T * k, -7);
      a.row_slot = s.out<int32_t>(T * k, -7);
      a.row_weight = s.out<float>(T * k, kNaN);
      a.offsets = o.offsets.data();
      a.kept = o.kept.data();
      a.weight_sum = o.weight_sum.data();
      a.scores = s.out<float>(T * E, kNaN);  // unused by token choice; the core passes it
      EXPECT_TRUE(s.ok(s.ops()->plan(s.st(), &a), "plan"));
      Out now = o;  // host outputs as they are when the stage returns
      now.row_of_slot = s.get(a.row_of_slot, T * k);
      now.row_token = s.get(a.row_token, T * k);
      now.row_slot = s.get(a.row_slot, T * k);
      now.row_weight = s.get(a.row_weight, T * k);
      return now;
    };
    Side c(cpu_, cs_), g(gpu_, gs_);
    const Out rc = run(c), rg = run(g);
    const int64_t R = rc.offsets[E];
    if (sp.capacity >= 0 && sp.capacity < C) {
      EXPECT_LT(R, T * k) << "the routing should overflow some expert";
    }
    EXPECT_TRUE(same("offsets (host)", rg.offsets, rc.offsets));
    EXPECT_TRUE(same("kept (host)", rg.kept, rc.kept));
    EXPECT_TRUE(same("weight_sum (host, core/weight_sum.h order)", rg.weight_sum, rc.weight_sum));
    EXPECT_TRUE(same("row_of_slot", rg.row_of_slot, rc.row_of_slot));
    EXPECT_TRUE(same("row_token", rg.row_token, rc.row_token, static_cast<size_t>(R)));
    EXPECT_TRUE(same("row_slot", rg.row_slot, rc.row_slot, static_cast<size_t>(R)));
    EXPECT_TRUE(same("row_weight", rg.row_weight, rc.row_weight, static_cast<size_t>(R)));
  }
}

// The per-expert weight sums on experts large enough that every lane of core/weight_sum.h takes
// several chunks (more than 2 * 128 * 32 rows), and on one with a single partial chunk: the same bits
// as the CPU backend, whose order the unit test CpuPlan.WeightSumFollowsTheFixedOrder writes out.
TEST_F(GpuStages, PlanWeightSumsOfLargeExperts) {
  const int64_t T = 20000, E = 4, k = 2;
  Rng rng(250);
  std::vector<int32_t> ids(T * k);
  for (int64_t t = 0; t < T; ++t) {
    // Experts 0-2 share almost every slot; expert 3 takes every 1000th token's first choice.
    ids[t * k] = static_cast<int32_t>(t % 1000 == 0 ? 3 : rng.below(3));
    ids[t * k + 1] = static_cast<int32_t>((ids[t * k] + 1 + rng.below(2)) % 3);
  }
  std::vector<float> w(T * k);
  for (float &v : w) v = rng.uniform(1e-4f, 1.0f) * (rng.chance(10) ? 1e-3f : 1.0f);
  auto run = [&](Side &s, std::vector<int64_t> &offsets) {
    std::vector<int64_t> kept(E, -7);
    std::vector<double> sums(E, kDNaN);
    offsets.assign(E + 1, -7);
    moe_plan_args a = moe_test::plan_args(T, E, k, -1);
    a.topk_ids = s.put(ids);
    a.topk_w = s.put(w);
    a.row_of_slot = s.out<int32_t>(T * k, -7);
    a.row_token = s.out<int32_t>(T * k, -7);
    a.row_slot = s.out<int32_t>(T * k, -7);
    a.row_weight = s.out<float>(T * k, kNaN);
    a.offsets = offsets.data();
    a.kept = kept.data();
    a.weight_sum = sums.data();
    a.scores = s.out<float>(T * E, kNaN);
    EXPECT_TRUE(s.ok(s.ops()->plan(s.st(), &a), "plan"));
    return sums;
  };
  Side c(cpu_, cs_), g(gpu_, gs_);
  std::vector<int64_t> oc, og;
  const std::vector<double> rc = run(c, oc), rg = run(g, og);
  EXPECT_TRUE(same("offsets (host)", og, oc));
  for (int64_t e = 0; e < 3; ++e) EXPECT_GT(oc[e + 1] - oc[e], 2 * 128 * 32) << "expert " << e;
  EXPECT_LE(oc[4] - oc[3], 32) << "expert 3 should fit one chunk";
  EXPECT_TRUE(same("weight_sum (host, core/weight_sum.h order)", rg, rc));
}

TEST_F(GpuStages, PlanExpertChoice) {
  const int64_t T = 300, E = 16, k = 4;
  const int64_t C = (T * k + E - 1) / E;
  struct Capacity {
    int64_t capacity, group_size, last_capacity;  // group_size 0: one group of T tokens
  };
  std::vector<Capacity> capacities;
  for (int64_t capacity : {C, int64_t{50}, int64_t{1}, T, T + 40})  // above T: each expert takes every token
    capacities.push_back({capacity, 0, -1});
  // Capacity groups: 64 tokens (a last group of 44), 7 (of 6), 100 (dividing T), and capacities
  // above a group's size.
  for (Capacity g : {Capacity{16, 64, 11}, Capacity{2, 7, 1}, Capacity{25, 100, 0}, Capacity{70, 64, 50},
                     Capacity{3, 7, 0}})
    capacities.push_back(g);
  int variant = 0;
  for (const Capacity &cap : capacities) {
    const int64_t capacity = cap.capacity;
    for (bool ties : {true, false}) {
      SCOPED_TRACE("capacity " + std::to_string(capacity) + ", groups of " + std::to_string(cap.group_size) +
                   " (last " + std::to_string(cap.last_capacity) + ")" + (ties ? ", tied scores" : ""));
      Rng rng(300 + variant++);
      // Tied scores check the tie rule (the lower token wins); distinct ones the ordering itself.
      std::vector<float> scores(T * E);
      for (float &v : scores) v = ties ? static_cast<float>(1 + rng.below(40)) / 64.0f : rng.uniform(0.001f, 1.0f);
      // Each expert takes min(C, group size) tokens of each group.
      int64_t per_expert = std::max<int64_t>(0, std::min(capacity, T));
      if (cap.group_size > 0) {
        per_expert = 0;
        for (int64_t t0 = 0; t0 < T; t0 += cap.group_size) {
          const int64_t n = std::min(cap.group_size, T - t0);
          per_expert += std::min(n < cap.group_size ? cap.last_capacity : capacity, n);
        }
      }
      const int64_t rows = E * per_expert;
      struct Out {
        std::vector<int32_t> row_token, row_slot, token_rows;
        std::vector<float> row_weight;
        std::vector<int64_t> offsets, kept, token_offsets;
        std::vector<double> weight_sum;
      };
      auto run = [&](Side &s) {
        Out o;
        o.offsets.assign(E + 1, -7);
        o.kept.assign(E, -7);
        o.weight_sum.assign(E, kDNaN);
        moe_plan_args a = moe_test::plan_args(T, E, k, capacity);
        a.group_size = cap.group_size;
        a.last_capacity = cap.last_capacity;
        a.topk_ids = s.out<int32_t>(T * k, 0);  // not read by expert choice; the core passes them
        a.topk_w = s.out<float>(T * k, 0.0f);
        a.row_of_slot = s.out<int32_t>(T * k, -7);
        a.row_token = s.out<int32_t>(rows, -7);
        a.row_slot = s.out<int32_t>(rows, -7);
        a.row_weight = s.out<float>(rows, kNaN);
        a.offsets = o.offsets.data();
        a.kept = o.kept.data();
        a.weight_sum = o.weight_sum.data();
        a.expert_choice = 1;
        a.scores = s.put(scores);
        a.token_offsets = s.out<int64_t>(T + 1, -7);
        a.token_rows = s.out<int32_t>(rows, -7);
        EXPECT_TRUE(s.ok(s.ops()->plan(s.st(), &a), "plan (expert choice)"));
        Out now = o;
        now.row_token = s.get(a.row_token, rows);
        now.row_slot = s.get(a.row_slot, rows);
        now.row_weight = s.get(a.row_weight, rows);
        now.token_offsets = s.get(a.token_offsets, T + 1);
        now.token_rows = s.get(a.token_rows, rows);
        return now;
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      const Out rc = run(c), rg = run(g);
      EXPECT_EQ(rc.offsets[E], rows);
      EXPECT_TRUE(same("offsets (host)", rg.offsets, rc.offsets));
      EXPECT_TRUE(same("kept (host)", rg.kept, rc.kept));
      EXPECT_TRUE(same("weight_sum (host, core/weight_sum.h order)", rg.weight_sum, rc.weight_sum));
      EXPECT_TRUE(same("row_token", rg.row_token, rc.row_token));
      EXPECT_TRUE(same("row_slot", rg.row_slot, rc.row_slot));
      EXPECT_TRUE(same("row_weight", rg.row_weight, rc.row_weight));
      EXPECT_TRUE(same("token_offsets", rg.token_offsets, rc.token_offsets));
      EXPECT_TRUE(same("token_rows", rg.token_rows, rc.token_rows));
    }
  }
}

// ---- dispatch / combine and their backward --------------------------------------------------------

class GpuRows : public GpuStages {
 protected:
  // Token choice with capacity (some slots dropped: -1 rows) and expert choice (tokens with 0..E rows).
  std::vector<Plan> routings() {
    std::vector<Plan> out;
    const int64_t T = 300, E = 16, k = 4;
    Rng rng(400);
    const std::vector<int32_t> ids = skewed_ids(rng, T, E, k);
    std::vector<float> w(T * k);
    for (float &v : w) v = rng.uniform(0.01f, 1.0f);
    out.push_back(host_plan(T, E, k, 60, MOE_DROP_POSITION, ids, w));
    EXPECT_LT(out.back().R, T * k) << "some slots should be dropped";
    std::vector<float> scores(T * E);
    for (float &v : scores) v = rng.uniform(0.001f, 1.0f);
    out.push_back(host_plan_ec(T, E, k, 50, scores));
    const Plan &ec = out.back();
    int64_t empty = 0;
    for (int64_t t = 0; t < T; ++t) empty += ec.token_offsets[t + 1] == ec.token_offsets[t];
    EXPECT_GT(empty, 0) << "some tokens should have no expert";
    return out;
  }
};

// Each row stage in every dtype, with a d_model that takes the 16-byte path and an odd one that
// cannot.
struct RowCase {
  int dtype;
  int64_t d;
};
std::vector<RowCase> row_cases() {
  std::vector<RowCase> out;
  for (int dtype : kDtypes)
    for (int64_t d : {int64_t{256}, int64_t{33}}) out.push_back({dtype, d});
  return out;
}
std::string row_case_name(const RowCase &rc, const Plan &p) {
  return std::string(dtype_name(rc.dtype)) + ", d " + std::to_string(rc.d) +
         (p.ec ? ", expert choice" : ", token choice with capacity");
}

TEST_F(GpuRows, Dispatch) {
  const std::vector<Plan> plans = routings();
  for (const RowCase &rc : row_cases())
    for (const Plan &p : plans) {
      SCOPED_TRACE(row_case_name(rc, p));
      Rng rng(401);
      const auto x = rng.nonzeros(p.T * rc.d, 1.0f);
      auto run = [&](Side &s) {
        moe_rows_args a = rows_args(s, p, rc.d, rc.dtype);
        a.x = s.put_as(rc.dtype, x);
        a.xe = s.out_as(rc.dtype, p.R * rc.d);
        EXPECT_TRUE(s.ok(s.ops()->dispatch(s.st(), &a), "dispatch"));
        return s.get_as(rc.dtype, a.xe, p.R * rc.d);
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      EXPECT_TRUE(same("xe (a gather: exact)", run(g), run(c)));
    }
}

TEST_F(GpuRows, Combine) {
  const std::vector<Plan> plans = routings();
  for (const RowCase &rc : row_cases())
    for (const Plan &p : plans) {
      SCOPED_TRACE(row_case_name(rc, p));
      Rng rng(402);
      const auto ye = rng.nonzeros(p.R * rc.d, 1.0f);
      auto run = [&](Side &s) {
        moe_rows_args a = rows_args(s, p, rc.d, rc.dtype);
        a.ye = s.put_as(rc.dtype, ye);
        a.y = s.out<float>(p.T * rc.d, kNaN);
        EXPECT_TRUE(s.ok(s.ops()->combine(s.st(), &a), "combine"));
        return s.get(a.y, p.T * rc.d);
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      // float32 sums of the same (16-bit) values on both sides.
      EXPECT_TRUE(close("y (float32; tokens without rows are 0)", run(g), run(c), kTol));
    }
}

TEST_F(GpuRows, CombineBackward) {
  const std::vector<Plan> plans = routings();
  for (const RowCase &rc : row_cases())
    for (const Plan &p : plans) {
      SCOPED_TRACE(row_case_name(rc, p));
      Rng rng(403);
      const auto ye = rng.nonzeros(p.R * rc.d, 1.0f), dy = rng.nonzeros(p.T * rc.d, 1.0f);
      struct Out {
        std::vector<float> dye, dw;
      };
      auto run = [&](Side &s) {
        moe_rows_args a = rows_args(s, p, rc.d, rc.dtype);
        a.ye = s.put_as(rc.dtype, ye);
        a.dy = s.put_as(rc.dtype, dy);
        a.dye = s.out_as(rc.dtype, p.R * rc.d);
        a.drow_weight = s.out<float>(p.R, kNaN);
        EXPECT_TRUE(s.ok(s.ops()->combine_bwd(s.st(), &a), "combine_bwd"));
        return Out{s.get_as(rc.dtype, a.dye, p.R * rc.d), s.get(a.drow_weight, p.R)};
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      const Out oc = run(c), og = run(g);
      EXPECT_TRUE(close("dye", og.dye, oc.dye, tol_of(rc.dtype)));
      EXPECT_TRUE(close("drow_weight (float32)", og.dw, oc.dw, kTol));
    }
}

TEST_F(GpuRows, DispatchBackward) {
  const std::vector<Plan> plans = routings();
  for (const RowCase &rc : row_cases())
    for (const Plan &p : plans) {
      SCOPED_TRACE(row_case_name(rc, p));
      Rng rng(404);
      const auto dxe = rng.nonzeros(p.R * rc.d, 1.0f);
      auto run = [&](Side &s) {
        moe_rows_args a = rows_args(s, p, rc.d, rc.dtype);
        a.dxe = s.put_as(rc.dtype, dxe);
        a.dx = s.out<float>(p.T * rc.d, kNaN);
        EXPECT_TRUE(s.ok(s.ops()->dispatch_bwd(s.st(), &a), "dispatch_bwd"));
        return s.get(a.dx, p.T * rc.d);
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      EXPECT_TRUE(close("dx (float32, overwritten; tokens without rows are 0)", run(g), run(c), kTol));
    }
}

// ---- expert FFN -----------------------------------------------------------------------------------

bool is_glu(int act) { return act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU || act == MOE_ACT_SWIGLU_CLAMPED; }

const char *act_name(int act) {
  switch (act) {
    case MOE_ACT_SWIGLU: return "SwiGLU";
    case MOE_ACT_GEGLU: return "GeGLU";
    case MOE_ACT_RELU: return "ReLU";
    case MOE_ACT_GELU: return "GELU";
    case MOE_ACT_SWIGLU_CLAMPED: return "SwiGLUClamped";
    default: return "SiLU";
  }
}

// Parameters: the activation and the dtype of every tensor (shared input's dx is float32).
class GpuFfn : public GpuStages, public ::testing::WithParamInterface<std::tuple<int, int>> {
 protected:
  static constexpr int64_t kD = 256, kFF = 192;
  int act() const { return std::get<0>(GetParam()); }
  int dtype() const { return std::get<1>(GetParam()); }
  // Routed: 8 experts, two of them (1 and 4) with no rows, one with a single row.
  // Shared input: 2 experts reading the same 150 tokens.
  struct Problem {
    bool shared;
    int64_t E, R_in, R_out;  // experts; rows of x; rows of h / y
    std::vector<int64_t> offsets;
    std::vector<float> x, w1, w3, w2;
    std::vector<float> b1, b3, b2;  // expert biases: the clamped SwiGLU's routed experts (gpt-oss)
  };
  // The clamped SwiGLU's limit: off the grid of the pre-activations below, so none equals it.
  static constexpr float kLimit = 0.3f;
  bool biased(const Problem &p) const { return act() == MOE_ACT_SWIGLU_CLAMPED && !p.shared; }
  Problem problem(bool shared, uint64_t seed) const {
    Problem p;
    p.shared = shared;
    if (shared) {
      p.E = 2;
      p.offsets = {0, 150};
      p.R_in = 150;
      p.R_out = p.E * p.R_in;
    } else {
      const int64_t counts[] = {37, 0, 55, 12, 0, 80, 1, 45};
      p.E = 8;
      p.offsets.assign(1, 0);
      for (int64_t c : counts) p.offsets.push_back(p.offsets.back() + c);
      p.R_in = p.R_out = p.offsets.back();
    }
    Rng rng(seed);
    // ReLU has a kink at 0: x and w1 on an exact grid (exact in bf16 and f16 too) make x W1^T exact
    // in float32 on both backends, so no pre-activation can land on different sides of 0 by rounding.
    // The clamped SwiGLU's kinks likewise (gate and up on the grid, biases too).
    if (act() == MOE_ACT_RELU || act() == MOE_ACT_SWIGLU_CLAMPED) {
      p.x = rng.odd_grids(p.R_in * kD, 4, 0.125f);
      p.w1 = rng.odd_grids(p.E * kFF * kD, 4, 1.0f / 128);
    } else {
      p.x = rng.nonzeros(p.R_in * kD, 1.0f);
      p.w1 = rng.nonzeros(p.E * kFF * kD, 1.0f / 16);
    }
    if (act() == MOE_ACT_SWIGLU_CLAMPED)
      p.w3 = rng.odd_grids(p.E * kFF * kD, 4, 1.0f / 128);
    else if (is_glu(act()))
      p.w3 = rng.nonzeros(p.E * kFF * kD, 1.0f / 16);
    p.w2 = rng.nonzeros(p.E * kD * kFF, 1.0f / 14);
    if (biased(p)) {
      p.b1 = rng.odd_grids(p.E * kFF, 4, 1.0f / 64);
      p.b3 = rng.odd_grids(p.E * kFF, 4, 1.0f / 64);
      p.b2 = rng.nonzeros(p.E * kD, 0.25f);
    }
    return p;
  }
  moe_ffn_args args(Side &s, const Problem &p) const {
    const int dt = dtype();
    moe_ffn_args a = moe_test::ffn_args(p.E, kD, kFF, act(), p.offsets, dt);
    a.shared_input = p.shared ? 1 : 0;
    a.x = s.put_as(dt, p.x);
    a.w1 = s.put_as(dt, p.w1);
    a.w3 = is_glu(act()) ? s.put_as(dt, p.w3) : nullptr;
    a.w2 = s.put_as(dt, p.w2);
    a.swiglu_alpha = 1.702f;
    a.swiglu_limit = kLimit;
    if (biased(p)) {
      a.b1 = s.put_as(dt, p.b1);
      a.b3 = s.put_as(dt, p.b3);
      a.b2 = s.put_as(dt, p.b2);
    }
    a.h = s.out_as(dt, p.R_out * kFF);
    a.g = is_glu(act()) ? s.out_as(dt, p.R_out * kFF) : nullptr;
    a.a = s.out_as(dt, p.R_out * kFF);
    return a;
  }
  struct Fwd {
    std::vector<float> h, g, y;
  };
  Fwd forward(Side &s, const Problem &p) const {
    moe_ffn_args a = args(s, p);
    a.y = s.out_as(dtype(), p.R_out * kD);
    EXPECT_TRUE(s.ok(s.ops()->expert_ffn(s.st(), &a), "expert_ffn"));
    Fwd f;
    f.h = s.get_as(dtype(), a.h, p.R_out * kFF);
    if (a.g) f.g = s.get_as(dtype(), a.g, p.R_out * kFF);
    f.y = s.get_as(dtype(), a.y, p.R_out * kD);
    return f;
  }
  void check_forward(bool shared) {
    const double tol = tol_of(dtype());
    const Problem p = problem(shared, shared ? 501 : 502);
    Side c(cpu_, cs_), g(gpu_, gs_);
    const Fwd rc = forward(c, p), rg = forward(g, p);
    EXPECT_TRUE(close("h (saved pre-activation)", rg.h, rc.h, tol));
    if (is_glu(act())) { EXPECT_TRUE(close("g (saved GLU input)", rg.g, rc.g, tol)); }
    EXPECT_TRUE(close("y", rg.y, rc.y, tol));
  }
  void check_backward(bool shared) {
    const int dt = dtype();
    const double tol = tol_of(dt);
    const Problem p = problem(shared, shared ? 503 : 504);
    Fwd saved;
    {
      Side c(cpu_, cs_);
      saved = forward(c, p);
    }
    Rng rng(shared ? 505 : 506);
    const auto dy = rng.nonzeros(p.R_out * kD, 1.0f);
    const auto dx0 = rng.nonzeros(p.R_in * kD, 1.0f);  // shared input: dx is float32 and accumulated
    const auto dw1_0 = rng.nonzeros(p.E * kFF * kD, 1.0f), dw3_0 = rng.nonzeros(p.E * kFF * kD, 1.0f),
               dw2_0 = rng.nonzeros(p.E * kD * kFF, 1.0f);
    const auto db1_0 = rng.nonzeros(p.E * kFF, 1.0f), db3_0 = rng.nonzeros(p.E * kFF, 1.0f),
               db2_0 = rng.nonzeros(p.E * kD, 1.0f);
    struct Bwd {
      std::vector<float> dx, dw1, dw3, dw2, db1, db3, db2;
    };
    for (bool want_dx : {true, false}) {
      SCOPED_TRACE(want_dx ? "with dx" : "dx NULL");
      auto run = [&](Side &s) {
        moe_ffn_args a = args(s, p);
        a.h = s.put_as(dt, saved.h);
        if (is_glu(act())) a.g = s.put_as(dt, saved.g);
        a.dy = s.put_as(dt, dy);
        if (want_dx) a.dx = shared ? static_cast<void *>(s.put(dx0)) : s.out_as(dt, p.R_in * kD);
        a.dw1 = s.put_as(dt, dw1_0);
        a.dw3 = is_glu(act()) ? s.put_as(dt, dw3_0) : nullptr;
        a.dw2 = s.put_as(dt, dw2_0);
        a.dh = s.out_as(dt, p.R_out * kFF);
        a.dg = is_glu(act()) ? s.out_as(dt, p.R_out * kFF) : nullptr;
        if (biased(p)) {
          a.db1 = s.put_as(dt, db1_0);
          a.db3 = s.put_as(dt, db3_0);
          a.db2 = s.put_as(dt, db2_0);
        }
        EXPECT_TRUE(s.ok(s.ops()->expert_ffn_bwd(s.st(), &a), "expert_ffn_bwd"));
        Bwd b;
        if (want_dx)
          b.dx = shared ? s.get(static_cast<const float *>(a.dx), p.R_in * kD) : s.get_as(dt, a.dx, p.R_in * kD);
        b.dw1 = s.get_as(dt, a.dw1, p.E * kFF * kD);
        if (is_glu(act())) b.dw3 = s.get_as(dt, a.dw3, p.E * kFF * kD);
        b.dw2 = s.get_as(dt, a.dw2, p.E * kD * kFF);
        if (biased(p)) {
          b.db1 = s.get_as(dt, a.db1, p.E * kFF);
          b.db3 = s.get_as(dt, a.db3, p.E * kFF);
          b.db2 = s.get_as(dt, a.db2, p.E * kD);
        }
        return b;
      };
      Side c(cpu_, cs_), g(gpu_, gs_);
      const Bwd rc = run(c), rg = run(g);
      if (want_dx) { EXPECT_TRUE(close(shared ? "dx (float32, accumulated)" : "dx", rg.dx, rc.dx, tol)); }
      EXPECT_TRUE(close("dw1 (accumulated)", rg.dw1, rc.dw1, tol));
      if (is_glu(act())) { EXPECT_TRUE(close("dw3 (accumulated)", rg.dw3, rc.dw3, tol)); }
      EXPECT_TRUE(close("dw2 (accumulated)", rg.dw2, rc.dw2, tol));
      if (biased(p)) {
        EXPECT_TRUE(close("db1 (accumulated)", rg.db1, rc.db1, tol));
        EXPECT_TRUE(close("db3 (accumulated)", rg.db3, rc.db3, tol));
        EXPECT_TRUE(close("db2 (accumulated)", rg.db2, rc.db2, tol));
      }
    }
  }
};

TEST_P(GpuFfn, Routed) { check_forward(false); }
TEST_P(GpuFfn, SharedInput) { check_forward(true); }
TEST_P(GpuFfn, RoutedBackward) { check_backward(false); }
TEST_P(GpuFfn, SharedInputBackward) { check_backward(true); }

INSTANTIATE_TEST_SUITE_P(Activations, GpuFfn,
                         ::testing::Combine(::testing::Values(MOE_ACT_SWIGLU, MOE_ACT_GEGLU, MOE_ACT_RELU,
                                                              MOE_ACT_GELU, MOE_ACT_SILU, MOE_ACT_SWIGLU_CLAMPED),
                                            ::testing::ValuesIn(kDtypes)),
                         [](const ::testing::TestParamInfo<std::tuple<int, int>> &info) {
                           return std::string(act_name(std::get<0>(info.param))) + "_" +
                                  dtype_name(std::get<1>(info.param));
                         });

// ---- shared experts ---------------------------------------------------------------------------------

TEST_F(GpuStages, SharedCombine) {
  const int64_t T = 300, S = 2;
  for (int dtype : kDtypes)
    for (int64_t d : {int64_t{256}, int64_t{33}}) {
      Rng rng(600);
      const auto x = rng.nonzeros(T * d, 1.0f), gw = rng.nonzeros(d, 1.0f / 16), ys = rng.nonzeros(S * T * d, 1.0f),
                 y0 = rng.nonzeros(T * d, 1.0f);
      for (bool gated : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + ", d " + std::to_string(d) +
                     (gated ? ", with gate" : ", without gate"));
        struct Out {
          std::vector<float> y, gate;
        };
        auto run = [&](Side &s) {
          moe_shared_args a = moe_test::shared_args(T, d, S, dtype);
          a.x = s.put_as(dtype, x);
          a.gate_w = gated ? s.put(gw) : nullptr;
          a.ys = s.put_as(dtype, ys);
          a.gate = s.out<float>(T, kNaN);
          a.y = s.put(y0);
          EXPECT_TRUE(s.ok(s.ops()->shared_combine(s.st(), &a), "shared_combine"));
          Out o;
          o.y = s.get(a.y, T * d);
          if (gated) o.gate = s.get(a.gate, T);
          return o;
        };
        Side c(cpu_, cs_), g(gpu_, gs_);
        const Out rc = run(c), rg = run(g);
        // float32 outputs of the same 16-bit inputs on both sides.
        EXPECT_TRUE(close("y (float32, accumulated)", rg.y, rc.y, kTol));
        if (gated) { EXPECT_TRUE(close("gate (saved sigmoid)", rg.gate, rc.gate, kTol)); }
      }
    }
}

TEST_F(GpuStages, SharedCombineBackward) {
  const int64_t T = 300, S = 2;
  for (int dtype : kDtypes)
    for (int64_t d : {int64_t{256}, int64_t{33}}) {
      Rng rng(601);
      const auto x = rng.nonzeros(T * d, 1.0f), gw = rng.nonzeros(d, 1.0f / 16), ys = rng.nonzeros(S * T * d, 1.0f),
                 dy = rng.nonzeros(T * d, 1.0f), dx0 = rng.nonzeros(T * d, 1.0f), dgw0 = rng.nonzeros(d, 1.0f);
      // The gate the forward saved, from the CPU stage.
      std::vector<float> gate(T, kNaN);
      {
        const std::vector<unsigned char> xb = moe_test::encode(dtype, x), ysb = moe_test::encode(dtype, ys);
        std::vector<float> y(T * d, 0.0f);
        moe_shared_args a = moe_test::shared_args(T, d, S, dtype);
        a.x = xb.data();
        a.gate_w = gw.data();
        a.ys = ysb.data();
        a.gate = gate.data();
        a.y = y.data();
        ASSERT_EQ(cpu_->shared_combine(cs_, &a), MOE_OK) << cpu_->last_error(cs_);
      }
      for (bool gated : {false, true})
        for (bool with_dx : {true, false})
          for (bool scratch : {true, false}) {
            if (!gated && scratch) continue;
            SCOPED_TRACE(std::string(dtype_name(dtype)) + ", d " + std::to_string(d) +
                         (gated ? ", with gate" : ", without gate") + (with_dx ? ", dx" : ", dx NULL") +
                         (scratch ? ", caller's scratch" : ""));
            struct Out {
              std::vector<float> dys, dx, dgw;
            };
            auto run = [&](Side &s) {
              moe_shared_args a = moe_test::shared_args(T, d, S, dtype);
              a.x = s.put_as(dtype, x);
              a.gate_w = gated ? s.put(gw) : nullptr;
              a.ys = s.put_as(dtype, ys);
              a.gate = gated ? s.put(gate) : s.out<float>(T, kNaN);
              a.dy = s.put_as(dtype, dy);
              a.dys = s.out_as(dtype, S * T * d);
              a.dx = with_dx ? s.put(dx0) : nullptr;
              a.dgate_w = gated ? s.put(dgw0) : nullptr;
              a.scratch = scratch ? s.out<float>(T, kNaN) : nullptr;
              EXPECT_TRUE(s.ok(s.ops()->shared_combine_bwd(s.st(), &a), "shared_combine_bwd"));
              Out o;
              o.dys = s.get_as(dtype, a.dys, S * T * d);
              if (with_dx) o.dx = s.get(a.dx, T * d);
              if (gated) o.dgw = s.get(a.dgate_w, d);
              return o;
            };
            Side c(cpu_, cs_), g(gpu_, gs_);
            const Out rc = run(c), rg = run(g);
            EXPECT_TRUE(close("dys", rg.dys, rc.dys, tol_of(dtype)));
            if (with_dx) { EXPECT_TRUE(close("dx (float32, accumulated)", rg.dx, rc.dx, kTol)); }
            if (gated) { EXPECT_TRUE(close("dgate_w (float32, accumulated)", rg.dgw, rc.dgw, kTol)); }
          }
    }
}

// ---- select backward ----------------------------------------------------------------------------

struct SelectBwdSpec {
  SelectSpec sel;
  int64_t capacity;  // token choice: -1 dropless; expert choice: C
  bool gate_coef;
  float z_coef;
};

TEST_F(GpuStages, SelectBackward) {
  const int64_t T = 300, E = 16;
  const SelectBwdSpec specs[] = {
      {{"softmax normalized, capacity", 4, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.0f, 0, false}, 60, false, 0.0f},
      {{"softmax normalized, gate_coef, z", 4, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.01f, 0, false}, -1, true, 0.01f},
      {{"softmax raw, scale 0.5, z", 2, MOE_SCORE_SOFTMAX, 0, 0.5f, 1, 1, 0.0f, 0, false}, 30, false, 0.02f},
      {{"sigmoid normalized, scale 2.5, groups, gate_coef, z", 4, MOE_SCORE_SIGMOID, 1, 2.5f, 4, 2, 0.05f, 0, false},
       70, true, 0.01f},
      {{"sigmoid raw", 3, MOE_SCORE_SIGMOID, 0, 1.0f, 1, 1, 0.05f, 0, false}, -1, false, 0.0f},
      {{"expert choice, gate_coef, z", 4, MOE_SCORE_SOFTMAX, 0, 1.0f, 1, 1, 0.0f, 1, false}, 50, true, 0.01f},
      {{"softmax, GAUSSIAN load_coef, gate_coef, z", 2, MOE_SCORE_SOFTMAX, 1, 1.0f, 1, 1, 0.0f, 0, true}, 40, true,
       0.01f},
      {{"sigmoid, GAUSSIAN load_coef", 3, MOE_SCORE_SIGMOID, 1, 1.0f, 1, 1, 0.02f, 0, true}, -1, false, 0.0f},
  };
  int variant = 0;
  for (const SelectBwdSpec &sp : specs) {
    SCOPED_TRACE(sp.sel.name);
    Rng rng(700 + variant++);
    const int64_t k = sp.sel.k;
    std::vector<float> bias(E, 0.0f);
    if (sp.sel.bias_bound > 0) bias = rng.nonzeros(E, sp.sel.bias_bound);
    const std::vector<float> logits = separated_logits(rng, T, E, sp.sel.score, bias, sp.sel.groups);
    std::vector<float> clean, sd;
    if (sp.sel.load) noisy_parts(rng, logits, clean, sd);
    // What the forward saved, from the CPU stages.
    SelectSpec tc = sp.sel;
    tc.expert_choice = 0;  // the token-choice outputs are passed even for expert choice, as the core does
    const SelectOut so = host_select(tc, T, E, logits, bias, sp.sel.load ? &clean : nullptr, sp.sel.load ? &sd : nullptr);
    Plan p = sp.sel.expert_choice ? host_plan_ec(T, E, k, sp.capacity, so.scores)
                                  : host_plan(T, E, k, sp.capacity, MOE_DROP_POSITION, so.ids, so.topk_w);
    if (!sp.sel.expert_choice) p.row_of_slot.resize(static_cast<size_t>(T * k));
    if (sp.capacity >= 0 && !sp.sel.expert_choice) {
      EXPECT_LT(p.R, T * k) << "some slots should be dropped";
    }
    const auto drow = rng.nonzeros(static_cast<size_t>(p.R), 0.5f);
    const auto lb = rng.nonzeros(E, 0.01f), gc = rng.nonzeros(E, 0.02f), lc = rng.nonzeros(E, 0.05f);
    struct Out {
      std::vector<float> dlogits, dclean, dstd;
    };
    auto run = [&](Side &s) {
      moe_select_bwd_args a{};
      a.T = T;
      a.E = E;
      a.k = k;
      a.score = sp.sel.score;
      a.normalize = sp.sel.normalize;
      a.routed_scale = sp.sel.routed_scale;
      a.logits = s.put(logits);
      a.scores = s.put(so.scores);
      a.lse = s.put(so.lse);
      a.topk_ids = s.put(so.ids);
      a.row_of_slot = s.put(p.row_of_slot);
      a.drow_weight = s.put(drow);
      a.lb_coef = lb.data();
      a.gate_coef = sp.gate_coef ? gc.data() : nullptr;
      a.z_coef = sp.z_coef;
      a.dlogits = s.out<float>(T * E, kNaN);
      a.expert_choice = sp.sel.expert_choice;
      if (sp.sel.expert_choice) {
        a.token_offsets = s.put(p.token_offsets);
        a.token_rows = s.put(p.token_rows);
        a.row_slot = s.put(p.row_slot);
      }
      if (sp.sel.load) {
        a.clean_logits = s.put(clean);
        a.noise_std = s.put(sd);
        a.load_coef = lc.data();
        a.dclean_extra = s.out<float>(T * E, kNaN);
        a.dstd_extra = s.out<float>(T * E, kNaN);
      }
      EXPECT_TRUE(s.ok(s.ops()->select_bwd(s.st(), &a), "select_bwd"));
      Out o;
      o.dlogits = s.get(a.dlogits, T * E);
      if (sp.sel.load) {
        o.dclean = s.get(a.dclean_extra, T * E);
        o.dstd = s.get(a.dstd_extra, T * E);
      }
      return o;
    };
    Side c(cpu_, cs_), g(gpu_, gs_);
    const Out rc = run(c), rg = run(g);
    EXPECT_TRUE(close("dlogits", rg.dlogits, rc.dlogits, kTol));
    if (sp.sel.load) {
      EXPECT_TRUE(close("dclean_extra", rg.dclean, rc.dclean, kTol));
      EXPECT_TRUE(close("dstd_extra", rg.dstd, rc.dstd, kTol));
    }
  }
}

// ---- empty batches and empty routings ------------------------------------------------------------

TEST_F(GpuStages, EmptyBatch) {
  // T = 0 through every stage, with the empty buffers the core allocates; host outputs are zeroed.
  const int64_t T = 0, d = 64, E = 8, k = 2, ff = 32;
  Rng rng(800);
  const auto w = rng.nonzeros(E * d, 0.1f), w1 = rng.nonzeros(E * ff * d, 0.1f), w2 = rng.nonzeros(E * d * ff, 0.1f);
  const std::vector<float> bias(E, 0.0f), none;
  Side g(gpu_, gs_);
  moe_gate_args ga{};
  ga.T = T;
  ga.d = d;
  ga.E = E;
  ga.x = g.put(none);
  ga.w = g.put(w);
  ga.logits = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->gate(gs_, &ga), "gate"));

  std::vector<int64_t> counts(E, -7);
  std::vector<double> prob_sum(E, kDNaN);
  double lse_sq = kDNaN;
  moe_select_args sa = moe_test::select_args(T, E, {k});
  sa.logits = ga.logits;
  sa.bias = g.put(bias);
  sa.scores = g.put(none);
  sa.lse = g.put(none);
  sa.topk_ids = g.put(std::vector<int32_t>());
  sa.topk_w = g.put(none);
  sa.counts = counts.data();
  sa.prob_sum = prob_sum.data();
  sa.lse_sq_sum = &lse_sq;
  EXPECT_TRUE(g.ok(gpu_->select(gs_, &sa), "select"));
  EXPECT_EQ(counts, std::vector<int64_t>(E, 0));
  EXPECT_EQ(prob_sum, std::vector<double>(E, 0.0));
  EXPECT_EQ(lse_sq, 0.0);

  for (int64_t capacity : {int64_t{-1}, int64_t{0}}) {
    std::vector<int64_t> offsets(E + 1, -7), kept(E, -7);
    std::vector<double> wsum(E, kDNaN);
    moe_plan_args pa = moe_test::plan_args(T, E, k, capacity);
    pa.topk_ids = sa.topk_ids;
    pa.topk_w = sa.topk_w;
    pa.row_of_slot = g.put(std::vector<int32_t>());
    pa.row_token = g.put(std::vector<int32_t>());
    pa.row_slot = g.put(std::vector<int32_t>());
    pa.row_weight = g.put(none);
    pa.offsets = offsets.data();
    pa.kept = kept.data();
    pa.weight_sum = wsum.data();
    EXPECT_TRUE(g.ok(gpu_->plan(gs_, &pa), "plan"));
    EXPECT_EQ(offsets, std::vector<int64_t>(E + 1, 0));
    EXPECT_EQ(kept, std::vector<int64_t>(E, 0));
    EXPECT_EQ(wsum, std::vector<double>(E, 0.0));
  }

  moe_rows_args ra{};
  ra.T = T;
  ra.d = d;
  ra.dtype = MOE_DTYPE_F32;
  ra.R = 0;
  ra.k = k;
  ra.token_rows = g.put(std::vector<int32_t>());
  ra.row_token = g.put(std::vector<int32_t>());
  ra.row_weight = g.put(none);
  ra.x = g.put(none);
  ra.xe = g.put(none);
  ra.ye = g.put(none);
  ra.y = g.put(none);
  ra.dy = g.put(none);
  ra.dye = g.put(none);
  ra.drow_weight = g.put(none);
  ra.dxe = g.put(none);
  ra.dx = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->dispatch(gs_, &ra), "dispatch"));
  EXPECT_TRUE(g.ok(gpu_->combine(gs_, &ra), "combine"));
  EXPECT_TRUE(g.ok(gpu_->combine_bwd(gs_, &ra), "combine_bwd"));
  EXPECT_TRUE(g.ok(gpu_->dispatch_bwd(gs_, &ra), "dispatch_bwd"));

  const std::vector<int64_t> offsets(E + 1, 0);
  moe_ffn_args fa = moe_test::ffn_args(E, d, ff, MOE_ACT_RELU, offsets);
  fa.x = g.put(none);
  fa.w1 = g.put(w1);
  fa.w2 = g.put(w2);
  fa.h = g.put(none);
  fa.a = g.put(none);
  fa.y = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->expert_ffn(gs_, &fa), "expert_ffn"));
  const auto dw1_0 = rng.nonzeros(E * ff * d, 1.0f), dw2_0 = rng.nonzeros(E * d * ff, 1.0f);
  float *dw1 = g.put(dw1_0), *dw2 = g.put(dw2_0);
  fa.dy = g.put(none);
  fa.dx = g.put(none);
  fa.dw1 = dw1;
  fa.dw2 = dw2;
  fa.dh = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->expert_ffn_bwd(gs_, &fa), "expert_ffn_bwd"));
  EXPECT_TRUE(same("dw1 untouched", g.get(dw1, dw1_0.size()), dw1_0));
  EXPECT_TRUE(same("dw2 untouched", g.get(dw2, dw2_0.size()), dw2_0));

  moe_select_bwd_args sb{};
  const std::vector<float> lb(E, 0.01f);
  sb.T = T;
  sb.E = E;
  sb.k = k;
  sb.normalize = 1;
  sb.routed_scale = 1.0f;
  sb.logits = ga.logits;
  sb.scores = sa.scores;
  sb.lse = sa.lse;
  sb.topk_ids = sa.topk_ids;
  sb.row_of_slot = ra.token_rows;
  sb.drow_weight = ra.drow_weight;
  sb.lb_coef = lb.data();
  sb.dlogits = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->select_bwd(gs_, &sb), "select_bwd"));

  const auto dw0 = rng.nonzeros(E * d, 1.0f);
  ga.dlogits = g.put(none);
  ga.dx = g.put(none);
  ga.dw = g.put(dw0);
  EXPECT_TRUE(g.ok(gpu_->gate_bwd(gs_, &ga), "gate_bwd"));
  EXPECT_TRUE(same("router dw untouched", g.get(ga.dw, dw0.size()), dw0));

  moe_shared_args sh = moe_test::shared_args(T, d, 1);
  sh.x = g.put(none);
  sh.ys = g.put(none);
  sh.gate = g.put(none);
  sh.y = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->shared_combine(gs_, &sh), "shared_combine"));
  sh.dy = g.put(none);
  sh.dys = g.put(none);
  sh.dx = g.put(none);
  EXPECT_TRUE(g.ok(gpu_->shared_combine_bwd(gs_, &sh), "shared_combine_bwd"));
}

// The activation stages in 16 bits on an empty batch, GLU (the path that sums dx in float32).
TEST_F(GpuStages, EmptyBatchLowPrecision) {
  const int64_t d = 64, E = 8, k = 2, ff = 32;
  Rng rng(802);
  for (int dtype : {MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Side g(gpu_, gs_);
    const std::vector<float> none;
    moe_rows_args ra{};
    ra.T = 0;
    ra.d = d;
    ra.dtype = dtype;
    ra.k = k;
    ra.token_rows = g.put(std::vector<int32_t>());
    ra.row_token = g.put(std::vector<int32_t>());
    ra.row_weight = g.put(none);
    ra.x = g.put_as(dtype, none);
    ra.xe = g.put_as(dtype, none);
    ra.ye = g.put_as(dtype, none);
    ra.y = g.put(none);
    ra.dy = g.put_as(dtype, none);
    ra.dye = g.put_as(dtype, none);
    ra.drow_weight = g.put(none);
    ra.dxe = g.put_as(dtype, none);
    ra.dx = g.put(none);
    EXPECT_TRUE(g.ok(gpu_->dispatch(gs_, &ra), "dispatch"));
    EXPECT_TRUE(g.ok(gpu_->combine(gs_, &ra), "combine"));
    EXPECT_TRUE(g.ok(gpu_->combine_bwd(gs_, &ra), "combine_bwd"));
    EXPECT_TRUE(g.ok(gpu_->dispatch_bwd(gs_, &ra), "dispatch_bwd"));

    const std::vector<int64_t> offsets(E + 1, 0);
    const auto w1 = rng.nonzeros(E * ff * d, 0.1f), w2 = rng.nonzeros(E * d * ff, 0.1f);
    const auto dw1_0 = rng.nonzeros(E * ff * d, 1.0f), dw2_0 = rng.nonzeros(E * d * ff, 1.0f);
    moe_ffn_args fa = moe_test::ffn_args(E, d, ff, MOE_ACT_SWIGLU, offsets, dtype);
    fa.x = g.put_as(dtype, none);
    fa.w1 = g.put_as(dtype, w1);
    fa.w3 = g.put_as(dtype, w1);
    fa.w2 = g.put_as(dtype, w2);
    fa.h = g.put_as(dtype, none);
    fa.g = g.put_as(dtype, none);
    fa.a = g.put_as(dtype, none);
    fa.y = g.put_as(dtype, none);
    EXPECT_TRUE(g.ok(gpu_->expert_ffn(gs_, &fa), "expert_ffn"));
    fa.dy = g.put_as(dtype, none);
    fa.dx = g.put_as(dtype, none);
    fa.dw1 = g.put_as(dtype, dw1_0);
    fa.dw3 = g.put_as(dtype, dw1_0);
    fa.dw2 = g.put_as(dtype, dw2_0);
    fa.dh = g.put_as(dtype, none);
    fa.dg = g.put_as(dtype, none);
    EXPECT_TRUE(g.ok(gpu_->expert_ffn_bwd(gs_, &fa), "expert_ffn_bwd"));
    EXPECT_TRUE(same("dw1 untouched", g.get_as(dtype, fa.dw1, dw1_0.size()), moe_test::rounded(dtype, dw1_0)));
    EXPECT_TRUE(same("dw2 untouched", g.get_as(dtype, fa.dw2, dw2_0.size()), moe_test::rounded(dtype, dw2_0)));

    const auto gw = rng.nonzeros(d, 0.1f), dgw0 = rng.nonzeros(d, 1.0f);
    moe_shared_args sh = moe_test::shared_args(0, d, 1, dtype);
    sh.x = g.put_as(dtype, none);
    sh.gate_w = g.put(gw);
    sh.ys = g.put_as(dtype, none);
    sh.gate = g.put(none);
    sh.y = g.put(none);
    EXPECT_TRUE(g.ok(gpu_->shared_combine(gs_, &sh), "shared_combine"));
    sh.dy = g.put_as(dtype, none);
    sh.dys = g.put_as(dtype, none);
    sh.dx = g.put(none);
    float *dgw = g.put(dgw0);
    sh.dgate_w = dgw;
    EXPECT_TRUE(g.ok(gpu_->shared_combine_bwd(gs_, &sh), "shared_combine_bwd"));
    EXPECT_TRUE(same("dgate_w untouched", g.get(dgw, dgw0.size()), dgw0));
  }
}

TEST_F(GpuStages, AllSlotsDropped) {
  // Tokens but no rows (capacity 0): combine and dispatch_bwd write zeros, the FFN has nothing to do.
  const int64_t T = 40, d = 64, E = 8, k = 2, ff = 32;
  Rng rng(801);
  const std::vector<int32_t> ids = skewed_ids(rng, T, E, k);
  std::vector<float> w(T * k);
  for (float &v : w) v = rng.uniform(0.1f, 1.0f);
  const Plan p = host_plan(T, E, k, 0, MOE_DROP_POSITION, ids, w);
  ASSERT_EQ(p.R, 0);
  const auto w1 = rng.nonzeros(E * ff * d, 0.1f), w2 = rng.nonzeros(E * d * ff, 0.1f);
  for (int dtype : kDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    Side g(gpu_, gs_);
    moe_rows_args a = rows_args(g, p, d, dtype);
    a.ye = g.put_as(dtype, std::vector<float>());
    float *y = g.out<float>(T * d, kNaN), *dx = g.out<float>(T * d, kNaN);
    a.y = y;
    a.dxe = g.put_as(dtype, std::vector<float>());
    a.dx = dx;
    EXPECT_TRUE(g.ok(gpu_->combine(gs_, &a), "combine"));
    EXPECT_TRUE(g.ok(gpu_->dispatch_bwd(gs_, &a), "dispatch_bwd"));
    EXPECT_TRUE(same("y", g.get(y, T * d), std::vector<float>(T * d, 0.0f)));
    EXPECT_TRUE(same("dx", g.get(dx, T * d), std::vector<float>(T * d, 0.0f)));
    const std::vector<int64_t> offsets(E + 1, 0);
    moe_ffn_args fa = moe_test::ffn_args(E, d, ff, MOE_ACT_GELU, offsets, dtype);
    fa.x = g.put_as(dtype, std::vector<float>());
    fa.w1 = g.put_as(dtype, w1);
    fa.w2 = g.put_as(dtype, w2);
    fa.h = g.put_as(dtype, std::vector<float>());
    fa.a = g.put_as(dtype, std::vector<float>());
    fa.y = g.put_as(dtype, std::vector<float>());
    EXPECT_TRUE(g.ok(gpu_->expert_ffn(gs_, &fa), "expert_ffn"));
  }
}

// ---- streams --------------------------------------------------------------------------------------

TEST_F(GpuStages, SetStream) {
  EXPECT_EQ(gpu_->set_stream(gs_, nullptr), MOE_OK) << gpu_->last_error(gs_);
  cudaStream_t stream = nullptr;
  CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::unique_ptr<CUstream_st, decltype(&cudaStreamDestroy)> owner(stream, &cudaStreamDestroy);
  void *own = gpu_->stream ? gpu_->stream(gs_) : nullptr;
  ASSERT_EQ(gpu_->set_stream(gs_, stream), MOE_OK) << gpu_->last_error(gs_);
  if (gpu_->stream) {
    EXPECT_EQ(gpu_->stream(gs_), static_cast<void *>(stream));
  }

  // A few stages in a row on the caller's stream (non-blocking: no implicit ordering with the
  // legacy default stream), results read back after synchronize, as the core does.
  const int64_t T = 300, d = 256, E = 16, k = 4;
  Rng rng(900);
  const auto w = rng.nonzeros(E * d, 1.0f / 16);
  const std::vector<float> bias(E, 0.0f);
  // The logits come from cuBLAS on one side and the CPU GEMM on the other and differ in their last
  // bits: x is drawn so that no token's top-k is at a near-tie, and the ids must then agree.
  moe_test::RouterInputs router;
  router.cfg = moe_test::config(d, 1, E, k);
  router.T = T;
  router.x = rng.nonzeros(T * d, 1.0f);
  router.weight = w;
  ASSERT_TRUE(moe_test::draw_without_near_ties(router, 0, rng, [&](Rng &g) { return g.nonzeros(d, 1.0f); }))
      << "could not draw inputs without near-ties";
  const std::vector<float> x = router.x;
  struct Out {
    std::vector<float> logits, scores, y;
    std::vector<int32_t> ids;
    std::vector<int64_t> counts, offsets;
  };
  auto run = [&](Side &s) {
    Out o;
    moe_gate_args ga{};
    ga.T = T;
    ga.d = d;
    ga.E = E;
    ga.x = s.put(x);
    ga.w = s.put(w);
    ga.logits = s.out<float>(T * E, kNaN);
    EXPECT_TRUE(s.ok(s.ops()->gate(s.st(), &ga), "gate"));
    std::vector<double> prob_sum(E);
    double lse_sq = 0.0;
    o.counts.assign(E, -7);
    moe_select_args sa = moe_test::select_args(T, E, {k});
    sa.logits = ga.logits;
    sa.bias = s.put(bias);
    sa.scores = s.out<float>(T * E, kNaN);
    sa.lse = s.out<float>(T, kNaN);
    sa.topk_ids = s.out<int32_t>(T * k, -7);
    sa.topk_w = s.out<float>(T * k, kNaN);
    sa.counts = o.counts.data();
    sa.prob_sum = prob_sum.data();
    sa.lse_sq_sum = &lse_sq;
    EXPECT_TRUE(s.ok(s.ops()->select(s.st(), &sa), "select"));
    o.offsets.assign(E + 1, -7);
    std::vector<int64_t> kept(E);
    std::vector<double> wsum(E);
    moe_plan_args pa = moe_test::plan_args(T, E, k, -1);
    pa.topk_ids = sa.topk_ids;
    pa.topk_w = sa.topk_w;
    pa.row_of_slot = s.out<int32_t>(T * k, -7);
    pa.row_token = s.out<int32_t>(T * k, -7);
    pa.row_slot = s.out<int32_t>(T * k, -7);
    pa.row_weight = s.out<float>(T * k, kNaN);
    pa.offsets = o.offsets.data();
    pa.kept = kept.data();
    pa.weight_sum = wsum.data();
    EXPECT_TRUE(s.ok(s.ops()->plan(s.st(), &pa), "plan"));
    const int64_t R = o.offsets[E];
    moe_rows_args ra{};
    ra.T = T;
    ra.d = d;
    ra.dtype = MOE_DTYPE_F32;
    ra.R = R;
    ra.k = k;
    ra.token_rows = pa.row_of_slot;
    ra.row_token = pa.row_token;
    ra.row_weight = pa.row_weight;
    ra.x = ga.x;
    ra.xe = s.out<float>(R * d, kNaN);
    EXPECT_TRUE(s.ok(s.ops()->dispatch(s.st(), &ra), "dispatch"));
    ra.ye = ra.xe;  // identity experts
    ra.y = s.out<float>(T * d, kNaN);
    EXPECT_TRUE(s.ok(s.ops()->combine(s.st(), &ra), "combine"));
    o.logits = s.get(ga.logits, T * E);
    o.scores = s.get(sa.scores, T * E);
    o.ids = s.get(sa.topk_ids, T * k);
    o.y = s.get(ra.y, T * d);
    return o;
  };
  {
    Side c(cpu_, cs_), g(gpu_, gs_);
    const Out rc = run(c), rg = run(g);
    EXPECT_TRUE(close("logits", rg.logits, rc.logits, kTol));
    EXPECT_TRUE(close("scores", rg.scores, rc.scores, kTol));
    EXPECT_TRUE(same("topk_ids", rg.ids, rc.ids));
    EXPECT_TRUE(same("counts", rg.counts, rc.counts));
    EXPECT_TRUE(same("offsets", rg.offsets, rc.offsets));
    EXPECT_TRUE(close("y", rg.y, rc.y, kTol));
  }  // the Side frees its buffers while the stream is still set
  EXPECT_EQ(gpu_->set_stream(gs_, nullptr), MOE_OK) << gpu_->last_error(gs_);
  if (gpu_->stream) {
    EXPECT_EQ(gpu_->stream(gs_), own) << "set_stream(NULL) goes back to the state's own stream";
  }
  CUDA_EXPECT(cudaStreamSynchronize(stream));
}

}  // namespace
