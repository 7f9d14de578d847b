/* Expert parallelism over MPI: on every rank, the output, the input gradient, every parameter
 * gradient and the aux losses of the expert-parallel layer equal those of one layer holding all
 * experts, run on the global batch (the concatenation of every rank's tokens). */
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

  moe_comm *comm;
  OK(moe_mpi_comm_create(MPI_COMM_WORLD, &comm));
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

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int v = 0; v < 2; ++v) run_variant(v, size);
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank_ == 0) printf("expert parallel over %d ranks: %s (%d failed checks)\n", size, total ? "FAIL" : "ok", total);
  MPI_Finalize();
  return total ? 1 : 0;
}
