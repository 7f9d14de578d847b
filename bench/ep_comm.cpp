#include "ep_comm.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace moe_bench {

InProcessWorld::InProcessWorld(int ranks, int64_t d_model, std::vector<size_t> element_sizes,
                               std::function<void(void *, const void *, size_t)> copy,
                               std::function<void()> after_copies)
    : size_(ranks),
      d_model_(d_model),
      element_sizes_(std::move(element_sizes)),
      copy_(std::move(copy)),
      after_copies_(std::move(after_copies)),
      sync_(ranks),
      ranks_(static_cast<size_t>(ranks)) {
  for (int r = 0; r < ranks; ++r) {
    Rank &k = ranks_[r];
    k.world = this;
    k.rank = r;
    k.comm = moe_comm{sizeof(moe_comm), ranks, r, &k, counts_hook, rows_hook, nullptr};
  }
}

void InProcessWorld::reset_traffic() {
  for (Rank &k : ranks_)
    for (Traffic &t : k.traffic) t = Traffic{};
}

bool InProcessWorld::is_token_row(size_t row_bytes) const {
  return std::any_of(element_sizes_.begin(), element_sizes_.end(),
                     [&](size_t es) { return row_bytes == static_cast<size_t>(d_model_) * es; });
}

moe_status InProcessWorld::counts_hook(void *user, const int64_t *send, int64_t *recv) {
  Rank &me = *static_cast<Rank *>(user);
  InProcessWorld &w = *me.world;
  me.send_counts = send;
  w.sync_.arrive_and_wait();
  for (int q = 0; q < w.size_; ++q) recv[q] = w.ranks_[q].send_counts[me.rank];
  Traffic &t = me.traffic[static_cast<int>(me.phase)];
  t.meta_remote += static_cast<uint64_t>(w.size_ - 1) * sizeof(int64_t);
  t.meta_self += sizeof(int64_t);
  w.sync_.arrive_and_wait();  // the peers read our send array until here
  return MOE_OK;
}

moe_status InProcessWorld::rows_hook(void *user, const void *send, const int64_t *send_counts, void *recv,
                                     const int64_t *recv_counts, size_t row_bytes, void *) {
  Rank &me = *static_cast<Rank *>(user);
  InProcessWorld &w = *me.world;
  me.send = static_cast<const unsigned char *>(send);
  me.send_counts = send_counts;
  me.row_bytes = row_bytes;
  w.sync_.arrive_and_wait();
  // Pull: rank q's rows for us start after those it sends to ranks 0..me-1.
  auto *out = static_cast<unsigned char *>(recv);
  for (int q = 0; q < w.size_; ++q) {
    const Rank &peer = w.ranks_[q];
    if (peer.send_counts[me.rank] != recv_counts[q] || peer.row_bytes != row_bytes) {
      // The layers disagree about a collective: a libmoe bug, and the ranks cannot recover.
      std::fprintf(stderr, "moe-bench: rank %d expects %lld rows of %zu bytes from rank %d, which sends %lld of %zu\n",
                   me.rank, (long long)recv_counts[q], row_bytes, q, (long long)peer.send_counts[me.rank],
                   peer.row_bytes);
      std::abort();
    }
    const unsigned char *src = peer.send;
    for (int p = 0; p < me.rank; ++p) src += static_cast<size_t>(peer.send_counts[p]) * row_bytes;
    const size_t n = static_cast<size_t>(recv_counts[q]) * row_bytes;
    if (n) w.copy_(out, src, n);
    out += n;
  }
  if (w.after_copies_) w.after_copies_();
  Traffic &t = me.traffic[static_cast<int>(me.phase)];
  const bool token = w.is_token_row(row_bytes);
  for (int q = 0; q < w.size_; ++q) {
    const uint64_t bytes = static_cast<uint64_t>(send_counts[q]) * row_bytes;
    (q == me.rank ? (token ? t.rows_self : t.meta_self) : (token ? t.rows_remote : t.meta_remote)) += bytes;
  }
  if (token) t.row_bytes = row_bytes;
  w.sync_.arrive_and_wait();  // the peers read our send buffer until here
  return MOE_OK;
}

}  // namespace moe_bench
