// R expert-parallel ranks as threads of one process: a moe_comm whose hooks exchange through
// shared memory, with hooks that can be told to fail (for the error-path tests).
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "moe/moe.h"

namespace ep_world {

struct World {
  explicit World(int n) : size(n), sync(n), send(n), send_counts(n), row_bytes(n) {}
  int size;
  std::barrier<> sync;
  std::vector<const char *> send;
  std::vector<const int64_t *> send_counts;
  std::vector<size_t> row_bytes;
  std::vector<int> fail_rows = std::vector<int>(8, 0), fail_counts = std::vector<int>(8, 0);
};

struct Rank {
  World *world;
  int rank;
};

inline moe_status counts_hook(void *user, const int64_t *send, int64_t *recv) {
  auto *r = static_cast<Rank *>(user);
  World &w = *r->world;
  if (w.fail_counts[r->rank] > 0) {
    --w.fail_counts[r->rank];
    return MOE_ERR_COMM;
  }
  w.send_counts[r->rank] = send;
  w.sync.arrive_and_wait();
  for (int q = 0; q < w.size; ++q) recv[q] = w.send_counts[q][r->rank];
  w.sync.arrive_and_wait();
  return MOE_OK;
}

inline moe_status rows_hook(void *user, const void *send, const int64_t *sc, void *recv, const int64_t *rc, size_t row_bytes,
                     void *) {
  auto *r = static_cast<Rank *>(user);
  World &w = *r->world;
  if (w.fail_rows[r->rank] > 0) {
    --w.fail_rows[r->rank];
    return MOE_ERR_COMM;
  }
  w.send[r->rank] = static_cast<const char *>(send);
  w.send_counts[r->rank] = sc;
  w.row_bytes[r->rank] = row_bytes;
  w.sync.arrive_and_wait();
  char *out = static_cast<char *>(recv);
  for (int q = 0; q < w.size; ++q) {
    const char *src = w.send[q];
    for (int p = 0; p < r->rank; ++p) src += w.send_counts[q][p] * row_bytes;
    if (w.send_counts[q][r->rank] != rc[q] || w.row_bytes[q] != row_bytes) std::abort();  // a libmoe bug
    std::memcpy(out, src, rc[q] * row_bytes);
    out += rc[q] * row_bytes;
  }
  w.sync.arrive_and_wait();
  return MOE_OK;
}

}  // namespace ep_world
