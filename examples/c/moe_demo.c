/*
 * moe_demo: one training step of a libmoe layer on random data.
 *
 * Creates a layer, runs a training forward on random tokens, takes the loss
 * L = 1/(2T) * sum_t |y_t|^2, runs the backward with dy = y / T, and prints the routing summary,
 * a bar chart of the load of each expert and a few gradient norms.
 *
 *   moe_demo [--device cpu|cuda] [--tokens T] [--experts E] [--top-k K] [--d-model D] [--d-ff F] [--seed S]
 *
 * With --device cuda the activations must live on the GPU. The demo only depends on libmoe, so it
 * reaches the CUDA runtime (cudaMalloc/cudaMemcpy/cudaFree) through dlopen; libmoe itself says why
 * a CUDA layer cannot be created when the CUDA module or a device is missing.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moe/moe.h>

/* ---- options ----------------------------------------------------------------------------- */
typedef struct options {
  moe_device device;
  int64_t tokens, experts, top_k, d_model, d_ff;
  uint64_t seed;
} options;

static void usage(FILE *f) {
  fprintf(f,
          "usage: moe_demo [--device cpu|cuda] [--tokens T] [--experts E] [--top-k K]\n"
          "                [--d-model D] [--d-ff F] [--seed S]\n"
          "defaults: --device cpu --tokens 512 --experts 8 --top-k 2 --d-model 64 --d-ff 128 --seed 42\n");
}

static int parse_i64(const char *flag, const char *s, int64_t *out) {
  char *end = NULL;
  long long v;
  if (s == NULL) {
    fprintf(stderr, "moe_demo: %s needs a value\n", flag);
    return 0;
  }
  v = strtoll(s, &end, 10);
  if (*s == '\0' || *end != '\0') {
    fprintf(stderr, "moe_demo: %s expects an integer, got '%s'\n", flag, s);
    return 0;
  }
  *out = (int64_t)v;
  return 1;
}

static int parse_args(int argc, char **argv, options *o) {
  int i;
  o->device = MOE_DEVICE_CPU;
  o->tokens = 512;
  o->experts = 8;
  o->top_k = 2;
  o->d_model = 64;
  o->d_ff = 128;
  o->seed = 42;
  for (i = 1; i < argc; ++i) {
    const char *flag = argv[i];
    const char *val = NULL;
    char name[64];
    const char *eq = strchr(flag, '=');
    if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (eq != NULL && (size_t)(eq - flag) < sizeof name) { /* --flag=value */
      memcpy(name, flag, (size_t)(eq - flag));
      name[eq - flag] = '\0';
      val = eq + 1;
    } else {
      snprintf(name, sizeof name, "%s", flag);
      val = i + 1 < argc ? argv[++i] : NULL;
    }
    if (strcmp(name, "--device") == 0) {
      if (val != NULL && strcmp(val, "cpu") == 0) o->device = MOE_DEVICE_CPU;
      else if (val != NULL && strcmp(val, "cuda") == 0) o->device = MOE_DEVICE_CUDA;
      else {
        fprintf(stderr, "moe_demo: --device expects cpu or cuda, got '%s'\n", val ? val : "");
        return 0;
      }
    } else if (strcmp(name, "--tokens") == 0) {
      if (!parse_i64(name, val, &o->tokens)) return 0;
    } else if (strcmp(name, "--experts") == 0) {
      if (!parse_i64(name, val, &o->experts)) return 0;
    } else if (strcmp(name, "--top-k") == 0) {
      if (!parse_i64(name, val, &o->top_k)) return 0;
    } else if (strcmp(name, "--d-model") == 0) {
      if (!parse_i64(name, val, &o->d_model)) return 0;
    } else if (strcmp(name, "--d-ff") == 0) {
      if (!parse_i64(name, val, &o->d_ff)) return 0;
    } else if (strcmp(name, "--seed") == 0) {
      int64_t s;
      if (!parse_i64(name, val, &s)) return 0;
      o->seed = (uint64_t)s;
    } else {
      fprintf(stderr, "moe_demo: unknown option '%s'\n", flag);
      usage(stderr);
      return 0;
    }
  }
  if (o->tokens < 0) {
    fprintf(stderr, "moe_demo: --tokens must be >= 0, got %lld\n", (long long)o->tokens);
    return 0;
  }
  return 1;
}

/* ---- a small deterministic PRNG (splitmix64) ---------------------------------------------- */
static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float rng_uniform(uint64_t *s) { return (float)((double)(rng_next(s) >> 11) * 0x1.0p-52 - 1.0); }

/* ---- errors ------------------------------------------------------------------------------- */
static void report(const char *what, moe_status st) {
  fprintf(stderr, "moe_demo: %s failed: %s: %s\n", what, moe_status_name(st), moe_last_error());
}

#define CHECK(call)          \
  do {                       \
    moe_status st_ = (call); \
    if (st_ != MOE_OK) {     \
      report(#call, st_);    \
      goto fail;             \
    }                        \
  } while (0)

/* ---- device memory: host malloc, or the CUDA runtime reached through dlopen ----------------- */
typedef int (*cuda_malloc_fn)(void **, size_t);
typedef int (*cuda_free_fn)(void *);
typedef int (*cuda_memcpy_fn)(void *, const void *, size_t, int);
typedef const char *(*cuda_error_string_fn)(int);

typedef struct device_mem {
  int cuda;
  void *lib;
  cuda_malloc_fn malloc_;
  cuda_free_fn free_;
  cuda_memcpy_fn memcpy_;
  cuda_error_string_fn error_string;
} device_mem;

enum { CUDA_MEMCPY_H2D = 1, CUDA_MEMCPY_D2H = 2 };

static int device_mem_open(device_mem *m, moe_device device) {
  static const char *const names[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"};
  size_t i;
  memset(m, 0, sizeof *m);
  if (device != MOE_DEVICE_CUDA) return 1;
  m->cuda = 1;
  for (i = 0; i < sizeof names / sizeof names[0] && m->lib == NULL; ++i) m->lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
  if (m->lib == NULL) {
    fprintf(stderr, "moe_demo: CUDA is unavailable: the CUDA runtime library (libcudart.so) could not be loaded: %s\n",
            dlerror());
    return 0;
  }
  *(void **)&m->malloc_ = dlsym(m->lib, "cudaMalloc");
  *(void **)&m->free_ = dlsym(m->lib, "cudaFree");
  *(void **)&m->memcpy_ = dlsym(m->lib, "cudaMemcpy");
  *(void **)&m->error_string = dlsym(m->lib, "cudaGetErrorString");
  if (!m->malloc_ || !m->free_ || !m->memcpy_ || !m->error_string) {
    fprintf(stderr, "moe_demo: CUDA is unavailable: libcudart lacks cudaMalloc/cudaFree/cudaMemcpy\n");
    return 0;
  }
  return 1;
}

static void *dev_alloc(device_mem *m, size_t bytes) {
  void *p = NULL;
  if (bytes == 0) bytes = 1;
  if (!m->cuda) return malloc(bytes);
  {
    int e = m->malloc_(&p, bytes);
    if (e != 0) {
      fprintf(stderr, "moe_demo: cudaMalloc(%zu bytes) failed: %s\n", bytes, m->error_string(e));
      return NULL;
    }
  }
  return p;
}

static void dev_free(device_mem *m, void *p) {
  if (p == NULL) return;
  if (m->cuda) m->free_(p);
  else free(p);
}

/* copy bytes between host and the layer's device; to_device selects the direction */
static int dev_copy(device_mem *m, void *dst, const void *src, size_t bytes, int to_device) {
  if (bytes == 0) return 1;
  if (!m->cuda) {
    memcpy(dst, src, bytes);
    return 1;
  }
  {
    int e = m->memcpy_(dst, src, bytes, to_device ? CUDA_MEMCPY_H2D : CUDA_MEMCPY_D2H);
    if (e != 0) {
      fprintf(stderr, "moe_demo: cudaMemcpy failed: %s\n", m->error_string(e));
      return 0;
    }
  }
  return 1;
}

/* ---- output helpers ----------------------------------------------------------------------- */
static double l2norm(const float *v, int64_t n) {
  double s = 0.0;
  int64_t i;
  for (i = 0; i < n; ++i) s += (double)v[i] * (double)v[i];
  return sqrt(s);
}

static int all_finite(const float *v, int64_t n) {
  int64_t i;
  for (i = 0; i < n; ++i)
    if (!isfinite(v[i])) return 0;
  return 1;
}

/* A horizontal bar of width value/max * width cells, drawn with eighth blocks. */
static void print_bar(double value, double max, int width) {
  static const char *const eighths[] = {"", "\u258F", "\u258E", "\u258D", "\u258C", "\u258B", "\u258A", "\u2589"};
  int cells = max > 0.0 ? (int)lround(value / max * width * 8.0) : 0;
  int full = cells / 8, rest = cells % 8, used = full + (rest > 0), i;
  for (i = 0; i < full; ++i) fputs("\u2588", stdout);
  fputs(eighths[rest], stdout);
  for (i = used; i < width; ++i) fputc(' ', stdout);
}

static void print_load_chart(const int64_t *counts, int64_t experts, int64_t slots) {
  int64_t e, max = 0;
  double mean = experts > 0 ? (double)slots / (double)experts : 0.0;
  for (e = 0; e < experts; ++e)
    if (counts[e] > max) max = counts[e];
  printf("\nper-expert load (kept slots; perfectly balanced = %.1f each)\n", mean);
  for (e = 0; e < experts; ++e) {
    printf("  expert %3lld \u2502", (long long)e);
    print_bar((double)counts[e], (double)max, 40);
    printf("\u2502 %6lld  %5.1f%%\n", (long long)counts[e], slots > 0 ? 100.0 * (double)counts[e] / (double)slots : 0.0);
  }
}

/* ---- main --------------------------------------------------------------------------------- */
int main(int argc, char **argv) {
  options o;
  moe_config cfg;
  moe_layer *layer = NULL;
  moe_context *ctx = NULL;
  moe_stats stats;
  device_mem mem;
  float *hx = NULL, *hy = NULL, *hdx = NULL, *grad = NULL;
  void *x = NULL, *y = NULL, *dy = NULL, *dx = NULL;
  int64_t *counts = NULL;
  int64_t i, n, kept = 0, max_grad = 0;
  int p, np, rc = 1;
  uint64_t rng;
  double loss;

  memset(&mem, 0, sizeof mem);
  if (!parse_args(argc, argv, &o)) return 1;
  if (moe_version() != MOE_VERSION_NUMBER)
    printf("note: built against libmoe %d but running with %u\n", MOE_VERSION_NUMBER, moe_version());

  moe_config_init(&cfg);
  cfg.d_model = o.d_model;
  cfg.d_ff = o.d_ff;
  cfg.num_experts = o.experts;
  cfg.top_k = o.top_k;
  cfg.device = o.device;
  cfg.seed = o.seed;
  cfg.z_loss_coef = 0.001f;

  {
    moe_status st = moe_layer_create(&cfg, &layer);
    if (st != MOE_OK) {
      if (o.device == MOE_DEVICE_CUDA && (st == MOE_ERR_UNSUPPORTED || st == MOE_ERR_DEVICE)) {
        fprintf(stderr, "moe_demo: CUDA is unavailable (%s): %s\n", moe_status_name(st), moe_last_error());
        fprintf(stderr, "moe_demo: run with --device cpu to use the CPU backend\n");
      } else {
        report("moe_layer_create", st);
      }
      return 1;
    }
  }
  if (!device_mem_open(&mem, o.device)) goto fail;
  CHECK(moe_context_create(layer, &ctx));

  printf("libmoe %u.%u.%u  device %s  tokens %lld  d_model %lld  d_ff %lld  experts %lld  top-k %lld  seed %llu\n",
         moe_version() / 10000, moe_version() / 100 % 100, moe_version() % 100,
         o.device == MOE_DEVICE_CUDA ? "cuda" : "cpu", (long long)o.tokens, (long long)o.d_model,
         (long long)o.d_ff, (long long)o.experts, (long long)o.top_k, (unsigned long long)o.seed);

  /* random tokens, deterministic in the seed */
  n = o.tokens * o.d_model;
  hx = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  hy = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  hdx = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  counts = calloc((size_t)o.experts, sizeof(int64_t));
  if (!hx || !hy || !hdx || !counts) {
    fprintf(stderr, "moe_demo: out of host memory\n");
    goto fail;
  }
  rng = o.seed ^ 0xD1B54A32D192ED03ull;
  for (i = 0; i < n; ++i) hx[i] = rng_uniform(&rng);

  x = dev_alloc(&mem, (size_t)n * sizeof(float));
  y = dev_alloc(&mem, (size_t)n * sizeof(float));
  dy = dev_alloc(&mem, (size_t)n * sizeof(float));
  dx = dev_alloc(&mem, (size_t)n * sizeof(float));
  if (!x || !y || !dy || !dx) goto fail;
  if (!dev_copy(&mem, x, hx, (size_t)n * sizeof(float), 1)) goto fail;

  /* training forward: routing statistics and activations are kept in ctx */
  CHECK(moe_forward(layer, x, o.tokens, y, ctx));
  if (!dev_copy(&mem, hy, y, (size_t)n * sizeof(float), 0)) goto fail;
  if (!all_finite(hy, n)) {
    fprintf(stderr, "moe_demo: the forward produced a non-finite output\n");
    goto fail;
  }

  /* loss = 1/(2T) sum |y|^2, so dy = y / T */
  loss = 0.0;
  for (i = 0; i < n; ++i) loss += 0.5 * (double)hy[i] * (double)hy[i];
  if (o.tokens > 0) loss /= (double)o.tokens;
  for (i = 0; i < n; ++i) hy[i] = o.tokens > 0 ? hy[i] / (float)o.tokens : 0.0f;
  if (!dev_copy(&mem, dy, hy, (size_t)n * sizeof(float), 1)) goto fail;
  CHECK(moe_backward(layer, ctx, dy, dx));
  if (!dev_copy(&mem, hdx, dx, (size_t)n * sizeof(float), 0)) goto fail;
  if (!all_finite(hdx, n)) {
    fprintf(stderr, "moe_demo: the backward produced a non-finite dL/dx\n");
    goto fail;
  }

  /* routing summary */
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  CHECK(moe_context_stats(ctx, &stats));
  CHECK(moe_context_expert_counts(ctx, counts));
  for (i = 0; i < o.experts; ++i) kept += counts[i];

  printf("\nrouting summary\n");
  printf("  tokens               %lld\n", (long long)stats.num_tokens);
  printf("  routing slots        %lld (tokens x top-k)\n", (long long)stats.num_slots);
  printf("  dropped slots        %lld\n", (long long)stats.dropped_slots);
  printf("  load-balance loss    %.4f (1.0 = perfectly balanced)\n", stats.load_balance_loss);
  printf("  router z-loss        %.4f\n", stats.z_loss);
  printf("  aux loss (weighted)  %.6f\n", stats.aux_loss_total);
  printf("  load CV              %.4f (std/mean of expert loads)\n", stats.load_cv);
  printf("  max/mean load        %.3f\n", stats.max_load_ratio);
  print_load_chart(counts, o.experts, kept);

  /* gradient norms */
  printf("\ntraining step: loss = 1/(2T) sum |y|^2 = %.6f\n", loss);
  printf("  |x|  %.4f   |dL/dx|  %.6f\n", l2norm(hx, n), l2norm(hdx, n));
  np = moe_layer_num_params(layer);
  if (np < 0) {
    report("moe_layer_num_params", MOE_ERR_INVALID_ARGUMENT);
    goto fail;
  }
  for (p = 0; p < np; ++p) {
    moe_param_info info;
    int64_t count = 1;
    int d;
    CHECK(moe_layer_param_info(layer, p, &info));
    for (d = 0; d < info.ndim; ++d) count *= info.shape[d];
    if (count > max_grad) max_grad = count;
  }
  grad = malloc((size_t)(max_grad > 0 ? max_grad : 1) * sizeof(float));
  if (!grad) {
    fprintf(stderr, "moe_demo: out of host memory\n");
    goto fail;
  }
  printf("  gradient norms:\n");
  for (p = 0; p < np; ++p) {
    moe_param_info info;
    int64_t count = 1;
    int d;
    char shape[64] = "";
    CHECK(moe_layer_param_info(layer, p, &info));
    for (d = 0; d < info.ndim; ++d) {
      size_t len = strlen(shape);
      count *= info.shape[d];
      snprintf(shape + len, sizeof shape - len, "%s%lld", d ? " x " : "", (long long)info.shape[d]);
    }
    if (!info.trainable) {
      printf("    %-20s [%s]  (not trainable)\n", info.name, shape);
      continue;
    }
    CHECK(moe_layer_get_grad(layer, info.name, grad, count));
    printf("    %-20s [%s]  |grad| = %.6f\n", info.name, shape, l2norm(grad, count));
    if (!all_finite(grad, count)) {
      fprintf(stderr, "moe_demo: the gradient of %s is not finite\n", info.name);
      goto fail;
    }
  }
  rc = 0;

fail:
  free(grad);
  free(counts);
  free(hdx);
  free(hy);
  free(hx);
  dev_free(&mem, dx); /* NULL (never allocated) is a no-op */
  dev_free(&mem, dy);
  dev_free(&mem, y);
  dev_free(&mem, x);
  moe_context_destroy(ctx);
  moe_layer_destroy(layer);
  return rc;
}
