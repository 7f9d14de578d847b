#include "core/exchange.h"

#include <climits>
#include <cstddef>
#include <cstring>

#include "core/checked.h"
#include "core/half.h"

namespace moe {
namespace {

// The comm's text is not ours: a runaway string must not make the error message unbounded.
constexpr size_t kMaxReason = 1024;

// The comm's reason for the failure of the hook that just returned, or NULL. last_error lies past
// the end of a comm built against an older moe.h, so struct_size decides whether it exists.
const char *comm_reason(const moe_comm &c) {
  if (c.struct_size < offsetof(moe_comm, last_error) + sizeof c.last_error || !c.last_error) return nullptr;
  const char *why = c.last_error(c.user);
  return why && *why ? why : nullptr;
}

void check_hook(const moe_comm &c, moe_status s, const char *hook) {
  if (s == MOE_OK) return;
  const char *why = comm_reason(c);
  if (!why) fail(MOE_ERR_COMM, "comm->%s returned %s", hook, moe_status_name(s));
  size_t n = strnlen(why, kMaxReason + 1);
  const bool cut = n > kMaxReason;
  if (cut) {
    n = kMaxReason;
    // Never split a UTF-8 sequence: back up to the start of the character at the cut.
    while (n > 0 && (static_cast<unsigned char>(why[n]) & 0xC0) == 0x80) --n;
  }
  fail(MOE_ERR_COMM, "comm->%s returned %s: %.*s%s", hook, moe_status_name(s), static_cast<int>(n), why,
       cut ? "..." : "");
}

const moe_comm &comm_of(const moe_layer &l) { return *l.cfg.c.comm; }

// A count that came from another rank, as a double: refused unless it is a whole number in
// [0, 2^53] (converting anything else to an integer is undefined behaviour).
int64_t count_from_peer(double v, const char *what) {
  if (!(v >= 0.0 && v <= 9007199254740992.0) || v != static_cast<double>(static_cast<int64_t>(v)))
    fail(MOE_ERR_COMM, "the ranks' routing statistics give %s = %g, not a count", what, v);
  return static_cast<int64_t>(v);
}

// All-to-all of host data through exchange_rows, staged through the layer's device memory.
void alltoall_host(moe_layer &l, const void *send, const std::vector<int64_t> &send_counts, void *recv,
                   const std::vector<int64_t> &recv_counts, size_t row_bytes, void *stream) {
  const Backend &be = *l.backend;
  int64_t ns = 0, nr = 0;
  for (int64_t v : send_counts) ns = checked_add(ns, v, "exchange rows");
  for (int64_t v : recv_counts) nr = checked_add(nr, v, "exchange rows");
  const size_t send_bytes = checked_bytes(ns, row_bytes, "exchange"),
               recv_bytes = checked_bytes(nr, row_bytes, "exchange");
  Buffer s = be.alloc(send_bytes);
  Buffer rbuf = be.alloc(recv_bytes);
  be.upload(s.get(), send, send_bytes);
  const moe_comm &c = comm_of(l);
  be.check(be.ops()->synchronize(be.state()), "synchronize");
  const moe_status st = c.exchange_rows(c.user, s.get(), send_counts.data(), rbuf.get(), recv_counts.data(), row_bytes,
                                        stream ? stream : be.ops()->stream(be.state()));
  check_hook(c, st, "exchange_rows");
  be.download(recv, rbuf.get(), recv_bytes);
}

}  // namespace

void exchange_routing_stats(moe_layer &l, RoutingSummary &r) {
  const Config &c = l.cfg;
  const int R = c.ranks;
  const int64_t E = c.E;
  // One row per rank: T, lse_sq_sum, then counts, prob_sum, weight_sum, load_sum, kept (doubles:
  // exact for counts below 2^53).
  const int64_t width = checked_add(2, checked_mul(5, E, "routing statistics"), "routing statistics");
  std::vector<double> mine(width, 0.0);
  mine[0] = static_cast<double>(r.T);
  mine[1] = r.lse_sq_sum;
  for (int64_t e = 0; e < E; ++e) {
    mine[2 + e] = static_cast<double>(r.counts[e]);
    mine[2 + E + e] = r.prob_sum[e];
    mine[2 + 2 * E + e] = r.weight_sum[e];
    mine[2 + 3 * E + e] = r.load_sum.empty() ? 0.0 : r.load_sum[e];
    mine[2 + 4 * E + e] = static_cast<double>(r.kept[e]);
  }
  std::vector<double> send(static_cast<size_t>(checked_mul(width, R, "routing statistics"))),
      recv(static_cast<size_t>(checked_mul(width, R, "routing statistics")));
  for (int q = 0; q < R; ++q) std::memcpy(&send[static_cast<size_t>(q) * width], mine.data(), width * sizeof(double));
  std::vector<int64_t> ones(R, 1);
  alltoall_host(l, send.data(), ones, recv.data(), ones, checked_bytes(width, sizeof(double), "routing statistics"),
                nullptr);
  // Summed in rank order: every rank gets the same bits.
  std::vector<double> total(width, 0.0);
  for (int q = 0; q < R; ++q)
    for (int64_t i = 0; i < width; ++i) total[i] += recv[static_cast<size_t>(q) * width + i];
  r.global_T = count_from_peer(total[0], "num_tokens");
  r.lse_sq_sum = total[1];
  for (int64_t e = 0; e < E; ++e) {
    r.counts[e] = count_from_peer(total[2 + e], "an expert's slot count");
    r.prob_sum[e] = total[2 + E + e];
    r.weight_sum[e] = total[2 + 2 * E + e];
    if (!r.load_sum.empty()) r.load_sum[e] = total[2 + 3 * E + e];
    r.global_kept[e] = count_from_peer(total[2 + 4 * E + e], "an expert's kept count");
  }
}

ExchangePlan plan_exchange(moe_layer &l, Workspace &w, const RoutingSummary &r) {
  const Config &c = l.cfg;
  const int R = c.ranks;
  const int64_t El = c.E_local;
  ExchangePlan p;
  p.send_counts.assign(R, 0);
  p.recv_counts.assign(R, 0);
  for (int q = 0; q < R; ++q) p.send_counts[q] = r.offsets[(q + 1) * El] - r.offsets[q * El];
  const moe_comm &cm = comm_of(l);
  check_hook(cm, cm.exchange_counts(cm.user, p.send_counts.data(), p.recv_counts.data()), "exchange_counts");
  for (int q = 0; q < R; ++q)
    if (p.recv_counts[q] < 0)
      fail(MOE_ERR_COMM, "comm->exchange_counts gave %lld rows from rank %d", (long long)p.recv_counts[q], q);
  // Per-expert counts from every source rank, so received rows can be put in expert order.
  const size_t n_re = static_cast<size_t>(checked_mul(R, El, "ranks * local experts"));
  std::vector<int64_t> send(n_re), recv(n_re);
  for (int q = 0; q < R; ++q)
    for (int64_t e = 0; e < El; ++e) send[static_cast<size_t>(q) * El + e] = r.kept[q * El + e];
  std::vector<int64_t> ones(R, 1);
  alltoall_host(l, send.data(), ones, recv.data(), ones, checked_bytes(El, sizeof(int64_t), "expert counts"), nullptr);
  p.local_offsets.assign(El + 1, 0);
  // Counts from other ranks are checked before they size or index anything.
  for (int q = 0; q < R; ++q) {
    int64_t sum = 0;
    for (int64_t e = 0; e < El; ++e) {
      const int64_t v = recv[static_cast<size_t>(q) * El + e];
      if (v < 0 || v > INT32_MAX)
        fail(MOE_ERR_COMM, "rank %d announced %lld rows for local expert %lld", q, (long long)v, (long long)e);
      sum += v;  // at most El * 2^31: no overflow
    }
    if (sum != p.recv_counts[q])
      fail(MOE_ERR_COMM, "rank %d announced %lld rows but %lld by expert", q, (long long)p.recv_counts[q],
           (long long)sum);
    p.recv_rows += sum;
    if (p.recv_rows > INT32_MAX)
      fail(MOE_ERR_COMM, "the ranks send %lld rows to this rank; rows are indexed by int32", (long long)p.recv_rows);
  }
  for (int64_t e = 0; e < El; ++e) {
    int64_t n = 0;
    for (int q = 0; q < R; ++q) n += recv[static_cast<size_t>(q) * El + e];
    p.local_offsets[e + 1] = p.local_offsets[e] + n;
  }
  // perm[i]: the received (source-major) row that goes to expert-major position i.
  std::vector<int32_t> perm(static_cast<size_t>(p.recv_rows)), inv(static_cast<size_t>(p.recv_rows));
  std::vector<int64_t> fill(p.local_offsets.begin(), p.local_offsets.end() - 1);
  int64_t src = 0;
  for (int q = 0; q < R; ++q)
    for (int64_t e = 0; e < El; ++e)
      for (int64_t j = 0; j < recv[static_cast<size_t>(q) * El + e]; ++j, ++src) {
        perm[fill[e]] = static_cast<int32_t>(src);
        inv[src] = static_cast<int32_t>(fill[e]++);
      }
  const Backend &be = *l.backend;
  be.ensure(w.ep_perm, checked_bytes(p.recv_rows, sizeof(int32_t), "exchange permutation"));
  be.ensure(w.ep_inv, checked_bytes(p.recv_rows, sizeof(int32_t), "exchange permutation"));
  be.upload(w.ep_perm.get(), perm.data(), perm.size() * sizeof(int32_t));
  be.upload(w.ep_inv.get(), inv.data(), inv.size() * sizeof(int32_t));
  return p;
}

namespace {

// dst[i] = src[index[i]] over n rows of width elements, with the backend's dispatch (a row gather).
void gather(const Backend &be, int dtype, const void *src, const Buffer &index, void *dst, int64_t n, int64_t width) {
  moe_rows_args a{};
  a.d = width;
  a.R = n;
  a.dtype = dtype;
  a.row_token = index.as<const int32_t>();
  a.x = src;
  a.xe = dst;
  be.check(be.ops()->dispatch(be.state(), &a), "dispatch (exchange permutation)");
}

void rows_hook(moe_layer &l, const void *send, const std::vector<int64_t> &sc, void *recv,
               const std::vector<int64_t> &rc, int64_t width) {
  const moe_comm &cm = comm_of(l);
  const Backend &be = *l.backend;
  be.check(be.ops()->synchronize(be.state()), "synchronize");
  // On the layer's stream: a device-side comm (NCCL) queues its transfers behind the rows.
  const moe_status st =
      cm.exchange_rows(cm.user, send, sc.data(), recv, rc.data(),
                       static_cast<size_t>(width) * dtype_size(l.cfg.c.dtype), be.ops()->stream(be.state()));
  check_hook(cm, st, "exchange_rows");
}

size_t stage_bytes(const moe_layer &l, const ExchangePlan &p, int64_t width) {
  return checked_bytes(checked_mul(p.recv_rows, width, "exchange rows"), dtype_size(l.cfg.c.dtype), "exchange");
}

}  // namespace

void exchange_to_experts(moe_layer &l, Workspace &w, const ExchangePlan &p, const void *rows, void *local,
                         int64_t width) {
  const Backend &be = *l.backend;
  be.ensure(w.ep_stage, stage_bytes(l, p, width));
  rows_hook(l, rows, p.send_counts, w.ep_stage.get(), p.recv_counts, width);
  gather(be, l.cfg.c.dtype, w.ep_stage.get(), w.ep_perm, local, p.recv_rows, width);
}

void exchange_from_experts(moe_layer &l, Workspace &w, const ExchangePlan &p, const void *local, void *rows,
                           int64_t width) {
  const Backend &be = *l.backend;
  be.ensure(w.ep_stage, stage_bytes(l, p, width));
  gather(be, l.cfg.c.dtype, local, w.ep_inv, w.ep_stage.get(), p.recv_rows, width);
  rows_hook(l, w.ep_stage.get(), p.recv_counts, rows, p.send_counts, width);
}

}  // namespace moe
