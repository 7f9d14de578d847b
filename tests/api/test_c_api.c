/* A plain C11 user of libmoe: includes only <moe/moe.h>, is compiled as C, and exercises a whole
 * training step (forward, backward), routing, statistics and parameters. Exits non-zero on any
 * failure, printing every failed check. */
#include <moe/moe.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failures = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
      ++g_failures;                                                                  \
    }                                                                                \
  } while (0)

#define CHECK_OK(call)                                                                          \
  do {                                                                                          \
    moe_status s_ = (call);                                                                     \
    if (s_ != MOE_OK) {                                                                         \
      fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call, moe_status_name(s_), \
              moe_last_error());                                                                \
      ++g_failures;                                                                             \
    }                                                                                           \
  } while (0)

static int all_finite(const float *v, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i)
    if (!isfinite(v[i])) return 0;
  return 1;
}

static int any_nonzero(const float *v, size_t n) {
  size_t i;
  for (i = 0; i < n; ++i)
    if (v[i] != 0.0f) return 1;
  return 0;
}

/* Deterministic inputs in [-1, 1]. */
static void fill(float *v, size_t n, unsigned seed) {
  size_t i;
  unsigned s = seed * 2654435761u + 1u;
  for (i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    v[i] = (float)((s >> 8) & 0xffff) / 32768.0f - 1.0f;
  }
}

static int64_t numel(const moe_param_info *p) {
  int64_t n = 1;
  int i;
  for (i = 0; i < p->ndim; ++i) n *= p->shape[i];
  return n;
}

static void run_config(const char *label, moe_config *cfg) {
  const int64_t T = 37, d = cfg->d_model, E = cfg->num_experts, k = cfg->top_k;
  moe_layer *layer = NULL;
  moe_context *ctx = NULL, *rctx = NULL;
  float *x = malloc(sizeof(float) * (size_t)(T * d));
  float *y = malloc(sizeof(float) * (size_t)(T * d));
  float *y2 = malloc(sizeof(float) * (size_t)(T * d));
  float *dy = malloc(sizeof(float) * (size_t)(T * d));
  float *dx = malloc(sizeof(float) * (size_t)(T * d));
  int64_t *counts = malloc(sizeof(int64_t) * (size_t)E);
  int32_t *ids = malloc(sizeof(int32_t) * (size_t)(T * k));
  float *weights = malloc(sizeof(float) * (size_t)(T * k));
  moe_stats st;
  moe_config got;
  int64_t t, j, e, sum, count = -1;
  int np, i;

  fprintf(stderr, "-- %s\n", label);
  if (!x || !y || !y2 || !dy || !dx || !counts || !ids || !weights) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  fill(x, (size_t)(T * d), 1);
  fill(dy, (size_t)(T * d), 2);

  CHECK_OK(moe_layer_create(cfg, &layer));
  if (!layer) {
    ++g_failures;
    goto done;
  }

  /* The effective configuration comes back. */
  memset(&got, 0, sizeof got);
  got.struct_size = sizeof got;
  CHECK_OK(moe_layer_get_config(layer, &got));
  CHECK(got.struct_size == sizeof(moe_config));
  CHECK(got.d_model == d && got.d_ff == cfg->d_ff && got.num_experts == E && got.top_k == k);
  CHECK(got.activation == cfg->activation && got.seed == cfg->seed);
  CHECK(got.num_shared_experts == cfg->num_shared_experts);
  if (cfg->num_shared_experts > 0) /* d_ff_shared resolved: 0 means d_ff */
    CHECK(got.d_ff_shared == (cfg->d_ff_shared > 0 ? cfg->d_ff_shared : cfg->d_ff));
  CHECK_OK(moe_layer_set_stream(layer, NULL));

  /* Inference forward. */
  CHECK_OK(moe_forward(layer, x, T, y, NULL));
  CHECK(all_finite(y, (size_t)(T * d)));
  CHECK(any_nonzero(y, (size_t)(T * d)));
  CHECK_OK(moe_forward(layer, x, 0, NULL, NULL)); /* no tokens */

  /* Training forward and backward. */
  CHECK_OK(moe_context_create(layer, &ctx));
  CHECK_OK(moe_forward(layer, x, T, y2, ctx));
  CHECK(all_finite(y2, (size_t)(T * d)));
  CHECK_OK(moe_layer_zero_grad(layer));
  CHECK_OK(moe_backward(layer, ctx, dy, dx));
  CHECK(all_finite(dx, (size_t)(T * d)));
  CHECK(any_nonzero(dx, (size_t)(T * d)));
  CHECK_OK(moe_backward(layer, ctx, dy, NULL)); /* dx not wanted; gradients accumulate again */

  /* Statistics. */
  memset(&st, 0xff, sizeof st);
  st.struct_size = sizeof st;
  CHECK_OK(moe_context_stats(ctx, &st));
  CHECK(st.struct_size == sizeof(moe_stats));
  CHECK(st.num_tokens == T);
  CHECK(st.num_slots == T * k);
  CHECK(st.dropped_slots >= 0 && st.dropped_slots <= st.num_slots);
  CHECK(cfg->capacity_factor > 0 || st.dropped_slots == 0);
  CHECK(isfinite(st.load_balance_loss) && st.load_balance_loss > 0.0f);
  CHECK(isfinite(st.z_loss) && st.z_loss >= 0.0f);
  CHECK(isfinite(st.importance_loss) && st.importance_loss >= 0.0f);
  CHECK(isfinite(st.load_loss) && st.load_loss >= 0.0f);
  CHECK(isfinite(st.aux_loss_total) && st.aux_loss_total >= 0.0f);
  CHECK(isfinite(st.load_cv) && st.load_cv >= 0.0f);
  CHECK(isfinite(st.max_load_ratio) && st.max_load_ratio >= 1.0f);

  CHECK_OK(moe_context_expert_counts(ctx, counts));
  sum = 0;
  for (e = 0; e < E; ++e) {
    CHECK(counts[e] >= 0);
    if (cfg->capacity_factor > 0) CHECK(counts[e] <= (int64_t)ceil(cfg->capacity_factor * (double)(T * k) / (double)E));
    sum += counts[e];
  }
  CHECK(sum == st.num_slots - st.dropped_slots);

  CHECK_OK(moe_context_topk(ctx, ids, weights));
  for (t = 0; t < T; ++t)
    for (j = 0; j < k; ++j) {
      int32_t id = ids[t * k + j];
      float w = weights[t * k + j];
      int64_t j2;
      CHECK(id == -1 || (id >= 0 && id < E));
      CHECK(isfinite(w) && w >= 0.0f);
      if (id == -1) CHECK(w == 0.0f);
      for (j2 = 0; j2 < j; ++j2) CHECK(id == -1 || ids[t * k + j2] != id);
    }
  CHECK_OK(moe_context_topk(ctx, NULL, NULL));

  CHECK_OK(moe_context_assignments(ctx, 0, NULL, NULL, NULL, &count));
  CHECK(count == sum);
  if (count > 0) {
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)count);
    int32_t *ex = malloc(sizeof(int32_t) * (size_t)count);
    float *wt = malloc(sizeof(float) * (size_t)count);
    int64_t c2 = -1, r;
    CHECK_OK(moe_context_assignments(ctx, count, tok, ex, wt, &c2));
    CHECK(c2 == count);
    for (r = 0; r < c2; ++r) {
      CHECK(tok[r] >= 0 && tok[r] < T);
      CHECK(ex[r] >= 0 && ex[r] < E);
      CHECK(isfinite(wt[r]));
      if (r > 0) CHECK(ex[r - 1] < ex[r] || (ex[r - 1] == ex[r] && tok[r - 1] < tok[r])); /* expert, then token */
    }
    free(tok);
    free(ex);
    free(wt);
  }

  /* Routing only. */
  CHECK_OK(moe_context_create(layer, &rctx));
  CHECK_OK(moe_route(layer, x, T, rctx));
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK_OK(moe_context_stats(rctx, &st));
  CHECK(st.num_tokens == T && st.num_slots == T * k);
  CHECK(moe_backward(layer, rctx, dy, dx) == MOE_ERR_STATE);

  /* Parameters: names, shapes, values and gradients. */
  np = moe_layer_num_params(layer);
  CHECK(np >= 3);
  for (i = 0; i < np; ++i) {
    moe_param_info info;
    float *host, *grad;
    void *data = NULL, *gbuf = NULL;
    moe_dtype dtype = MOE_DTYPE_BF16;
    int64_t n, q;
    memset(&info, 0, sizeof info);
    CHECK_OK(moe_layer_param_info(layer, i, &info));
    CHECK(info.name != NULL && info.name[0] != '\0');
    if (!info.name) continue;
    CHECK(info.ndim >= 1 && info.ndim <= 3);
    n = numel(&info);
    CHECK(n > 0);
    if (strcmp(info.name, "router.weight") == 0) CHECK(info.ndim == 2 && info.shape[0] == E && info.shape[1] == d);
    if (strcmp(info.name, "router.bias") == 0) CHECK(info.ndim == 1 && info.shape[0] == E && !info.trainable);
    if (strcmp(info.name, "experts.w1") == 0)
      CHECK(info.ndim == 3 && info.shape[0] == E && info.shape[1] == cfg->d_ff && info.shape[2] == d);
    if (strcmp(info.name, "experts.w2") == 0)
      CHECK(info.ndim == 3 && info.shape[0] == E && info.shape[1] == d && info.shape[2] == cfg->d_ff);
    host = malloc(sizeof(float) * (size_t)n);
    grad = malloc(sizeof(float) * (size_t)n);
    CHECK_OK(moe_layer_get_param(layer, info.name, host, n));
    CHECK(all_finite(host, (size_t)n));
    CHECK_OK(moe_layer_param_buffers(layer, info.name, &data, &gbuf));
    CHECK(data != NULL);
    /* These are float32 layers: the storage holds n floats (2-byte elements in a bf16/f16 layer). */
    CHECK_OK(moe_layer_param_dtype(layer, info.name, &dtype));
    CHECK(dtype == MOE_DTYPE_F32);
    if (data && dtype == MOE_DTYPE_F32) CHECK(memcmp(data, host, sizeof(float) * (size_t)n) == 0);
    if (info.trainable) {
      CHECK(gbuf != NULL);
      CHECK_OK(moe_layer_get_grad(layer, info.name, grad, n));
      CHECK(all_finite(grad, (size_t)n));
      if (strcmp(info.name, "router.weight") == 0 || strcmp(info.name, "experts.w2") == 0)
        CHECK(any_nonzero(grad, (size_t)n));
    } else {
      CHECK(gbuf == NULL);
      CHECK(moe_layer_get_grad(layer, info.name, grad, n) == MOE_ERR_INVALID_ARGUMENT);
    }
    /* A set of the same values round-trips. */
    for (q = 0; q < n; ++q) host[q] *= 0.5f;
    CHECK_OK(moe_layer_set_param(layer, info.name, host, n));
    CHECK_OK(moe_layer_get_param(layer, info.name, grad, n));
    CHECK(memcmp(host, grad, sizeof(float) * (size_t)n) == 0);
    free(host);
    free(grad);
  }
  CHECK_OK(moe_layer_zero_grad(layer));
  {
    float *g = malloc(sizeof(float) * (size_t)(E * d));
    CHECK_OK(moe_layer_get_grad(layer, "router.weight", g, E * d));
    CHECK(!any_nonzero(g, (size_t)(E * d)));
    free(g);
  }
  /* The layer still computes after the parameters changed. */
  CHECK_OK(moe_forward(layer, x, T, y, NULL));
  CHECK(all_finite(y, (size_t)(T * d)));

done:
  moe_context_destroy(rctx);
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  free(x);
  free(y);
  free(y2);
  free(dy);
  free(dx);
  free(counts);
  free(ids);
  free(weights);
}

int main(void) {
  moe_config cfg;
  moe_status s;

  CHECK(moe_version() == MOE_VERSION_NUMBER);
  CHECK(strcmp(moe_status_name(MOE_OK), "MOE_OK") == 0);
  CHECK(strcmp(moe_status_name(MOE_ERR_STATE), "MOE_ERR_STATE") == 0);
  CHECK(moe_last_error() != NULL);

  moe_config_init(NULL); /* no-op */
  moe_layer_destroy(NULL);
  moe_context_destroy(NULL);

  /* An error sets the message; a later success does not clear it. */
  s = moe_layer_create(NULL, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT);
  CHECK(strlen(moe_last_error()) > 0);

  moe_config_init(&cfg);
  CHECK(cfg.struct_size == sizeof(moe_config));
  cfg.d_model = 16;
  cfg.d_ff = 24;
  cfg.seed = 7;
  run_config("defaults (SwiGLU, top-2 softmax, dropless)", &cfg);

  moe_config_init(&cfg);
  cfg.d_model = 12;
  cfg.d_ff = 20;
  cfg.num_experts = 6;
  cfg.top_k = 1;
  cfg.activation = MOE_ACT_RELU;
  cfg.capacity_factor = 1.0f;
  cfg.z_loss_coef = 0.001f;
  run_config("top-1 ReLU with capacity", &cfg);

  moe_config_init(&cfg);
  cfg.d_model = 8;
  cfg.d_ff = 16;
  cfg.num_experts = 8;
  cfg.top_k = 3;
  cfg.activation = MOE_ACT_GEGLU;
  cfg.score = MOE_SCORE_SIGMOID;
  cfg.num_groups = 4;
  cfg.topk_groups = 2;
  cfg.routed_scale = 2.5f;
  cfg.num_shared_experts = 1;
  cfg.d_ff_shared = 12;
  cfg.shared_gate = 1;
  cfg.bias_update_rate = 0.001f;
  cfg.capacity_factor = 1.5f;
  cfg.drop_policy = MOE_DROP_PROBS;
  cfg.importance_loss_coef = 0.01f;
  run_config("sigmoid, groups, shared expert with gate, probs dropping", &cfg);

  s = moe_config_preset(&cfg, "mixtral");
  CHECK(s == MOE_OK);
  cfg.d_model = 16;
  cfg.d_ff = 32;
  run_config("mixtral preset", &cfg);

  s = moe_config_preset(&cfg, "qwen2-moe");
  CHECK(s == MOE_OK);
  cfg.d_model = 16;
  cfg.d_ff = 8;
  run_config("qwen2-moe preset (4 gated shared experts, d_ff_shared from d_ff)", &cfg);

  /* The same configuration by name, from C: every field the table lists, and a layer from text. */
  {
    moe_config named;
    char text[MOE_CONFIG_VALUE_MAX];
    int i, n = moe_config_num_fields();
    moe_config_init(&named);
    CHECK(n > 20);
    for (i = 0; i < n; ++i) {
      moe_config_field_info f;
      memset(&f, 0, sizeof f);
      f.struct_size = sizeof f;
      CHECK_OK(moe_config_field(i, &f));
      CHECK_OK(moe_config_get(&named, f.name, text, sizeof text));
      CHECK(strcmp(text, f.default_value) == 0);
    }
    CHECK_OK(moe_config_set(&named, "d_model", "16"));
    CHECK_OK(moe_config_set(&named, "d_ff", "32"));
    CHECK_OK(moe_config_set(&named, "activation", "geglu"));
    CHECK_OK(moe_config_set(&named, "dtype", "bf16"));
    CHECK(named.dtype == MOE_DTYPE_BF16);
    CHECK_OK(moe_config_set(&named, "dtype", "FP32")); /* run_config passes float32 activations */
    CHECK_OK(moe_config_set(&named, "capacity_factor", "1.25"));
    CHECK(named.activation == MOE_ACT_GEGLU && named.dtype == MOE_DTYPE_F32 && named.capacity_factor == 1.25f);
    CHECK(moe_config_set(&named, "activation", "swish") == MOE_ERR_INVALID_ARGUMENT);
    CHECK(strstr(moe_last_error(), "'swiglu'") != NULL);
    CHECK(named.activation == MOE_ACT_GEGLU);
    CHECK(moe_config_num_presets() >= 6 && strcmp(moe_config_preset_name(0), "mixtral") == 0);
    CHECK(moe_config_preset_description(0) != NULL && moe_config_preset_name(-1) == NULL);
    run_config("set by name: geglu, capacity 1.25", &named);
  }

  if (g_failures) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  fprintf(stderr, "all C API checks passed\n");
  return 0;
}
