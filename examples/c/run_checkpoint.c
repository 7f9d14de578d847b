/*
 * run_checkpoint: load the MoE block of a checkpoint into a libmoe layer and run it on random tokens.
 *
 *   run_checkpoint DIR_OR_FILE [--family F] [--prefix P] [--preset NAME] [--d-model D] [--d-ff F]
 *                  [--experts E] [--top-k K] [--shared S] [--d-ff-shared W] [--tokens T]
 *                  [--dtype f32|bf16|f16] [--seed S]
 *
 * DIR_OR_FILE is a safetensors file, a model.safetensors.index.json, or a directory holding either.
 * --family names the checkpoint's layout (libmoe, mixtral, qwen2-moe, qwen3-moe, olmoe, deepseek-v3,
 * switch, gpt-oss) and --prefix the block (e.g. model.layers.0.block_sparse_moe). The layer's shape comes
 * from --preset (the routing recipe of the family) and the widths, which must match the checkpoint's
 * config.json (hidden_size, intermediate_size or moe_intermediate_size, num_local_experts, ...).
 *
 * Prints the output's statistics and the routing of the tokens: per-expert loads as a bar chart,
 * dropped slots and the auxiliary losses. Exits 1 on any libmoe error or a non-finite output.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moe/moe.h>

typedef struct options {
  const char *path, *family, *prefix, *preset;
  int64_t d_model, d_ff, experts, top_k, shared, d_ff_shared, tokens;
  moe_dtype dtype;
  uint64_t seed;
} options;

static void usage(FILE *f) {
  fprintf(f,
          "usage: run_checkpoint DIR_OR_FILE [--family F] [--prefix P] [--preset NAME] [--d-model D]\n"
          "                      [--d-ff F] [--experts E] [--top-k K] [--shared S] [--d-ff-shared W]\n"
          "                      [--tokens T] [--dtype f32|bf16|f16] [--seed S]\n"
          "defaults: --family libmoe --preset mixtral --tokens 64 --dtype f32 --seed 1; widths are required\n");
}

static int parse_i64(const char *flag, const char *s, int64_t *out) {
  char *end = NULL;
  long long v;
  if (s == NULL) {
    fprintf(stderr, "run_checkpoint: %s needs a value\n", flag);
    return 0;
  }
  v = strtoll(s, &end, 10);
  if (*s == '\0' || *end != '\0') {
    fprintf(stderr, "run_checkpoint: %s expects an integer, got '%s'\n", flag, s);
    return 0;
  }
  *out = (int64_t)v;
  return 1;
}

static int parse(int argc, char **argv, options *o) {
  int i;
  memset(o, 0, sizeof *o);
  o->family = "libmoe";
  o->preset = "mixtral";
  o->tokens = 64;
  o->seed = 1;
  o->experts = -1;
  o->top_k = -1;
  o->shared = -1;
  o->dtype = MOE_DTYPE_F32;
  for (i = 1; i < argc; ++i) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int64_t seed = 0;
    int ok = 1;
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      exit(0);
    } else if (a[0] != '-') {
      o->path = a;
      continue;
    } else if (strcmp(a, "--family") == 0) {
      o->family = v;
    } else if (strcmp(a, "--prefix") == 0) {
      o->prefix = v;
    } else if (strcmp(a, "--preset") == 0) {
      o->preset = v;
    } else if (strcmp(a, "--dtype") == 0) {
      if (v && strcmp(v, "f32") == 0) o->dtype = MOE_DTYPE_F32;
      else if (v && strcmp(v, "bf16") == 0) o->dtype = MOE_DTYPE_BF16;
      else if (v && strcmp(v, "f16") == 0) o->dtype = MOE_DTYPE_F16;
      else ok = 0;
    } else if (strcmp(a, "--d-model") == 0) ok = parse_i64(a, v, &o->d_model);
    else if (strcmp(a, "--d-ff") == 0) ok = parse_i64(a, v, &o->d_ff);
    else if (strcmp(a, "--experts") == 0) ok = parse_i64(a, v, &o->experts);
    else if (strcmp(a, "--top-k") == 0) ok = parse_i64(a, v, &o->top_k);
    else if (strcmp(a, "--shared") == 0) ok = parse_i64(a, v, &o->shared);
    else if (strcmp(a, "--d-ff-shared") == 0) ok = parse_i64(a, v, &o->d_ff_shared);
    else if (strcmp(a, "--tokens") == 0) ok = parse_i64(a, v, &o->tokens);
    else if (strcmp(a, "--seed") == 0) {
      ok = parse_i64(a, v, &seed);
      o->seed = (uint64_t)seed;
    } else {
      fprintf(stderr, "run_checkpoint: unknown option %s\n", a);
      ok = 0;
    }
    if (!ok || v == NULL) {
      if (ok) fprintf(stderr, "run_checkpoint: %s needs a value\n", a);
      usage(stderr);
      return 0;
    }
    ++i;
  }
  if (!o->path || o->d_model <= 0 || o->d_ff <= 0 || o->tokens < 0) {
    fprintf(stderr, "run_checkpoint: a checkpoint path, --d-model and --d-ff are required\n");
    usage(stderr);
    return 0;
  }
  return 1;
}

/* splitmix64, mapped to a standard normal by Box-Muller: random tokens, never all zero. */
static uint64_t next_u64(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
static float normal(uint64_t *s) {
  const double u1 = ((next_u64(s) >> 11) + 1.0) / 9007199254740993.0, u2 = (next_u64(s) >> 11) / 9007199254740992.0;
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* float32 <-> the 16-bit storage of the layer's activations (round to nearest even). */
static uint16_t narrow(float f, moe_dtype dt) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (dt == MOE_DTYPE_BF16) return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  {
    /* float16 through the exponent rebias; the tokens here are well inside its range. */
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t r;
    if (a < 0x38800000u) return (uint16_t)sign; /* below float16's normal range: zero is close enough */
    r = a - (112u << 23);
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
  }
}
static float widen(uint16_t h, moe_dtype dt) {
  uint32_t u;
  float f;
  if (dt == MOE_DTYPE_BF16) {
    u = (uint32_t)h << 16;
  } else {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return (sign ? -1.0f : 1.0f) * (float)m * 5.9604644775390625e-8f;
    u = e == 0x1f ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
  }
  memcpy(&f, &u, 4);
  return f;
}

static int fail(const char *what, moe_status s) {
  fprintf(stderr, "run_checkpoint: %s failed: %s: %s\n", what, moe_status_name(s), moe_last_error());
  return 1;
}

int main(int argc, char **argv) {
  options o;
  moe_config cfg;
  moe_layer *layer = NULL;
  moe_context *ctx = NULL;
  moe_stats st;
  moe_status s;
  float *x = NULL, *y = NULL;
  uint16_t *xh = NULL, *yh = NULL;
  int64_t *counts = NULL, i, n, maxc = 1, e;
  double sum = 0, sq = 0, mn = INFINITY, mx = -INFINITY;
  uint64_t rng;
  int rc = 1, lowp;

  if (!parse(argc, argv, &o)) return 2;
  if ((s = moe_config_preset(&cfg, o.preset)) != MOE_OK) return fail("moe_config_preset", s);
  cfg.d_model = o.d_model;
  cfg.d_ff = o.d_ff;
  if (o.experts > 0) cfg.num_experts = o.experts;
  if (o.top_k > 0) cfg.top_k = o.top_k;
  if (o.shared >= 0) cfg.num_shared_experts = o.shared;
  if (cfg.num_shared_experts == 0) cfg.shared_gate = 0;
  cfg.d_ff_shared = o.d_ff_shared;
  cfg.dtype = o.dtype;
  if ((s = moe_layer_create(&cfg, &layer)) != MOE_OK) return fail("moe_layer_create", s);
  if ((s = moe_layer_load(layer, o.path, o.prefix, o.family)) != MOE_OK) {
    fail("moe_layer_load", s);
    goto done;
  }
  printf("loaded %s (family %s, prefix %s): d_model %lld, d_ff %lld, %lld experts, top-%lld, %lld shared\n",
         o.path, o.family, o.prefix ? o.prefix : "(none)", (long long)cfg.d_model, (long long)cfg.d_ff,
         (long long)cfg.num_experts, (long long)cfg.top_k, (long long)cfg.num_shared_experts);

  n = o.tokens * o.d_model;
  lowp = o.dtype != MOE_DTYPE_F32;
  x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
  y = malloc((size_t)(n > 0 ? n : 1) * sizeof *y);
  xh = malloc((size_t)(n > 0 ? n : 1) * sizeof *xh);
  yh = malloc((size_t)(n > 0 ? n : 1) * sizeof *yh);
  counts = malloc((size_t)cfg.num_experts * sizeof *counts);
  if (!x || !y || !xh || !yh || !counts) {
    fprintf(stderr, "run_checkpoint: out of memory\n");
    goto done;
  }
  rng = o.seed;
  for (i = 0; i < n; ++i) {
    x[i] = normal(&rng);
    if (lowp) xh[i] = narrow(x[i], o.dtype);
  }
  if ((s = moe_context_create(layer, &ctx)) != MOE_OK) {
    fail("moe_context_create", s);
    goto done;
  }
  /* Inference output, then the routing of the same tokens (moe_route: no noise, no bias update). */
  if ((s = moe_forward(layer, lowp ? (const void *)xh : x, o.tokens, lowp ? (void *)yh : y, NULL)) != MOE_OK ||
      (s = moe_route(layer, lowp ? (const void *)xh : x, o.tokens, ctx)) != MOE_OK) {
    fail("moe_forward/moe_route", s);
    goto done;
  }
  for (i = 0; i < n; ++i) {
    const double v = lowp ? widen(yh[i], o.dtype) : y[i];
    if (!isfinite(v)) {
      fprintf(stderr, "run_checkpoint: output element %lld is not finite\n", (long long)i);
      goto done;
    }
    sum += v;
    sq += v * v;
    if (v < mn) mn = v;
    if (v > mx) mx = v;
  }
  if (n > 0)
    printf("output [%lld x %lld]: mean %.6g, std %.6g, rms %.6g, min %.6g, max %.6g\n", (long long)o.tokens,
           (long long)o.d_model, sum / n, sqrt(fmax(sq / n - (sum / n) * (sum / n), 0.0)), sqrt(sq / n), mn, mx);

  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  if ((s = moe_context_stats(ctx, &st)) != MOE_OK || (s = moe_context_expert_counts(ctx, counts)) != MOE_OK) {
    fail("moe_context_stats", s);
    goto done;
  }
  printf("routing: %lld tokens, %lld slots, %lld dropped; load balance %.4f (1 = even), z-loss %.4g, "
         "load cv %.3f, max/mean load %.3f\n",
         (long long)st.num_tokens, (long long)st.num_slots, (long long)st.dropped_slots, st.load_balance_loss,
         st.z_loss, st.load_cv, st.max_load_ratio);
  for (e = 0; e < cfg.num_experts; ++e)
    if (counts[e] > maxc) maxc = counts[e];
  for (e = 0; e < cfg.num_experts; ++e) {
    int bar = (int)(40 * counts[e] / maxc), b;
    printf("  expert %3lld %6lld |", (long long)e, (long long)counts[e]);
    for (b = 0; b < bar; ++b) putchar('#');
    putchar('\n');
  }
  rc = 0;
done:
  free(x);
  free(y);
  free(xh);
  free(yh);
  free(counts);
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  return rc;
}
