// moe_layer_memory and moe_context_memory on a CPU layer: the bytes of the parameters and their
// gradients in their storage dtypes, a workspace that the inference forward grows and a training
// forward does not (its context holds its own), device_pool 0 (no device memory pool on the CPU),
// and the struct_size contract (a caller built against the shorter struct gets only its fields).
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <cstddef>
#include <cstring>
#include <vector>

#include "support/half.h"
#include "support/layer.h"
#include "support/random.h"

namespace {

moe_memory memory_of(const moe_layer *l) {
  moe_memory m;
  std::memset(&m, 0xab, sizeof m);
  m.struct_size = sizeof m;
  MOE_EXPECT_OK(moe_layer_memory(l, &m));
  return m;
}

TEST(Memory, LayerAndContextBytes) {
  for (int dtype : {MOE_DTYPE_F32, MOE_DTYPE_BF16}) {
    SCOPED_TRACE(dtype);
    moe_config cfg = moe_test::config(32, 48, 4, 2, 1);
    cfg.dtype = static_cast<moe_dtype>(dtype);
    cfg.num_shared_experts = 1;
    const moe_test::LayerPtr l = moe_test::make_layer(cfg);
    ASSERT_TRUE(l);
    size_t params = 0, grads = 0;
    for (const moe_test::Param &p : moe_test::params(l.get())) {
      const size_t bytes = static_cast<size_t>(p.numel) * moe_test::dtype_size(moe_test::param_dtype(l.get(), p.name));
      params += bytes;
      grads += p.trainable ? bytes : 0;
    }
    moe_memory m = memory_of(l.get());
    EXPECT_EQ(m.struct_size, sizeof m);
    EXPECT_EQ(m.parameters, params);
    EXPECT_EQ(m.gradients, grads);
    EXPECT_EQ(m.workspace, 0u) << "nothing ran yet";
    EXPECT_EQ(m.device_pool, 0u) << "a CPU layer has no device memory pool";

    const int64_t T = 20;
    moe_test::Rng rng(2);
    const std::vector<unsigned char> x = moe_test::encode(dtype, rng.nonzeros(T * 32, 1.0f));
    std::vector<unsigned char> y(x.size()), dx(x.size());
    MOE_EXPECT_OK(moe_forward(l.get(), x.data(), T, y.data(), nullptr));
    const size_t ws = memory_of(l.get()).workspace;
    EXPECT_GT(ws, static_cast<size_t>(T * 32) * moe_test::dtype_size(dtype)) << "at least y's rows per expert";

    const moe_test::ContextPtr ctx = moe_test::make_context(l.get());
    size_t held = 7;
    MOE_EXPECT_OK(moe_context_memory(ctx.get(), &held));
    EXPECT_EQ(held, 0u) << "an empty context";
    MOE_EXPECT_OK(moe_forward(l.get(), x.data(), T, y.data(), ctx.get()));
    MOE_EXPECT_OK(moe_backward(l.get(), ctx.get(), x.data(), dx.data()));
    MOE_EXPECT_OK(moe_context_memory(ctx.get(), &held));
    EXPECT_GT(held, ws) << "a training step keeps more than an inference forward";
    m = memory_of(l.get());
    EXPECT_EQ(m.workspace, ws) << "the context holds the training step's buffers, not the layer";
    EXPECT_EQ(m.device_pool, 0u);
  }
}

TEST(Memory, StructSize) {
  const moe_test::LayerPtr l = moe_test::make_layer(moe_test::config(16, 16));
  ASSERT_TRUE(l);
  // A caller that knows the struct up to workspace: device_pool is neither written nor read.
  moe_memory m;
  std::memset(&m, 0xab, sizeof m);
  const size_t older = offsetof(moe_memory, device_pool);
  m.struct_size = older;
  ASSERT_EQ(moe_layer_memory(l.get(), &m), MOE_OK) << moe_last_error();
  EXPECT_EQ(m.struct_size, older);
  EXPECT_GT(m.parameters, 0u);
  size_t untouched;
  std::memset(&untouched, 0xab, sizeof untouched);
  EXPECT_EQ(m.device_pool, untouched);
  // Too small to hold anything, or a size that is no struct_size.
  for (size_t bad : {size_t{0}, sizeof(size_t) - 1, size_t{1} << 20}) {
    m.struct_size = bad;
    EXPECT_EQ(moe_layer_memory(l.get(), &m), MOE_ERR_INVALID_ARGUMENT) << bad;
    EXPECT_NE(std::strstr(moe_last_error(), "struct_size"), nullptr) << moe_last_error();
  }
  EXPECT_EQ(moe_layer_memory(nullptr, &m), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_layer_memory(l.get(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(moe_context_memory(nullptr, &untouched), MOE_ERR_INVALID_ARGUMENT);
}

}  // namespace
