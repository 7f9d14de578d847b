// The CPU backend's table: host memory plus the stage files of this folder.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <climits>
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
// Buffers from kHugeFrom bytes on (expert weights, their gradients, a context's activations) are
// aligned to and rounded up to 2 MB pages, and asked to be backed by transparent huge pages
// (Linux's default, "madvise", gives them only on request). The forward streams every weight
// once; on 4 KB pages each 4 KB row of a weight costs a TLB miss: one 2048 x 1024 float32 weight
// against 8 to 16 rows, 2 cores of an AMD EPYC Zen 4, 0.35 -> 0.29 ms and 0.52 -> 0.43-0.48 ms.
// Where huge pages are off, madvise fails and nothing else changes.
constexpr size_t kHugePage = size_t{2} << 20, kHugeFrom = size_t{8} << 20;

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
  const size_t align = bytes >= kHugeFrom ? kHugePage : kAlign;
  if (bytes <= SIZE_MAX - align) {
    const size_t rounded = (bytes + align - 1) / align * align;
    p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
#ifdef MADV_HUGEPAGE
    if (p && align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);
#endif
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

// The path of the CUDA driver (libcuda.so*) if the process has loaded it, into path; false if not.
// Looked up among the loaded objects, not with dlopen(RTLD_NOLOAD): for a name that is not loaded
// that maps and unmaps the loader's cache, and the unmapping interrupts every core the process
// runs on, twice a forward (x and y checked; 0.08 ms of a 0.5 ms bfloat16 forward of one token,
// d 1024, d_ff 2048, 2 cores of an AMD EPYC Zen 4).
bool loaded_driver(char (&path)[PATH_MAX]) {
  path[0] = '\0';
  dl_iterate_phdr(
      [](dl_phdr_info *info, size_t, void *out) {
        const char *name = info->dlpi_name, *slash = std::strrchr(name, '/');
        const char *base = slash ? slash + 1 : name;
        if (std::strncmp(base, "libcuda.so", 10) != 0 || std::strlen(name) >= PATH_MAX) return 0;
        std::strcpy(static_cast<char *>(out), name);
        return 1;
      },
      path);
  return path[0] != '\0';
}

// A device pointer handed to a CPU layer would fault on first touch. Any process holding CUDA
// memory has the driver loaded; then the driver says what the pointer is. Without the driver
// there is no device memory, and libmoe.so itself never loads CUDA.
moe_status check_pointer(void *state, const void *p) {
  char path[PATH_MAX];
  if (!loaded_driver(path)) return MOE_OK;
  void *driver = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
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
