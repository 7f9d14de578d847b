#include "core/module.h"

#include <dlfcn.h>

#include <string>

#include "core/error.h"

namespace moe {
namespace {

// What the one load attempt of this process found: the table, or why there is none. Built once
// (a function-local static) and never changed afterwards.
struct Loaded {
  const moe_backend_ops *ops = nullptr;
  moe_status status = MOE_OK;
  std::string reason;
};

// Looks beside libmoe.so first (a build tree or a private prefix), then the loader's path. The
// handle is never closed: the module lives as long as the process.
Loaded load() {
  Loaded out;
  std::string tried;
  void *h = nullptr;
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&cuda_backend_ops), &info) && info.dli_fname) {
    std::string self = info.dli_fname;
    auto slash = self.rfind('/');
    if (slash != std::string::npos) {
      std::string path = self.substr(0, slash + 1) + "libmoe_cuda.so.0";
      h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) tried = dlerror();
    }
  }
  if (!h) {
    h = dlopen("libmoe_cuda.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char *e = dlerror();
      out.status = MOE_ERR_UNSUPPORTED;
      out.reason = std::string("cfg->device is MOE_DEVICE_CUDA but the CUDA module libmoe_cuda.so.0 could not be loaded (") +
                   (e ? e : tried.c_str()) + "); install libmoe-cuda0 or build with -DMOE_WITH_CUDA=ON";
      return out;
    }
  }
  auto entry = reinterpret_cast<moe_backend_entry_fn>(dlsym(h, MOE_CUDA_BACKEND_ENTRY));
  const moe_backend_ops *t = entry ? entry(MOE_BACKEND_ABI) : nullptr;
  if (!entry) {
    out.reason = std::string("libmoe_cuda.so.0 has no ") + MOE_CUDA_BACKEND_ENTRY + ": it does not belong to this libmoe";
  } else if (!t || t->abi != MOE_BACKEND_ABI) {
    out.reason = "libmoe_cuda.so.0 speaks backend ABI " + std::to_string(t ? t->abi : 0u) + ", this libmoe needs " +
                 std::to_string(static_cast<unsigned>(MOE_BACKEND_ABI));
  } else {
    out.ops = t;
    return out;
  }
  out.status = MOE_ERR_UNSUPPORTED;
  dlclose(h);
  return out;
}

}  // namespace

const moe_backend_ops *cuda_backend_ops() {
  static const Loaded loaded = load();
  if (!loaded.ops) fail(loaded.status, "%s", loaded.reason.c_str());
  return loaded.ops;
}

}  // namespace moe
