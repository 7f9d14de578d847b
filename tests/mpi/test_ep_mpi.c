/* Expert parallelism over MPI: on every rank, the output, the input gradient, every parameter
 * gradient and the aux losses of the expert-parallel layer equal those of one layer holding all
 * experts, run on the global batch (the concatenation of every rank's tokens). */
#define _POSIX_C_SOURCE 200112L /* setenv */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/moe.h"
#include "moe/moe_mpi.h"

static int rank_ = 0, failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      fprintf(stderr, "rank %d: FAIL %s:%d: ", rank_, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fprintf(stderr, "\n");                               \
      ++failures;                                          \
    }                                                      \
  } while (0)

#define OK(call)                                                                                      \
  do {                                                                                                \
    moe_status s_ = (call);                                                                           \
    if (s_ != MOE_OK) {                                                                               \
      fprintf(stderr, "rank %d: %s failed: %s: %s\n", rank_, #call, moe_status_name(s_), moe_last_error()); \
      MPI_Abort(MPI_COMM_WORLD, 2);                                                                   \
    }                                                                                                 \
  } while (0)

/* Rank-tagged but reproducible data: the value depends only on the global index. */
static float value(uint64_t i, uint64_t salt) {
  uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ULL ^ salt;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return (float)((z >> 40) / 16777216.0 * 2.0 - 1.0);
}

static double rel_err(const float *a, const float *b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    double d = (double)a[i] - b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return sqrt(num) / (sqrt(den) + 1e-30);
}

static void configure(moe_config *cfg, int variant) {
  moe_config_init(cfg);
  cfg->d_model = 16;
  cfg->d_ff = 24;
  cfg->num_experts = 8;
  cfg->top_k = 2;
  cfg->seed = 11;
  cfg->aux_loss_coef = 0.01f;
  cfg->z_loss_coef = 0.001f;
  cfg->importance_loss_coef = 0.01f;
  if (variant == 1) {
    cfg->score = MOE_SCORE_SIGMOID;
    cfg->num_groups = 4;
    cfg->topk_groups = 2;
    cfg->routed_scale = 2.0f;
    cfg->num_shared_experts = 1;
    cfg->shared_gate = 1;
    cfg->bias_update_rate = 0.01f;
    cfg->activation = MOE_ACT_GEGLU;
  }
}

static int run_variant(int variant, int size) {
  const int64_t d = 16;
  /* Uneven local batches: rank r holds 5 + 3r tokens (one rank may even hold 0 in variant 1). */
  int64_t Tg = 0, first = 0, T = 0;
  for (int r = 0; r < size; ++r) {
    int64_t n = (variant == 1 && r == 1) ? 0 : 5 + 3 * r;
    if (r == rank_) {
      first = Tg;
      T = n;
    }
    Tg += n;
  }
  float *xg = malloc(sizeof(float) * Tg * d), *dyg = malloc(sizeof(float) * Tg * d);
  for (int64_t i = 0; i < Tg * d; ++i) {
    xg[i] = value(i, 1);
    dyg[i] = value(i, 2);
  }

  moe_config cfg;
  configure(&cfg, variant);
  moe_layer *ref;
  OK(moe_layer_create(&cfg, &ref));
  moe_context *rctx;
  OK(moe_context_create(ref, &rctx));
  float *yg = malloc(sizeof(float) * Tg * d), *dxg = malloc(sizeof(float) * Tg * d);
  OK(moe_forward(ref, xg, Tg, yg, rctx));
  OK(moe_backward(ref, rctx, dyg, dxg));

  /* The entry points for bindings without MPI_Comm (Java, Rust) make the same comm. */
  moe_comm *comm;
  if (variant == 0)
    OK(moe_mpi_comm_create(MPI_COMM_WORLD, &comm));
  else
    OK(moe_mpi_comm_create_f((int64_t)MPI_Comm_c2f(MPI_COMM_WORLD), &comm));
  configure(&cfg, variant);
  cfg.comm = comm;
  moe_layer *ep;
  OK(moe_layer_create(&cfg, &ep));
  moe_context *ctx;
  OK(moe_context_create(ep, &ctx));
  float *y = malloc(sizeof(float) * (T + 1) * d), *dx = malloc(sizeof(float) * (T + 1) * d);
  OK(moe_forward(ep, xg + first * d, T, y, ctx));
  OK(moe_backward(ep, ctx, dyg + first * d, dx));

  if (T > 0) {
    double e1 = rel_err(y, yg + first * d, T * d), e2 = rel_err(dx, dxg + first * d, T * d);
    CHECK(e1 < 1e-5, "variant %d: y differs from the single-rank layer: rel err %g", variant, e1);
    CHECK(e2 < 1e-5, "variant %d: dx differs from the single-rank layer: rel err %g", variant, e2);
  }

  moe_stats s = {sizeof(moe_stats)}, sr = {sizeof(moe_stats)};
  OK(moe_context_stats(ctx, &s));
  OK(moe_context_stats(rctx, &sr));
  CHECK(fabsf(s.load_balance_loss - sr.load_balance_loss) <= 1e-5f * fabsf(sr.load_balance_loss),
        "variant %d: LB %g vs %g", variant, s.load_balance_loss, sr.load_balance_loss);
  CHECK(fabsf(s.z_loss - sr.z_loss) <= 1e-5f * fabsf(sr.z_loss), "variant %d: z %g vs %g", variant, s.z_loss, sr.z_loss);
  CHECK(fabsf(s.importance_loss - sr.importance_loss) <= 1e-4f * fabsf(sr.importance_loss) + 1e-7f,
        "variant %d: importance %g vs %g", variant, s.importance_loss, sr.importance_loss);
  CHECK(fabsf(s.aux_loss_total - sr.aux_loss_total) <= 1e-5f * fabsf(sr.aux_loss_total),
        "variant %d: aux total %g vs %g", variant, s.aux_loss_total, sr.aux_loss_total);
  CHECK(s.load_cv == sr.load_cv || fabsf(s.load_cv - sr.load_cv) < 1e-6f, "variant %d: load cv %g vs %g", variant,
        s.load_cv, sr.load_cv);

  /* Gradients: local experts are a slice of the reference's; replicated parameters (router,
     shared) hold this rank's share, whose sum over ranks is the reference's. */
  int n = moe_layer_num_params(ep);
  for (int i = 0; i < n; ++i) {
    moe_param_info info, rinfo;
    OK(moe_layer_param_info(ep, i, &info));
    OK(moe_layer_param_info(ref, i, &rinfo));
    CHECK(strcmp(info.name, rinfo.name) == 0, "param order differs: %s vs %s", info.name, rinfo.name);
    int64_t cnt = 1, rcnt = 1;
    for (int j = 0; j < info.ndim; ++j) {
      cnt *= info.shape[j];
      rcnt *= rinfo.shape[j];
    }
    float *p = malloc(sizeof(float) * cnt), *rp = malloc(sizeof(float) * rcnt);
    int expert = strncmp(info.name, "experts.", 8) == 0;
    OK(moe_layer_get_param(ep, info.name, p, cnt));
    OK(moe_layer_get_param(ref, info.name, rp, rcnt));
    const float *rslice = expert ? rp + (int64_t)rank_ * cnt : rp;
    CHECK(rel_err(p, rslice, cnt) == 0.0, "%s: initial values differ from the reference slice", info.name);
    if (info.trainable) {
      OK(moe_layer_get_grad(ep, info.name, p, cnt));
      OK(moe_layer_get_grad(ref, info.name, rp, rcnt));
      if (!expert) MPI_Allreduce(MPI_IN_PLACE, p, (int)cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      rslice = expert ? rp + (int64_t)rank_ * cnt : rp;
      double e = rel_err(p, rslice, cnt);
      CHECK(e < 1e-5, "variant %d: grad of %s differs: rel err %g", variant, info.name, e);
    }
    free(p);
    free(rp);
  }

  moe_context_destroy(ctx);
  moe_layer_destroy(ep);
  moe_mpi_comm_destroy(comm);
  moe_context_destroy(rctx);
  moe_layer_destroy(ref);
  free(xg), free(dyg), free(yg), free(dxg), free(y), free(dx);
  return 0;
}

/* libmoe_mpi's reason for a failed hook, through comm->last_error, ends moe_last_error()'s text.
 * MPI returns errors only where the communicator says so: MPI_ERRORS_RETURN on the communicator
 * the comm is made from (its duplicate keeps the handler). The failure is a real MPI one: a
 * wrapper comm makes every rank send each peer twice the rows the peer expects, so MPI reports
 * truncation on every rank at the same collective (the routing statistics, a forward's first
 * exchange of rows) and no rank is left waiting. */
typedef struct {
  const moe_comm *inner;
  int truncate; /* the next exchange_rows sends twice the rows; then cleared */
} Breaker;

static moe_status breaker_counts(void *user, const int64_t *send, int64_t *recv) {
  const Breaker *b = user;
  return b->inner->exchange_counts(b->inner->user, send, recv);
}

static moe_status breaker_rows(void *user, const void *send, const int64_t *send_counts, void *recv,
                               const int64_t *recv_counts, size_t row_bytes, void *stream) {
  Breaker *b = user;
  if (!b->truncate)
    return b->inner->exchange_rows(b->inner->user, send, send_counts, recv, recv_counts, row_bytes, stream);
  b->truncate = 0;
  const int n = b->inner->size;
  int64_t *twice = malloc(sizeof(int64_t) * n);
  int64_t rows = 0;
  for (int q = 0; q < n; ++q) rows += twice[q] = 2 * send_counts[q];
  void *big = calloc((size_t)rows + 1, row_bytes); /* real memory for every row MPI sends */
  moe_status s = b->inner->exchange_rows(b->inner->user, big, twice, recv, recv_counts, row_bytes, stream);
  free(big);
  free(twice);
  return s;
}

static const char *breaker_reason(void *user) {
  const Breaker *b = user;
  return b->inner->last_error(b->inner->user);
}

static void check_comm_reason(int size) {
  MPI_Comm returning;
  MPI_Comm_dup(MPI_COMM_WORLD, &returning);
  MPI_Comm_set_errhandler(returning, MPI_ERRORS_RETURN);
  moe_comm *comm;
  OK(moe_mpi_comm_create(returning, &comm));
  CHECK(comm->struct_size == sizeof(moe_comm), "struct_size %zu", comm->struct_size);
  CHECK(comm->last_error != NULL, "libmoe_mpi sets no last_error");
  if (!comm->last_error) MPI_Abort(MPI_COMM_WORLD, 2);
  CHECK(strcmp(comm->last_error(comm->user), "") == 0, "last_error before any failure: '%s'",
        comm->last_error(comm->user));

  /* Refused before MPI sees them, on every rank alike. */
  int64_t *counts = calloc((size_t)size, sizeof(int64_t));
  char row[8];
  moe_status s = comm->exchange_rows(comm->user, row, counts, row, counts, 0, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "row_bytes 0 gave %s", moe_status_name(s));
  CHECK(strstr(comm->last_error(comm->user), "row_bytes") != NULL, "last_error: '%s'", comm->last_error(comm->user));
  counts[size - 1] = -3;
  s = comm->exchange_rows(comm->user, row, counts, row, counts, sizeof row, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "a negative count gave %s", moe_status_name(s));
  CHECK(strstr(comm->last_error(comm->user), "send_counts") != NULL, "last_error: '%s'", comm->last_error(comm->user));
  free(counts);

  if (size > 1) {
    Breaker b = {comm, 0};
    moe_comm wrap = {sizeof(moe_comm), comm->size, comm->rank, &b, breaker_counts, breaker_rows, breaker_reason};
    moe_config cfg;
    configure(&cfg, 0);
    cfg.comm = &wrap;
    moe_layer *l;
    OK(moe_layer_create(&cfg, &l));
    const int64_t T = 4 + rank_, d = cfg.d_model;
    float *x = malloc(sizeof(float) * T * d), *y0 = malloc(sizeof(float) * T * d), *y = malloc(sizeof(float) * T * d);
    for (int64_t i = 0; i < T * d; ++i) x[i] = value(i + 1000 * (uint64_t)rank_, 3);
    OK(moe_forward(l, x, T, y0, NULL));
    b.truncate = 1;
    s = moe_forward(l, x, T, y, NULL);
    const char *msg = moe_last_error();
    CHECK(s == MOE_ERR_COMM, "a truncating exchange gave %s: %s", moe_status_name(s), msg);
    CHECK(strstr(msg, "comm->exchange_rows returned MOE_ERR_COMM: exchange_rows (all-to-all of rows) failed: ") != NULL,
          "moe_last_error() lacks MPI's reason: '%s'", msg);
    const char *mpi_text = strstr(msg, "failed: ");
    CHECK(mpi_text && strstr(mpi_text, "rank ") && strlen(strstr(mpi_text, "rank ")) > strlen("rank 0: "),
          "MPI's text is empty: '%s'", msg);
    if (rank_ == 0) printf("a failed MPI exchange reads: %s\n", msg);
    /* the layer is intact, and so is the communicator here */
    OK(moe_forward(l, x, T, y, NULL));
    CHECK(memcmp(y, y0, sizeof(float) * T * d) == 0, "the forward after the failure differs");
    moe_layer_destroy(l);
    free(x), free(y0), free(y);
  }
  moe_mpi_comm_destroy(comm);
  MPI_Comm_free(&returning);
}

static double now(void) { return MPI_Wtime(); }

/* The deadline: the last rank skips a training forward. Every other rank's forward returns
 * MOE_ERR_COMM within the deadline, naming the exchange and the missing rank; its context is left
 * empty and the layer's parameters unchanged; the comm is unusable afterwards and says so at once;
 * everything is destroyed normally. */
static void check_deadline(int size) {
  if (size < 2) return;
  const double deadline = 1.5;
  moe_comm *comm = NULL;
  setenv("MOE_MPI_TIMEOUT", "1.5s", 1);
  moe_status bad = moe_mpi_comm_create(MPI_COMM_WORLD, &comm);
  CHECK(bad == MOE_ERR_INVALID_ARGUMENT && comm == NULL, "MOE_MPI_TIMEOUT=1.5s gave %s", moe_status_name(bad));
  setenv("MOE_MPI_TIMEOUT", "-2", 1);
  bad = moe_mpi_comm_create_world(&comm);
  CHECK(bad == MOE_ERR_INVALID_ARGUMENT && comm == NULL, "MOE_MPI_TIMEOUT=-2 gave %s", moe_status_name(bad));
  /* MOE_MPI_TIMEOUT is the deadline of the comms made while it is set: rank 0 alone starts an
     exchange and is told, after 0.5 s, that every other rank is missing. */
  setenv("MOE_MPI_TIMEOUT", "0.5", 1);
  moe_comm *alone;
  OK(moe_mpi_comm_create_world(&alone));
  if (rank_ == 0) {
    int64_t *send = calloc((size_t)size, sizeof(int64_t)), *recv = calloc((size_t)size, sizeof(int64_t));
    const double t0 = MPI_Wtime();
    moe_status s = alone->exchange_counts(alone->user, send, recv);
    const double waited = MPI_Wtime() - t0;
    char who[64];
    snprintf(who, sizeof who, "rank%s %s of %d did not answer within 0.5 s", size > 2 ? "s" : "",
             size == 2 ? "1" : size == 4 ? "1, 2, 3" : "?", size);
    CHECK(s == MOE_ERR_COMM && waited >= 0.45 && waited < 10 && strstr(alone->last_error(alone->user), who),
          "an exchange nobody joined gave %s after %.2f s: '%s'", moe_status_name(s), waited,
          alone->last_error(alone->user));
    printf("an exchange nobody joined reads: %s (after %.2f s)\n", alone->last_error(alone->user), waited);
    free(send), free(recv);
  }
  /* `alone` stays alive until the end: rank 0's abandoned messages to the others sit unmatched in
     their queues under its communicator, and Open MPI hands a freed communicator's id to the next
     one made, where such a message would match a healthy exchange (the hazard moe_mpi.h
     describes: after a deadline, a job should end). */
  /* A generous deadline for the healthy step (ranks share cores with whatever else runs), a short
     one, through moe_mpi_comm_set_timeout, for the step a rank skips. */
  setenv("MOE_MPI_TIMEOUT", "60", 1);
  OK(moe_mpi_comm_create_world(&comm));
  unsetenv("MOE_MPI_TIMEOUT");
  CHECK(moe_mpi_comm_set_timeout(comm, -1.0) == MOE_ERR_INVALID_ARGUMENT, "a negative timeout was accepted");
  CHECK(moe_mpi_comm_set_timeout(comm, NAN) == MOE_ERR_INVALID_ARGUMENT, "a NaN timeout was accepted");
  CHECK(moe_mpi_comm_set_timeout(NULL, 1.0) == MOE_ERR_INVALID_ARGUMENT, "a NULL comm was accepted");
  moe_comm foreign = *comm;
  foreign.exchange_rows = NULL;
  CHECK(moe_mpi_comm_set_timeout(&foreign, 1.0) == MOE_ERR_INVALID_ARGUMENT, "another library's comm was accepted");
  moe_config cfg;
  configure(&cfg, 0);
  cfg.comm = comm;
  moe_layer *l;
  OK(moe_layer_create(&cfg, &l));
  moe_context *ctx;
  OK(moe_context_create(l, &ctx));
  const int64_t T = 6, d = cfg.d_model;
  float *x = malloc(sizeof(float) * T * d), *y = malloc(sizeof(float) * T * d), *dy = malloc(sizeof(float) * T * d);
  for (int64_t i = 0; i < T * d; ++i) {
    x[i] = value(i + 7000 * (uint64_t)rank_, 4);
    dy[i] = value(i + 7000 * (uint64_t)rank_, 5);
  }
  OK(moe_forward(l, x, T, y, ctx)); /* a healthy step first: the comm works */
  OK(moe_backward(l, ctx, dy, NULL));
  const int64_t nw = (int64_t)cfg.num_experts / size * cfg.d_ff * d;
  float *w_before = malloc(sizeof(float) * nw), *w_after = malloc(sizeof(float) * nw);
  OK(moe_layer_get_param(l, "experts.w1", w_before, nw));
  OK(moe_mpi_comm_set_timeout(comm, deadline));

  if (rank_ != size - 1) {
    const double t0 = now();
    moe_status s = moe_forward(l, x, T, y, ctx);
    const double waited = now() - t0;
    char msg[2048];
    snprintf(msg, sizeof msg, "%s", moe_last_error());
    CHECK(s == MOE_ERR_COMM, "a forward with a missing rank gave %s: %s", moe_status_name(s), msg);
    CHECK(waited >= 0.9 * deadline && waited < deadline + 10.0, "it returned after %.2f s, the deadline is %.1f s",
          waited, deadline);
    char who[64];
    snprintf(who, sizeof who, "rank %d of %d did not answer within 1.5 s", size - 1, size);
    CHECK(strstr(msg, "comm->exchange_rows returned MOE_ERR_COMM: exchange_rows (all-to-all of rows): ") && strstr(msg, who),
          "the text does not name the exchange and the missing rank: '%s'", msg);
    if (rank_ == 0) printf("a missing rank reads: %s (after %.2f s)\n", msg, waited);
    moe_stats st = {sizeof(moe_stats)};
    CHECK(moe_context_stats(ctx, &st) == MOE_ERR_STATE, "the context is not empty after the failure");
    CHECK(moe_backward(l, ctx, dy, NULL) == MOE_ERR_STATE, "backward ran on the failed forward's context");
    OK(moe_layer_get_param(l, "experts.w1", w_after, nw));
    CHECK(memcmp(w_before, w_after, sizeof(float) * nw) == 0, "the failed forward changed experts.w1");
    /* The comm is unusable now, and says so without waiting again. */
    const double t1 = now();
    s = moe_forward(l, x, T, y, NULL);
    CHECK(s == MOE_ERR_COMM && strstr(moe_last_error(), "not attempted: an earlier exchange failed") &&
              now() - t1 < 0.5 * deadline,
          "the next forward gave %s after %.2f s: %s", moe_status_name(s), now() - t1, moe_last_error());
  }
  MPI_Barrier(MPI_COMM_WORLD);
  moe_context_destroy(ctx);
  moe_layer_destroy(l);
  moe_mpi_comm_destroy(comm);
  moe_mpi_comm_destroy(alone);
  free(x), free(y), free(dy), free(w_before), free(w_after);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  CHECK(moe_mpi_init() == MOE_OK, "moe_mpi_init after MPI_Init is not a no-op");
  int size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int v = 0; v < 2; ++v) run_variant(v, size);
  check_comm_reason(size);
  check_deadline(size);
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank_ == 0) printf("expert parallel over %d ranks: %s (%d failed checks)\n", size, total ? "FAIL" : "ok", total);
  CHECK(moe_mpi_finalize() == MOE_OK, "moe_mpi_finalize failed");
  moe_comm *late = NULL;
  CHECK(moe_mpi_init() == MOE_ERR_STATE, "moe_mpi_init after MPI_Finalize did not give MOE_ERR_STATE");
  CHECK(moe_mpi_comm_create_world(&late) == MOE_ERR_STATE && late == NULL,
        "moe_mpi_comm_create_world after MPI_Finalize did not give MOE_ERR_STATE");
  CHECK(moe_mpi_finalize() == MOE_OK, "a second moe_mpi_finalize is not a no-op");
  return total || failures ? 1 : 0;
}
