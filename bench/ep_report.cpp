// moe-bench's report of an expert-parallel run: bytes each rank sends per token of its own.
#include <cstdio>
#include <string>

#include "ep_run.h"

namespace moe_bench {
namespace {

const char *const kNote =
    "ranks are threads of one process exchanging by memcpy (cudaMemcpy for CUDA layers); times measure "
    "that exchange path, not the speed of a networked expert-parallel run";

std::string json_per_rank(const PerToken &p) {
  std::string s = "[";
  for (size_t r = 0; r < p.per_rank.size(); ++r) {
    if (r) s += ", ";
    char buf[32];
    if (p.per_rank[r] < 0)
      s += "null";  // a rank without tokens
    else {
      std::snprintf(buf, sizeof buf, "%.2f", p.per_rank[r]);
      s += buf;
    }
  }
  return s + "]";
}

void json_figure(const char *name, const PerToken &p, bool last = false) {
  std::printf("\"%s\": {\"mean\": %.2f, \"max\": %.2f, \"per_rank\": %s}%s", name, p.mean, p.max,
              json_per_rank(p).c_str(), last ? "" : ", ");
}

}  // namespace

void print_ep_json(const EpResult &r) {
  std::printf(", \"ep\": {\"ranks\": %zu, \"threads_per_rank\": %d, \"tokens_per_rank\": [", r.tokens.size(),
              r.threads_per_rank);
  for (size_t i = 0; i < r.tokens.size(); ++i) std::printf("%s%lld", i ? ", " : "", (long long)r.tokens[i]);
  std::printf("], \"row_bytes\": %zu, \"note\": \"%s\", \"bytes_per_token\": {", r.row_bytes, kNote);
  const char *names[2] = {"fwd", "bwd"};
  for (int ph = 0; ph < 2; ++ph) {
    const EpPhase &e = r.phase[ph];
    std::printf("%s\"%s\": {", ph ? ", " : "", names[ph]);
    json_figure("remote", e.rows_remote);
    json_figure("self", e.rows_self);
    json_figure("metadata_remote", e.meta_remote);
    std::printf("\"expected_uniform_remote\": %.2f}", r.expected_uniform);
  }
  std::printf("}}");
}

void print_ep_text(const EpResult &r) {
  const size_t R = r.tokens.size();
  std::printf("\nexpert parallel  %zu ranks, tokens per rank", R);
  for (int64_t t : r.tokens) std::printf(" %lld", (long long)t);
  std::printf(", %d thread%s each\n", r.threads_per_rank, r.threads_per_rank == 1 ? "" : "s");
  std::printf("  (%s)\n", kNote);
  std::printf("bytes sent per token of the sending rank, one training step; token rows of %zu bytes\n", r.row_bytes);
  std::printf("%-6s %22s %22s %18s %22s\n", "phase", "to others mean / max", "to itself mean / max",
              "metadata to others", "uniform routing expects");
  const char *names[2] = {"fwd", "bwd"};
  for (int ph = 0; ph < 2; ++ph) {
    const EpPhase &e = r.phase[ph];
    std::printf("%-6s %11.1f / %8.1f %11.1f / %8.1f %18.2f %22.1f\n", names[ph], e.rows_remote.mean,
                e.rows_remote.max, e.rows_self.mean, e.rows_self.max, e.meta_remote.mean, r.expected_uniform);
  }
  std::printf("uniform routing: 2 exchanges (to the experts and back) x top-k rows x (R-1)/R x row bytes per phase;\n"
              "rows a rank sends to itself stay in its memory and are no network traffic\n");
}

}  // namespace moe_bench
