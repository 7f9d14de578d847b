// The CPU backend's table: host memory plus the stage files of this folder.
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/cpu.h"

namespace moe::cpu {
namespace {

constexpr size_t kAlign = 64;

moe_status create(const moe_config *, void **state) {
  try {
    *state = std::make_unique<State>().release();
    return MOE_OK;
  } catch (const std::bad_alloc &) {
    return MOE_ERR_OUT_OF_MEMORY;
  } catch (const Error &e) {  // oneDNN's engine or stream (cpu/gemm.cpp)
    return e.status();
  } catch (...) {
    return MOE_ERR_INTERNAL;
  }
}

void destroy(void *state) { std::unique_ptr<State> owned(static_cast<State *>(state)); }

const char *last_error(void *state) { return static_cast<State *>(state)->error.c_str(); }

moe_status set_stream(void *state, void *stream) {
  if (stream == nullptr) return MOE_OK;
  set_error(static_cast<State *>(state), "a CPU layer has no CUDA stream; pass NULL");
  return MOE_ERR_INVALID_ARGUMENT;
}

moe_status alloc(void *state, size_t bytes, void **out) {
  // Rounded up to the alignment (aligned_alloc's rule); a size that would wrap is refused.
  void *p = nullptr;
  if (bytes <= SIZE_MAX - kAlign) {
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    p = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
  }
  if (!p) {
    // A C table entry: nothing may propagate, not even bad_alloc from formatting the message.
    char msg[96];
    std::snprintf(msg, sizeof msg, "could not allocate %zu bytes of host memory", bytes);
    set_error(static_cast<State *>(state), msg);
    return MOE_ERR_OUT_OF_MEMORY;
  }
  *out = p;
  return MOE_OK;
}

void release(void *, void *p) { std::free(p); }

moe_status memset_zero(void *, void *p, size_t bytes) {
  if (bytes) std::memset(p, 0, bytes);
  return MOE_OK;
}

moe_status copy(void *, void *dst, const void *src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
  return MOE_OK;
}

// A device pointer handed to a CPU layer would fault on first touch. Any process holding CUDA
// memory has the driver loaded; then the driver says what the pointer is. Without the driver
// there is no device memory, and libmoe.so itself never loads CUDA.
moe_status check_pointer(void *state, const void *p) {
  void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!driver) return MOE_OK;
  using Query = int (*)(void *value, int attribute, unsigned long long ptr);
  const auto query = reinterpret_cast<Query>(dlsym(driver, "cuPointerGetAttribute"));
  constexpr int kMemoryType = 2, kIsManaged = 8, kDeviceMemory = 2;  // CU_POINTER_ATTRIBUTE_*, CU_MEMORYTYPE_DEVICE
  unsigned int type = 0, managed = 0;
  const auto addr = static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p));
  // Host memory the driver does not know makes the query fail: that is the good case.
  const bool device = query && query(&type, kMemoryType, addr) == 0 && type == kDeviceMemory &&
                      !(query(&managed, kIsManaged, addr) == 0 && managed);
  dlclose(driver);
  if (!device) return MOE_OK;
  char msg[96];
  std::snprintf(msg, sizeof msg, "%p is CUDA device memory; a CPU layer needs host memory", p);
  set_error(static_cast<State *>(state), msg);
  return MOE_ERR_INVALID_ARGUMENT;
}

moe_status synchronize(void *) { return MOE_OK; }

void *no_stream(void *) { return nullptr; }

const moe_backend_ops kOps = {
    MOE_BACKEND_ABI, "cpu", create, destroy, last_error, set_stream, alloc, release, memset_zero, copy, copy, copy,
    check_pointer, find_nonfinite, convert, synchronize,
    gate, select, plan, dispatch, expert_ffn, combine, shared_combine,
    shared_combine_bwd, combine_bwd, expert_ffn_bwd, dispatch_bwd, select_bwd, gate_bwd, no_stream,
    nullptr,  // reserved: the CPU backend keeps no memory of its own
};

}  // namespace
}  // namespace moe::cpu

extern "C" const moe_backend_ops *moe_cpu_backend(void) { return &moe::cpu::kOps; }
