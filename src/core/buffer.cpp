#include "core/buffer.h"

#include <string>

#include "core/error.h"

namespace moe {

Buffer::~Buffer() {
  if (p_) be_->ops()->free(be_->state(), p_);
}

Backend::Backend(const moe_backend_ops *ops, const moe_config &cfg) : ops_(ops) {
  moe_status s = ops_->create(&cfg, &state_);
  if (s != MOE_OK) {
    // A backend may hand back a state that only carries the reason (see backend.h).
    std::string why = state_ ? ops_->last_error(state_) : "";
    if (state_) ops_->destroy(state_);
    state_ = nullptr;
    if (why.empty()) fail(s, "could not initialise the %s backend", ops_->name);
    fail(s, "could not initialise the %s backend: %s", ops_->name, why.c_str());
  }
}

Backend::~Backend() {
  if (state_) ops_->destroy(state_);
}

void Backend::check(moe_status status, const char *stage) const {
  if (status != MOE_OK) fail(status, "%s backend, %s: %s", ops_->name, stage, ops_->last_error(state_));
}

Buffer Backend::alloc(size_t bytes) const {
  void *p = nullptr;
  check(ops_->alloc(state_, bytes, &p), "alloc");
  return Buffer(this, p, bytes);
}

void Backend::ensure(Buffer &buf, size_t bytes) const {
  if (buf.get() && buf.bytes() >= bytes) return;
  Buffer fresh = alloc(bytes);
  replaced_ = replaced_ || buf.get() != nullptr;
  buf = std::move(fresh);
}

size_t Backend::reserved() const {
  size_t bytes = 0;
  if (ops_->reserved) check(ops_->reserved(state_, 0, &bytes), "reserved");
  return bytes;
}

void Backend::trim(bool always) const noexcept {
  if (!ops_->reserved || !(always || replaced_)) return;
  size_t bytes = 0;
  if (ops_->reserved(state_, 1, &bytes) == MOE_OK) replaced_ = false;
}

void Backend::zero(void *p, size_t bytes) const { check(ops_->memset_zero(state_, p, bytes), "memset"); }

void Backend::upload(void *dst, const void *host, size_t bytes) const {
  check(ops_->upload(state_, dst, host, bytes), "upload");
}

void Backend::download(void *host, const void *src, size_t bytes) const {
  check(ops_->download(state_, host, src, bytes), "download");
}

void Backend::copy(void *dst, const void *src, size_t bytes) const {
  check(ops_->copy(state_, dst, src, bytes), "copy");
}

}  // namespace moe
