// A CUDA layer that cannot be made (no module, or no usable device) loads the CUDA module at most
// once per process: later attempts fail the same way without searching and loading it again.
// dlopen is interposed by this executable (libmoe.so's calls resolve to it first) to count the
// attempts on libmoe_cuda.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <atomic>
#include <cstring>
#include <string>

namespace {
std::atomic<int> module_opens{0};
}

extern "C" void *dlopen(const char *file, int mode) {
  using Fn = void *(*)(const char *, int);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "dlopen"));
  if (file && std::strstr(file, "libmoe_cuda")) ++module_opens;
  return real(file, mode);
}

namespace {

moe_status create_cuda(std::string &message) {
  moe_config c;
  moe_config_init(&c);
  c.d_model = 8;
  c.d_ff = 8;
  c.device = MOE_DEVICE_CUDA;
  moe_layer *layer = nullptr;
  const moe_status s = moe_layer_create(&c, &layer);
  message = moe_last_error();
  moe_layer_destroy(layer);
  return s;
}

TEST(ModuleLoad, AFailedCudaCreateIsNotRetriedFromScratch) {
  std::string first, again;
  const moe_status s = create_cuda(first);
  if (s == MOE_OK) GTEST_SKIP() << "a CUDA device is usable here: the failure path cannot be exercised";
  ASSERT_TRUE(s == MOE_ERR_UNSUPPORTED || s == MOE_ERR_DEVICE) << moe_status_name(s) << ": " << first;
  const int opens = module_opens.load();
  EXPECT_GE(opens, 1) << "the first CUDA create should have looked for libmoe_cuda";
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(create_cuda(again), s);
    EXPECT_EQ(again, first);
  }
  EXPECT_EQ(module_opens.load(), opens) << "later CUDA creates searched for and loaded the module again";
}

}  // namespace
