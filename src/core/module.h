// The CUDA backend module, loaded with dlopen the first time a CUDA layer is made.
#pragma once
#include "core/backend.h"

namespace moe {

class Module {
 public:
  Module() = default;
  Module(Module &&o) noexcept : handle_(o.handle_) { o.handle_ = nullptr; }
  Module &operator=(Module &&o) noexcept;
  Module(const Module &) = delete;
  Module &operator=(const Module &) = delete;
  ~Module();

  // Loads libmoe_cuda and returns its table; throws MOE_ERR_UNSUPPORTED when it is absent.
  static Module load_cuda(const moe_backend_ops **ops);

 private:
  explicit Module(void *h) : handle_(h) {}
  void *handle_ = nullptr;
};

}  // namespace moe
