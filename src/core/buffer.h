// Backend memory owned RAII-style: freed through the backend that allocated it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>

#include "core/backend.h"

namespace moe {

class Backend;

class Buffer {
 public:
  Buffer() = default;
  Buffer(const Backend *be, void *p, size_t bytes) : be_(be), p_(p), bytes_(bytes) {}
  Buffer(Buffer &&o) noexcept { swap(o); }
  Buffer &operator=(Buffer &&o) noexcept {
    Buffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  ~Buffer();

  void swap(Buffer &o) noexcept {
    std::swap(be_, o.be_);
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
  }
  template <class T>
  T *as() const { return static_cast<T *>(p_); }
  void *get() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  const Backend *be_ = nullptr;
  void *p_ = nullptr;
  size_t bytes_ = 0;
};

// One backend instance (a table plus its state), owned by a layer.
class Backend {
 public:
  Backend(const moe_backend_ops *ops, const moe_config &cfg);
  ~Backend();
  Backend(const Backend &) = delete;
  Backend &operator=(const Backend &) = delete;

  const moe_backend_ops *ops() const { return ops_; }
  void *state() const { return state_; }

  // Throws moe::Error carrying the backend's message when status is not MOE_OK.
  void check(moe_status status, const char *stage) const;

  Buffer alloc(size_t bytes) const;
  // Grow-only reuse: keeps buf when it is large enough.
  void ensure(Buffer &buf, size_t bytes) const;
  // Device memory the backend holds (its `reserved` entry; 0 for a backend without one).
  size_t reserved() const;
  // Gives back to the device what the backend keeps but no buffer holds. Called when memory has
  // been freed for good: a context destroyed (always), or a call that replaced a buffer by a
  // larger one (only then: trimming waits for the stream). Never fails: a backend that cannot
  // trim keeps its memory.
  void trim(bool always) const noexcept;
  void zero(const Buffer &buf) const { zero(buf.get(), buf.bytes()); }
  void zero(void *p, size_t bytes) const;
  void upload(void *dst, const void *host, size_t bytes) const;
  void download(void *host, const void *src, size_t bytes) const;
  void copy(void *dst, const void *src, size_t bytes) const;

 private:
  const moe_backend_ops *ops_;
  void *state_ = nullptr;
  mutable bool replaced_ = false;  // ensure() freed a smaller buffer since the last trim
};

}  // namespace moe
