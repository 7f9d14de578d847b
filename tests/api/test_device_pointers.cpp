// A CPU layer refuses CUDA device memory (MOE_ERR_INVALID_ARGUMENT, naming the tensor, nothing
// changed) and takes managed memory, asking the CUDA driver only where the process has loaded
// it: here a stand-in driver (fake_cuda_driver.c) that calls one marked range device memory.
// Without a driver loaded, a forward never looks for one with dlopen, and a forward after the
// first calls no dlopen at all (dlopen is interposed by this executable: libmoe.so's calls
// resolve to it first); looking for the driver with dlopen cost a mapping of the loader's cache
// and interrupted every core, for each tensor of each call. (The first forward may see oneDNN
// open its profiler's library once, as it compiles its first kernel: libJitPI.so, on AVX2 CPUs.)
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <moe/moe.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "support/layer.h"
#include "support/random.h"

namespace {
std::atomic<int> opens{0};
std::mutex opened_mutex;
std::vector<std::string> opened;  // the files asked for, in order
}

extern "C" void *dlopen(const char *file, int mode) {
  using Fn = void *(*)(const char *, int);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "dlopen"));
  ++opens;
  {
    const std::lock_guard<std::mutex> lock(opened_mutex);
    opened.emplace_back(file ? file : "(the executable)");
  }
  return real(file, mode);
}

namespace {

constexpr int64_t kD = 16, kT = 5;

TEST(DevicePointers, AskTheDriverOnlyWhereLoadedAndRefuseDeviceMemory) {
  const moe_test::LayerPtr layer = moe_test::make_layer(moe_test::config(kD, 32, 4, 2, 7));
  ASSERT_TRUE(layer);
  const std::vector<float> x = moe_test::inputs(kT * kD, 11);
  std::vector<float> y(kT * kD), again(kT * kD);

  // No driver loaded: no search for one, whatever the calls; after the first, no dlopen at all.
  const size_t first = opened.size();
  MOE_EXPECT_OK(moe_forward(layer.get(), x.data(), kT, y.data(), nullptr));
  for (size_t i = first; i < opened.size(); ++i)
    EXPECT_EQ(opened[i].find("cuda"), std::string::npos) << "the first forward searched for " << opened[i];
  const int before = opens.load();
  for (int i = 0; i < 3; ++i) MOE_EXPECT_OK(moe_forward(layer.get(), x.data(), kT, y.data(), nullptr));
  EXPECT_EQ(opens.load() - before, 0) << "a forward searched for a library";

  void *driver = dlopen(MOE_TEST_FAKE_DRIVER, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(driver, nullptr) << dlerror();
  using Mark = void (*)(const void *, size_t, int);
  const auto mark = reinterpret_cast<Mark>(dlsym(driver, "fake_driver_mark"));
  ASSERT_NE(mark, nullptr);

  // Host memory the driver does not know: taken, the same result.
  MOE_EXPECT_OK(moe_forward(layer.get(), x.data(), kT, again.data(), nullptr));
  EXPECT_EQ(again, y);

  // x "on the device": refused, naming x, y untouched; then y.
  std::vector<float> out(kT * kD, 7.0f);
  mark(x.data(), x.size() * sizeof(float), 0);
  EXPECT_EQ(moe_forward(layer.get(), x.data(), kT, out.data(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  std::string msg = moe_last_error();
  EXPECT_NE(msg.find("x:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("CUDA device memory"), std::string::npos) << msg;
  EXPECT_EQ(out, std::vector<float>(kT * kD, 7.0f)) << "a refused call wrote y";
  mark(out.data(), out.size() * sizeof(float), 0);
  EXPECT_EQ(moe_forward(layer.get(), x.data(), kT, out.data(), nullptr), MOE_ERR_INVALID_ARGUMENT);
  msg = moe_last_error();
  EXPECT_NE(msg.find("y:"), std::string::npos) << msg;
  EXPECT_EQ(out, std::vector<float>(kT * kD, 7.0f)) << "a refused call wrote y";

  // Managed memory is host-accessible: taken.
  mark(x.data(), x.size() * sizeof(float), 1);
  MOE_EXPECT_OK(moe_forward(layer.get(), x.data(), kT, out.data(), nullptr));
  EXPECT_EQ(out, y);

  // The layer is still usable once the pointers are host memory again.
  mark(nullptr, 0, 0);
  MOE_EXPECT_OK(moe_forward(layer.get(), x.data(), kT, again.data(), nullptr));
  EXPECT_EQ(again, y);
  dlclose(driver);
}

}  // namespace
