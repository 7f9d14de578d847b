// Carves several typed arrays out of one grow-only scratch allocation: one ensure per call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/cuda.h"

namespace moe::cuda {

class ScratchPlan {
 public:
  // Reserves n elements of T; returns the handle to read the pointer with after commit().
  template <class T>
  size_t add(int64_t n, const char *what) {
    offsets_.push_back(total_);
    total_ += (checked_bytes(n, sizeof(T), what) + 255) / 256 * 256;
    return offsets_.size() - 1;
  }
  void commit(DeviceMemory &mem, State &st) {
    mem.ensure(total_ ? total_ : 256, st);
    base_ = mem.as<char>();
  }
  template <class T>
  T *get(size_t handle) const { return reinterpret_cast<T *>(base_ + offsets_[handle]); }

 private:
  std::vector<size_t> offsets_;
  size_t total_ = 0;
  char *base_ = nullptr;
};

}  // namespace moe::cuda
