// An in-process moe_comm for moe-bench --ep-ranks: the R ranks are threads of this process that
// meet at a barrier in every hook and copy their rows into each other's buffers. The hooks count
// what each rank sends, split into bytes for other ranks (what a network would carry) and bytes
// for itself, per phase (forward, backward) as the rank's thread declares it.
#pragma once
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include <moe/moe.h>

namespace moe_bench {

enum class Phase { kForward = 0, kBackward = 1, kUntracked = 2 };

// Bytes one rank sent during one phase.
struct Traffic {
  // Token rows: calls whose rows are activation rows (row_bytes = d_model x an element size).
  uint64_t rows_remote = 0, rows_self = 0;
  // Everything else the layer exchanges: per-expert counts and the routing statistics that make
  // the aux losses global (exchange_counts, and exchange_rows calls with other row widths).
  uint64_t meta_remote = 0, meta_self = 0;
  size_t row_bytes = 0;  // width of the token rows seen; 0: none
};

class InProcessWorld {
 public:
  // copy moves bytes between two ranks' buffers (memcpy, or cudaMemcpy for device memory);
  // after_copies runs on each rank once its copies are issued, before the others may reuse their
  // send buffers (a device synchronisation for CUDA layers). element_sizes: the widths (bytes per
  // value) that make a row of d_model values a token row.
  InProcessWorld(int ranks, int64_t d_model, std::vector<size_t> element_sizes,
                 std::function<void(void *, const void *, size_t)> copy, std::function<void()> after_copies);
  InProcessWorld(const InProcessWorld &) = delete;
  InProcessWorld &operator=(const InProcessWorld &) = delete;

  int size() const { return size_; }
  const moe_comm *comm(int rank) const { return &ranks_[rank].comm; }
  // Called by rank's own thread: later hook calls of that rank count towards phase p.
  void set_phase(int rank, Phase p) { ranks_[rank].phase = p; }
  const Traffic &traffic(int rank, Phase p) const { return ranks_[rank].traffic[static_cast<int>(p)]; }
  void reset_traffic();
  // The rank threads' own meeting point (the bench's timing uses it).
  void arrive_and_wait() { sync_.arrive_and_wait(); }

 private:
  struct Rank {
    InProcessWorld *world = nullptr;
    int rank = 0;
    moe_comm comm{};
    Phase phase = Phase::kUntracked;
    Traffic traffic[3];
    // what this rank offers in the current hook call
    const unsigned char *send = nullptr;
    const int64_t *send_counts = nullptr;
    size_t row_bytes = 0;
  };
  static moe_status counts_hook(void *user, const int64_t *send, int64_t *recv);
  static moe_status rows_hook(void *user, const void *send, const int64_t *send_counts, void *recv,
                              const int64_t *recv_counts, size_t row_bytes, void *stream);
  bool is_token_row(size_t row_bytes) const;

  int size_;
  int64_t d_model_;
  std::vector<size_t> element_sizes_;
  std::function<void(void *, const void *, size_t)> copy_;
  std::function<void()> after_copies_;
  std::barrier<> sync_;
  std::vector<Rank> ranks_;
};

}  // namespace moe_bench
