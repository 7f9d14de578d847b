/*
 * train_specialize: experts specialise on a clustered task, and load balancing prevents collapse.
 *
 * The task: every token comes from one of K clusters, x = c_k + noise with c_k the cluster's centre
 * (plus, with --offset M, a component of length M shared by every token), and its target is
 * y = A_k x with a linear map A_k of its own. A top-1 MoE layer (Switch-style gate:
 * the router probability of the chosen expert, ReLU experts) learns the task from scratch with its
 * own backward and plain SGD on the loss 1/(2 T d) sum_t |y_t - target_t|^2, three times from the
 * same initial weights and the same batches:
 *   none  no balancing at all;
 *   lb    the load-balance loss E * sum_e f_e P_e with coefficient --alpha (Switch / GShard; the
 *         task loss here is a per-element mean, small beside a language model's, hence 0.1
 *         rather than Switch's 0.01, which is too weak to matter at this scale);
 *   bias  auxiliary-loss-free balancing: router.bias[e] += u * sign(mean load - load_e) after each
 *         step (DeepSeek-V3), no balance loss.
 * It prints the progress (step, loss, load CV) and, at the end, on held-out tokens:
 *   purity      how consistently each cluster goes to one expert: the mean over clusters of the
 *               fraction of its tokens routed to its most frequent expert;
 *   exclusive   how exclusively each expert serves one cluster: the fraction of tokens whose expert's
 *               most frequent cluster is their own (1/K when everything goes to one expert);
 *   experts     the number of distinct experts that are some cluster's favourite;
 *   load CV     std/mean of the per-expert token counts.
 * A collapsed router can have purity 1 (every cluster goes to the same expert); "exclusive" and
 * "experts" show the collapse. Without balancing the experts that win tokens early keep them
 * (the gate gradient only reaches the chosen expert): one expert ends up serving two clusters or
 * more and another starves.
 *
 * Exit status 0 only when both balanced runs specialise (purity and exclusivity >= --min-purity,
 * every cluster on its own expert when E >= K, eval loss at most half the initial one) and the run
 * without balancing does not (it collapses onto fewer experts or mixes clusters); 1 otherwise, 2 on
 * a libmoe error or bad arguments.
 *
 *   train_specialize [--steps N] [--tokens T] [--experts E] [--clusters K] [--d-model D] [--d-ff F]
 *                    [--lr LR] [--alpha A] [--bias-rate U] [--offset M] [--seed S] [--min-purity P]
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moe/moe.h>

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    moe_status st_ = (call);                                                                          \
    if (st_ != MOE_OK) {                                                                              \
      fprintf(stderr, "train_specialize: %s failed: %s: %s\n", #call, moe_status_name(st_), moe_last_error()); \
      exit(2);                                                                                        \
    }                                                                                                 \
  } while (0)

/* ---- options ----------------------------------------------------------------------------- */
typedef struct options {
  int64_t steps, tokens, experts, clusters, d_model, d_ff, eval_tokens;
  double lr, alpha, bias_rate, offset, spread, noise, min_purity;
  uint64_t seed;
} options;

static void usage(FILE *f) {
  fprintf(f,
          "usage: train_specialize [--steps N] [--tokens T] [--experts E] [--clusters K] [--d-model D]\n"
          "                        [--d-ff F] [--lr LR] [--alpha A] [--bias-rate U] [--offset M]\n"
          "                        [--seed S] [--min-purity P]\n"
          "defaults: --steps 400 --tokens 256 --experts 4 --clusters 4 --d-model 16 --d-ff 32 --lr 0.5\n"
          "          --alpha 0.1 --bias-rate 0.01 --offset 0 --seed 1 --min-purity 0.9\n");
}

static int parse_args(int argc, char **argv, options *o) {
  int i;
  o->steps = 400;
  o->tokens = 256;
  o->experts = 4;
  o->clusters = 4;
  o->d_model = 16;
  o->d_ff = 32;
  o->eval_tokens = 2048;
  o->lr = 0.5;
  o->alpha = 0.1;
  o->bias_rate = 0.01;
  o->offset = 0.0;
  o->spread = 1.0;
  o->noise = 1.0;
  o->min_purity = 0.9;
  o->seed = 1;
  for (i = 1; i < argc; ++i) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    char *end = NULL;
    int64_t *ip = NULL;
    double *dp = NULL;
    int is_seed = 0;
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (strcmp(a, "--steps") == 0) ip = &o->steps;
    else if (strcmp(a, "--tokens") == 0) ip = &o->tokens;
    else if (strcmp(a, "--experts") == 0) ip = &o->experts;
    else if (strcmp(a, "--clusters") == 0) ip = &o->clusters;
    else if (strcmp(a, "--d-model") == 0) ip = &o->d_model;
    else if (strcmp(a, "--d-ff") == 0) ip = &o->d_ff;
    else if (strcmp(a, "--lr") == 0) dp = &o->lr;
    else if (strcmp(a, "--alpha") == 0) dp = &o->alpha;
    else if (strcmp(a, "--bias-rate") == 0) dp = &o->bias_rate;
    else if (strcmp(a, "--offset") == 0) dp = &o->offset;
    else if (strcmp(a, "--min-purity") == 0) dp = &o->min_purity;
    else if (strcmp(a, "--seed") == 0) is_seed = 1;
    else {
      fprintf(stderr, "train_specialize: unknown option '%s'\n", a);
      usage(stderr);
      return 0;
    }
    if (v == NULL || *v == '\0') {
      fprintf(stderr, "train_specialize: %s needs a value\n", a);
      return 0;
    }
    if (dp) *dp = strtod(v, &end);
    else if (ip) *ip = (int64_t)strtoll(v, &end, 10);
    else if (is_seed) o->seed = (uint64_t)strtoull(v, &end, 10);
    if (*end != '\0') {
      fprintf(stderr, "train_specialize: %s expects a number, got '%s'\n", a, v);
      return 0;
    }
    ++i;
  }
  if (o->steps < 1 || o->tokens < 1 || o->experts < 1 || o->clusters < 1 || o->d_model < 1 || o->d_ff < 1 ||
      !(o->lr > 0) || o->alpha < 0 || o->bias_rate < 0) {
    fprintf(stderr, "train_specialize: sizes must be >= 1, --lr > 0, --alpha and --bias-rate >= 0\n");
    return 0;
  }
  return 1;
}

/* ---- a small deterministic generator (splitmix64 + Box-Muller) --------------------------------- */
typedef struct rng {
  uint64_t s;
} rng;

static uint64_t rng_next(rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static double rng_uniform(rng *r) { return ((double)(rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static double rng_normal(rng *r) {
  double u1 = rng_uniform(r), u2 = rng_uniform(r);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- the task ---------------------------------------------------------------------------------- */
typedef struct task {
  int64_t K, d;
  double *shared;  /* m [d] */
  double *centre;  /* c [K,d] */
  double *map;     /* A [K,d,d] */
  double noise;
} task;

static void task_init(task *t, const options *o) {
  rng r = {o->seed * 1000003ULL + 17};
  int64_t K = o->clusters, d = o->d_model, i;
  t->K = K;
  t->d = d;
  t->noise = o->noise;
  t->shared = malloc(sizeof(double) * (size_t)d);
  t->centre = malloc(sizeof(double) * (size_t)(K * d));
  t->map = malloc(sizeof(double) * (size_t)(K * d * d));
  if (!t->shared || !t->centre || !t->map) {
    fprintf(stderr, "train_specialize: out of memory\n");
    exit(2);
  }
  /* m points along (1, ..., 1) / sqrt(d) with length --offset. */
  for (i = 0; i < d; ++i) t->shared[i] = o->offset / sqrt((double)d);
  for (i = 0; i < K * d; ++i) t->centre[i] = o->spread * rng_normal(&r);
  for (i = 0; i < K * d * d; ++i) t->map[i] = rng_normal(&r) / sqrt((double)d);
}

static void task_free(task *t) {
  free(t->shared);
  free(t->centre);
  free(t->map);
}

/* T tokens: x [T,d], target [T,d], cluster [T]. */
static void task_batch(const task *t, rng *r, int64_t T, float *x, float *target, int *cluster) {
  int64_t n, i, j, d = t->d;
  for (n = 0; n < T; ++n) {
    int k = (int)(rng_next(r) % (uint64_t)t->K);
    const double *A = t->map + (int64_t)k * d * d;
    double xv[1024];
    cluster[n] = k;
    for (i = 0; i < d; ++i) {
      xv[i] = t->shared[i] + t->centre[k * d + i] + t->noise * rng_normal(r);
      x[n * d + i] = (float)xv[i];
    }
    for (i = 0; i < d; ++i) {
      double acc = 0.0;
      for (j = 0; j < d; ++j) acc += A[i * d + j] * xv[j];
      target[n * d + i] = (float)acc;
    }
  }
}

/* ---- training ---------------------------------------------------------------------------------- */
typedef struct result {
  double loss0, loss, purity0, purity, exclusive, load_cv, bias_spread;
  int experts_used;
} result;

typedef struct evaluation {
  double loss, purity, exclusive, load_cv;
  int experts_used;
} evaluation;

/* 1/(2 T d) sum |y - target|^2; dy = (y - target) / (T d) when dy is given. */
static double mse(const float *y, const float *target, int64_t n, int64_t d, float *dy) {
  double acc = 0.0;
  int64_t i;
  for (i = 0; i < n * d; ++i) {
    double e = (double)y[i] - (double)target[i];
    acc += e * e;
    if (dy) dy[i] = (float)(e / (double)(n * d));
  }
  return 0.5 * acc / (double)(n * d);
}

static evaluation evaluate(moe_layer *layer, const options *o, const float *x, const float *target,
                           const int *cluster, float *y, int32_t *ids) {
  const int64_t N = o->eval_tokens, E = o->experts, K = o->clusters, d = o->d_model;
  int64_t *hist = calloc((size_t)(K * E), sizeof(int64_t));
  int64_t *load = calloc((size_t)E, sizeof(int64_t));
  int *favourite = calloc((size_t)K, sizeof(int));
  char *used = calloc((size_t)E, 1);
  moe_context *ctx = NULL;
  evaluation ev;
  int64_t n, k, e;
  double mean = 0.0, var = 0.0, pur = 0.0, excl = 0.0;
  if (!hist || !load || !favourite || !used) {
    fprintf(stderr, "train_specialize: out of memory\n");
    exit(2);
  }
  CHECK(moe_context_create(layer, &ctx));
  CHECK(moe_route(layer, x, N, ctx)); /* inference routing: no noise, no bias update */
  CHECK(moe_context_topk(ctx, ids, NULL));
  moe_context_destroy(ctx);
  CHECK(moe_forward(layer, x, N, y, NULL));
  ev.loss = mse(y, target, N, d, NULL);
  for (n = 0; n < N; ++n) {
    if (ids[n] < 0) continue;
    ++hist[cluster[n] * E + ids[n]];
    ++load[ids[n]];
  }
  for (k = 0; k < K; ++k) {
    int64_t best = 0, total = 0;
    for (e = 0; e < E; ++e) {
      total += hist[k * E + e];
      if (hist[k * E + e] > hist[k * E + best]) best = e;
    }
    favourite[k] = (int)best;
    pur += total > 0 ? (double)hist[k * E + best] / (double)total : 0.0;
  }
  ev.purity = pur / (double)K;
  for (e = 0; e < E; ++e) {
    int64_t best = 0;
    for (k = 0; k < K; ++k)
      if (hist[k * E + e] > best) best = hist[k * E + e];
    excl += (double)best;
  }
  ev.exclusive = excl / (double)N;
  ev.experts_used = 0;
  for (k = 0; k < K; ++k)
    if (!used[favourite[k]]) {
      used[favourite[k]] = 1;
      ++ev.experts_used;
    }
  for (e = 0; e < E; ++e) mean += (double)load[e];
  mean /= (double)E;
  for (e = 0; e < E; ++e) var += ((double)load[e] - mean) * ((double)load[e] - mean);
  ev.load_cv = mean > 0 ? sqrt(var / (double)E) / mean : 0.0;
  free(hist);
  free(load);
  free(favourite);
  free(used);
  return ev;
}

static result train(const options *o, const task *t, const char *mode, const float *ex, const float *etarget,
                    const int *ecluster) {
  const int64_t T = o->tokens, d = o->d_model, N = o->eval_tokens;
  moe_config cfg;
  moe_layer *layer = NULL;
  moe_context *ctx = NULL;
  rng data = {o->seed * 7919ULL + 3}; /* the same batches for every mode */
  float *x = malloc(sizeof(float) * (size_t)(T * d)), *target = malloc(sizeof(float) * (size_t)(T * d));
  float *y = malloc(sizeof(float) * (size_t)(T * d)), *dy = malloc(sizeof(float) * (size_t)(T * d));
  float *ey = malloc(sizeof(float) * (size_t)(N * d));
  int32_t *eids = malloc(sizeof(int32_t) * (size_t)N);
  int *cluster = malloc(sizeof(int) * (size_t)T);
  float *pdata[16], *pgrad[16];
  int64_t psize[16];
  int np = 0, i, nparams;
  int64_t step, j;
  evaluation ev;
  result res;
  const int64_t every = o->steps >= 10 ? o->steps / 10 : 1;
  if (!x || !target || !y || !dy || !ey || !eids || !cluster) {
    fprintf(stderr, "train_specialize: out of memory\n");
    exit(2);
  }

  moe_config_init(&cfg);
  cfg.d_model = d;
  cfg.d_ff = o->d_ff;
  cfg.num_experts = o->experts;
  cfg.top_k = 1;
  cfg.normalize_topk = 0; /* the gate is the router probability: the router learns from the task */
  cfg.activation = MOE_ACT_RELU;
  cfg.aux_loss_coef = strcmp(mode, "lb") == 0 ? (float)o->alpha : 0.0f;
  cfg.bias_update_rate = strcmp(mode, "bias") == 0 ? (float)o->bias_rate : 0.0f;
  cfg.seed = o->seed; /* the same initial weights for every mode */
  CHECK(moe_layer_create(&cfg, &layer));
  CHECK(moe_context_create(layer, &ctx));

  /* Plain SGD writes through the layer's own parameter storage, which is float32 here (cfg.dtype is
   * the default; a bf16/f16 layer stores experts.* in 2-byte elements: see moe_layer_param_dtype). */
  nparams = moe_layer_num_params(layer);
  for (i = 0; i < nparams; ++i) {
    moe_param_info info;
    void *data = NULL, *grad = NULL;
    moe_dtype dtype = MOE_DTYPE_F32;
    int64_t n = 1;
    int dim;
    CHECK(moe_layer_param_info(layer, i, &info));
    if (!info.trainable) continue;
    if (np == 16) {
      fprintf(stderr, "train_specialize: more trainable parameters than expected\n");
      exit(2);
    }
    CHECK(moe_layer_param_dtype(layer, info.name, &dtype));
    if (dtype != MOE_DTYPE_F32) {
      fprintf(stderr, "train_specialize: %s is not stored in float32\n", info.name);
      exit(2);
    }
    CHECK(moe_layer_param_buffers(layer, info.name, &data, &grad));
    for (dim = 0; dim < info.ndim; ++dim) n *= info.shape[dim];
    pdata[np] = data;
    pgrad[np] = grad;
    psize[np] = n;
    ++np;
  }

  ev = evaluate(layer, o, ex, etarget, ecluster, ey, eids);
  res.loss0 = ev.loss;
  res.purity0 = ev.purity;
  printf("[%s] before training: eval loss %.4f, purity %.3f, exclusive %.3f, experts %d, load CV %.3f\n", mode,
         ev.loss, ev.purity, ev.exclusive, ev.experts_used, ev.load_cv);
  for (step = 0; step < o->steps; ++step) {
    moe_stats st;
    double loss;
    task_batch(t, &data, T, x, target, cluster);
    CHECK(moe_layer_zero_grad(layer));
    CHECK(moe_forward(layer, x, T, y, ctx));
    loss = mse(y, target, T, d, dy);
    if (!isfinite(loss)) {
      fprintf(stderr, "[%s] step %lld: the loss is %g\n", mode, (long long)step, loss);
      exit(1);
    }
    CHECK(moe_backward(layer, ctx, dy, NULL));
    for (i = 0; i < np; ++i)
      for (j = 0; j < psize[i]; ++j) pdata[i][j] -= (float)o->lr * pgrad[i][j];
    if (step % every == 0 || step == o->steps - 1) {
      st.struct_size = sizeof st;
      CHECK(moe_context_stats(ctx, &st));
      printf("[%s] step %4lld  loss %8.4f  aux %.4f  load CV %.3f\n", mode, (long long)step, loss,
             (double)st.aux_loss_total, (double)st.load_cv);
    }
  }
  ev = evaluate(layer, o, ex, etarget, ecluster, ey, eids);
  res.loss = ev.loss;
  res.purity = ev.purity;
  res.exclusive = ev.exclusive;
  res.experts_used = ev.experts_used;
  res.load_cv = ev.load_cv;
  {
    float *bias = malloc(sizeof(float) * (size_t)o->experts), lo, hi;
    int64_t e;
    if (!bias) {
      fprintf(stderr, "train_specialize: out of memory\n");
      exit(2);
    }
    CHECK(moe_layer_get_param(layer, "router.bias", bias, o->experts));
    lo = hi = bias[0];
    for (e = 1; e < o->experts; ++e) {
      if (bias[e] < lo) lo = bias[e];
      if (bias[e] > hi) hi = bias[e];
    }
    res.bias_spread = (double)(hi - lo);
    free(bias);
  }
  printf("[%s] after %lld steps: eval loss %.4f, purity %.3f, exclusive %.3f, experts %d, load CV %.3f\n\n",
         mode, (long long)o->steps, ev.loss, ev.purity, ev.exclusive, ev.experts_used, ev.load_cv);

  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  free(x);
  free(target);
  free(y);
  free(dy);
  free(ey);
  free(eids);
  free(cluster);
  return res;
}

static int specialised(const options *o, const result *r) {
  const int64_t want = o->experts < o->clusters ? o->experts : o->clusters;
  const int full = o->experts >= o->clusters;
  return r->purity >= o->min_purity && (!full || r->exclusive >= o->min_purity) && r->experts_used == want &&
         r->loss <= 0.5 * r->loss0;
}

int main(int argc, char **argv) {
  options o;
  task t;
  rng er;
  float *ex, *etarget;
  int *ecluster;
  result none, lb, bias;
  int ok_lb, ok_bias, ok_none, status;
  if (!parse_args(argc, argv, &o)) return 2;
  if (o.d_model > 1024) {
    fprintf(stderr, "train_specialize: --d-model at most 1024\n");
    return 2;
  }
  if (moe_version() / 100 != MOE_VERSION_NUMBER / 100)
    fprintf(stderr, "train_specialize: warning: built against libmoe %d, running with %u\n", MOE_VERSION_NUMBER,
            moe_version());
  printf("task: %lld clusters, x = c_k + noise (+ shared offset of length %g), target A_k x; d %lld\n"
         "layer: %lld ReLU experts (d_ff %lld), top-1, gate = router probability; SGD lr %g, %lld steps of %lld "
         "tokens\n\n",
         (long long)o.clusters, o.offset, (long long)o.d_model, (long long)o.experts, (long long)o.d_ff, o.lr,
         (long long)o.steps, (long long)o.tokens);
  task_init(&t, &o);
  ex = malloc(sizeof(float) * (size_t)(o.eval_tokens * o.d_model));
  etarget = malloc(sizeof(float) * (size_t)(o.eval_tokens * o.d_model));
  ecluster = malloc(sizeof(int) * (size_t)o.eval_tokens);
  if (!ex || !etarget || !ecluster) {
    fprintf(stderr, "train_specialize: out of memory\n");
    return 2;
  }
  er.s = o.seed * 31337ULL + 5;
  task_batch(&t, &er, o.eval_tokens, ex, etarget, ecluster);

  none = train(&o, &t, "none", ex, etarget, ecluster);
  lb = train(&o, &t, "lb", ex, etarget, ecluster);
  bias = train(&o, &t, "bias", ex, etarget, ecluster);

  printf("held-out tokens (%lld), after training; purity0 and loss0 before it:\n", (long long)o.eval_tokens);
  printf("%-30s %7s %7s %9s %7s %8s %8s %8s\n", "balancing", "purity0", "purity", "exclusive", "experts",
         "load CV", "loss0", "loss");
  {
    const result *rs[3] = {&none, &lb, &bias};
    char label[3][64];
    int m;
    snprintf(label[0], sizeof label[0], "none");
    snprintf(label[1], sizeof label[1], "load-balance loss (alpha %g)", o.alpha);
    snprintf(label[2], sizeof label[2], "bias balancing (u %g)", o.bias_rate);
    for (m = 0; m < 3; ++m)
      printf("%-30s %7.3f %7.3f %9.3f %7d %8.3f %8.4f %8.4f\n", label[m], rs[m]->purity0, rs[m]->purity,
             rs[m]->exclusive, rs[m]->experts_used, rs[m]->load_cv, rs[m]->loss0, rs[m]->loss);
    printf("(bias balancing left router.bias spread over %.3f)\n", bias.bias_spread);
  }

  ok_lb = specialised(&o, &lb);
  ok_bias = specialised(&o, &bias);
  ok_none = specialised(&o, &none);
  status = 0;
  if (!ok_lb) {
    printf("FAIL: with the load-balance loss the experts did not specialise\n");
    status = 1;
  }
  if (!ok_bias) {
    printf("FAIL: with bias balancing the experts did not specialise\n");
    status = 1;
  }
  if (ok_none) {
    printf("FAIL: without balancing the router did not collapse: balancing shows nothing here\n");
    status = 1;
  }
  if (status == 0)
    printf("OK: with balancing every cluster has its own expert (purity %.3f / %.3f); without it the router "
           "gives %d of %lld experts all the clusters, load CV %.3f\n",
           lb.purity, bias.purity, none.experts_used, (long long)o.experts, none.load_cv);
  task_free(&t);
  free(ex);
  free(etarget);
  free(ecluster);
  return status;
}
