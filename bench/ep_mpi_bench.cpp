// moe-bench-mpi: an expert-parallel training step over real MPI ranks (libmoe_mpi), one layer per
// rank, each with its share of a global batch. Run it under mpirun, on one host or several:
//
//   mpirun -np 4 moe-bench-mpi --d-model 512 --d-ff 1024 --experts 8 --top-k 2 --tokens 4096
//
// Rank 0 prints one JSON object: time per step (forward + backward, wall clock of the slowest
// rank, median over iterations), the bytes per token each rank sent to other ranks (token rows per
// phase, and the counts/statistics exchanges), and the achieved all-to-all bandwidth: the token-row
// bytes a rank sent to other ranks divided by the time its exchange_rows calls took. That time
// includes waiting for the slowest rank to arrive, so it is what the step got from the network,
// not the link's peak. bench/ep_multihost.sh runs it on one host and across test hosts.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "moe/moe_mpi.h"

namespace {

[[noreturn]] void die(const char *what) {
  std::fprintf(stderr, "moe-bench-mpi: %s\n", what);
  MPI_Abort(MPI_COMM_WORLD, 2);
  std::exit(2);
}

void ok(moe_status s, const char *call) {
  if (s != MOE_OK) {
    std::string m = std::string(call) + " failed: " + moe_status_name(s) + ": " + moe_last_error();
    die(m.c_str());
  }
}

enum Phase { kFwd = 0, kBwd = 1 };

// A moe_comm around libmoe_mpi's that counts what this rank sends and how long the exchanges take.
struct Counting {
  const moe_comm *inner = nullptr;
  size_t token_row_bytes = 0;  // d_model * sizeof(float): rows of activations
  int rank = 0;
  Phase phase = kFwd;
  // per phase: token-row bytes to other ranks, other exchanged bytes to other ranks, seconds in
  // token-row exchanges, seconds in all exchanges
  double rows_remote[2] = {}, meta_remote[2] = {}, rows_seconds[2] = {}, all_seconds[2] = {};

  void reset() { *this = Counting{inner, token_row_bytes, rank, kFwd}; }

  static moe_status counts(void *user, const int64_t *send, int64_t *recv) {
    auto *c = static_cast<Counting *>(user);
    const double t0 = MPI_Wtime();
    moe_status s = c->inner->exchange_counts(c->inner->user, send, recv);
    c->all_seconds[c->phase] += MPI_Wtime() - t0;
    c->meta_remote[c->phase] += static_cast<double>(sizeof(int64_t)) * (c->inner->size - 1);
    return s;
  }

  static moe_status rows(void *user, const void *send, const int64_t *sc, void *recv, const int64_t *rc, size_t row_bytes,
                         void *stream) {
    auto *c = static_cast<Counting *>(user);
    double remote = 0;
    for (int q = 0; q < c->inner->size; ++q)
      if (q != c->rank) remote += static_cast<double>(sc[q]) * row_bytes;
    const double t0 = MPI_Wtime();
    moe_status s = c->inner->exchange_rows(c->inner->user, send, sc, recv, rc, row_bytes, stream);
    const double dt = MPI_Wtime() - t0;
    c->all_seconds[c->phase] += dt;
    if (row_bytes == c->token_row_bytes) {
      c->rows_remote[c->phase] += remote;
      c->rows_seconds[c->phase] += dt;
    } else {
      c->meta_remote[c->phase] += remote;
    }
    return s;
  }

  static const char *last_error(void *user) {
    auto *c = static_cast<Counting *>(user);
    return c->inner->last_error(c->inner->user);
  }
};

std::string cpu_model() {
  std::string model = "unknown CPU";
  if (FILE *f = std::fopen("/proc/cpuinfo", "r")) {
    char line[4096];
    while (std::fgets(line, sizeof line, f)) {
      if (std::strncmp(line, "model name", 10) == 0) {
        model = std::strchr(line, ':') + 2;
        break;
      }
    }
    std::fclose(f);
  }
  while (!model.empty() && (model.back() == '\n' || model.back() == ' ')) model.pop_back();
  return model;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Options {
  int64_t d_model = 512, d_ff = 1024, experts = 8, top_k = 2, tokens = 4096;
  int iters = 5, warmup = 1, threads = 1;
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (i + 1 >= argc) die(("flag " + f + " needs a value; flags: --d-model --d-ff --experts --top-k --tokens "
                            "--iters --warmup --threads").c_str());
    const long long v = std::strtoll(argv[++i], nullptr, 10);
    if (v <= 0 && f != "--warmup") die((f + " must be > 0").c_str());
    if (f == "--d-model") o.d_model = v;
    else if (f == "--d-ff") o.d_ff = v;
    else if (f == "--experts") o.experts = v;
    else if (f == "--top-k") o.top_k = v;
    else if (f == "--tokens") o.tokens = v;
    else if (f == "--iters") o.iters = static_cast<int>(v);
    else if (f == "--warmup") o.warmup = static_cast<int>(v);
    else if (f == "--threads") o.threads = static_cast<int>(v);
    else die(("unknown flag " + f).c_str());
  }
  return o;
}

}  // namespace

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const Options o = parse(argc, argv);
  omp_set_num_threads(o.threads);

  // Hosts: the distinct processor names of the ranks.
  char name[MPI_MAX_PROCESSOR_NAME] = "";
  int len = 0;
  MPI_Get_processor_name(name, &len);
  std::vector<char> names(static_cast<size_t>(size) * MPI_MAX_PROCESSOR_NAME);
  MPI_Gather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0, MPI_COMM_WORLD);

  moe_comm *mpi = nullptr;
  ok(moe_mpi_comm_create(MPI_COMM_WORLD, &mpi), "moe_mpi_comm_create");
  Counting counting;
  counting.inner = mpi;
  counting.rank = rank;
  counting.token_row_bytes = static_cast<size_t>(o.d_model) * sizeof(float);
  moe_comm wrap = {sizeof(moe_comm), size, rank, &counting, Counting::counts, Counting::rows, Counting::last_error};

  moe_config cfg;
  moe_config_init(&cfg);
  cfg.d_model = o.d_model;
  cfg.d_ff = o.d_ff;
  cfg.num_experts = o.experts;
  cfg.top_k = o.top_k;
  cfg.seed = 1;
  cfg.comm = &wrap;
  moe_layer *layer = nullptr;
  ok(moe_layer_create(&cfg, &layer), "moe_layer_create");
  moe_context *ctx = nullptr;
  ok(moe_context_create(layer, &ctx), "moe_context_create");

  // The global batch split as evenly as it goes (the first ranks get one more token).
  const int64_t T = o.tokens / size + (rank < o.tokens % size ? 1 : 0);
  std::mt19937 rng(1234 + rank);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(T * o.d_model), y(T * o.d_model), dy(T * o.d_model), dx(T * o.d_model);
  for (auto &v : x) v = normal(rng);
  for (auto &v : dy) v = normal(rng) * 1e-2f;

  std::vector<double> step_ms, fwd_ms;
  for (int it = 0; it < o.warmup + o.iters; ++it) {
    if (it == o.warmup) counting.reset();
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    counting.phase = kFwd;
    ok(moe_forward(layer, x.data(), T, y.data(), ctx), "moe_forward");
    const double t1 = MPI_Wtime();
    counting.phase = kBwd;
    ok(moe_backward(layer, ctx, dy.data(), dx.data()), "moe_backward");
    const double t2 = MPI_Wtime();
    double mine[2] = {t1 - t0, t2 - t0}, slowest[2];
    MPI_Reduce(mine, slowest, 2, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (it >= o.warmup) {
      fwd_ms.push_back(1e3 * slowest[0]);
      step_ms.push_back(1e3 * slowest[1]);
    }
  }
  // What each rank sent per local token per step, and its exchange times per step.
  const double per_step = 1.0 / o.iters, tok = T > 0 ? 1.0 / static_cast<double>(T) : 0;
  double mine[8] = {counting.rows_remote[kFwd] * per_step * tok, counting.rows_remote[kBwd] * per_step * tok,
                    (counting.meta_remote[kFwd] + counting.meta_remote[kBwd]) * per_step * tok,
                    (counting.rows_seconds[kFwd] + counting.rows_seconds[kBwd]) * per_step,
                    (counting.all_seconds[kFwd] + counting.all_seconds[kBwd]) * per_step,
                    (counting.rows_remote[kFwd] + counting.rows_remote[kBwd]) * per_step, 0, 0};
  mine[6] = mine[3] > 0 ? mine[5] / mine[3] : 0;  // bytes per second of this rank's token-row exchanges
  std::vector<double> all(static_cast<size_t>(size) * 8);
  MPI_Gather(mine, 8, MPI_DOUBLE, all.data(), 8, MPI_DOUBLE, 0, MPI_COMM_WORLD);

  if (rank == 0) {
    std::set<std::string> hosts;
    for (int r = 0; r < size; ++r) hosts.insert(std::string(&names[static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME]));
    auto mean = [&](int k) {
      double s = 0;
      for (int r = 0; r < size; ++r) s += all[static_cast<size_t>(r) * 8 + k];
      return s / size;
    };
    auto max = [&](int k) {
      double m = 0;
      for (int r = 0; r < size; ++r) m = std::max(m, all[static_cast<size_t>(r) * 8 + k]);
      return m;
    };
    // All ranks' remote token-row bytes over the slowest rank's time in those exchanges.
    double total_bytes = 0;
    for (int r = 0; r < size; ++r) total_bytes += all[static_cast<size_t>(r) * 8 + 5];
    const double flops = 2.0 * o.tokens * o.top_k * o.d_model * o.d_ff * 3 * 3;  // SwiGLU, forward + 2x backward
    std::printf("{\"bench\": \"moe-bench-mpi\", \"cpu\": \"%s\", \"ranks\": %d, \"hosts\": %zu, \"host_names\": [",
                cpu_model().c_str(), size, hosts.size());
    size_t i = 0;
    for (const auto &h : hosts) std::printf("%s\"%s\"", i++ ? ", " : "", h.c_str());
    std::printf("], \"threads_per_rank\": %d, \"shape\": {\"d_model\": %lld, \"d_ff\": %lld, \"experts\": %lld, "
                "\"top_k\": %lld, \"dtype\": \"float32\", \"activation\": \"swiglu\"}, \"tokens_global\": %lld, "
                "\"iters\": %d,\n \"step_ms\": {\"median\": %.3f, \"min\": %.3f}, \"fwd_ms\": {\"median\": %.3f}, "
                "\"step_gflops\": %.2f,\n",
                o.threads, (long long)o.d_model, (long long)o.d_ff, (long long)o.experts, (long long)o.top_k,
                (long long)o.tokens, o.iters, median(step_ms), *std::min_element(step_ms.begin(), step_ms.end()),
                median(fwd_ms), flops / (median(step_ms) * 1e-3) * 1e-9);
    std::printf(" \"bytes_per_token_per_rank\": {\"fwd_rows_remote\": %.1f, \"bwd_rows_remote\": %.1f, "
                "\"metadata_remote\": %.3f, \"max_rank_rows_remote\": %.1f},\n",
                mean(0), mean(1), mean(2), std::max(max(0), max(1)));
    std::printf(" \"alltoall\": {\"rows_seconds_per_step\": {\"mean\": %.6f, \"max\": %.6f}, "
                "\"all_exchanges_seconds_per_step\": {\"mean\": %.6f}, \"share_of_step\": %.3f, "
                "\"per_rank_gbytes_per_s\": {\"mean\": %.3f, \"min_rank\": %.3f}, \"aggregate_gbytes_per_s\": %.3f}}\n",
                mean(3), max(3), mean(4), mean(4) / (median(step_ms) * 1e-3), mean(6) * 1e-9,
                [&] {
                  double m = all[6];
                  for (int r = 1; r < size; ++r) m = std::min(m, all[static_cast<size_t>(r) * 8 + 6]);
                  return m * 1e-9;
                }(),
                max(3) > 0 ? total_bytes / max(3) * 1e-9 : 0.0);
  }
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  moe_mpi_comm_destroy(mpi);
  MPI_Finalize();
  return 0;
}
