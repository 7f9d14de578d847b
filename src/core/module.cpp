#include "core/module.h"

#include <dlfcn.h>

#include <string>

#include "core/error.h"

namespace moe {

Module &Module::operator=(Module &&o) noexcept {
  if (this != &o) {
    if (handle_) dlclose(handle_);
    handle_ = o.handle_;
    o.handle_ = nullptr;
  }
  return *this;
}

Module::~Module() {
  if (handle_) dlclose(handle_);
}

// Looks beside libmoe.so first (a build tree or a private prefix), then the loader's path.
Module Module::load_cuda(const moe_backend_ops **ops) {
  std::string tried;
  void *h = nullptr;
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&Module::load_cuda), &info) && info.dli_fname) {
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
      fail(MOE_ERR_UNSUPPORTED,
           "cfg->device is MOE_DEVICE_CUDA but the CUDA module libmoe_cuda.so.0 could not be loaded (%s); "
           "install libmoe-cuda0 or build with -DMOE_WITH_CUDA=ON",
           e ? e : tried.c_str());
    }
  }
  Module m(h);
  auto entry = reinterpret_cast<moe_backend_entry_fn>(dlsym(h, MOE_CUDA_BACKEND_ENTRY));
  if (!entry)
    fail(MOE_ERR_UNSUPPORTED, "libmoe_cuda.so.0 has no %s: it does not belong to this libmoe", MOE_CUDA_BACKEND_ENTRY);
  const moe_backend_ops *t = entry(MOE_BACKEND_ABI);
  if (!t || t->abi != MOE_BACKEND_ABI)
    fail(MOE_ERR_UNSUPPORTED, "libmoe_cuda.so.0 speaks backend ABI %u, this libmoe needs %u", t ? t->abi : 0u,
         (unsigned)MOE_BACKEND_ABI);
  *ops = t;
  return m;
}

}  // namespace moe
