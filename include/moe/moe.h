/*
 * libmoe: a Mixture-of-Experts layer behind a C ABI.
 *
 * One opaque layer object does routing, forward, backward and the auxiliary losses of an MoE
 * block, on the CPU (BLAS + OpenMP) or on a CUDA device (a module loaded on demand).
 *
 * Conventions that hold for every function below unless its comment says otherwise:
 *  - Every fallible function returns a moe_status. On failure nothing is changed: out-parameters
 *    are left untouched, the layer and context keep their previous state and stay usable, and
 *    moe_last_error() returns a message that names the offending argument and its value.
 *    Two exceptions, both after every argument check has passed: a moe_forward or moe_route that
 *    fails while computing (out of memory, device or comm error) leaves its context empty; and
 *    when the GEMM library runs out of memory inside moe_backward, gradients may be partly
 *    accumulated (call moe_layer_zero_grad before redoing the step). The layer stays usable.
 *  - Objects are opaque, created by *_create and freed by *_destroy; destroying NULL is a no-op.
 *  - Dimensions are int64_t, byte sizes size_t; strings are NUL-terminated UTF-8.
 *  - Tensors are dense and row-major. Activations (x, y, dy, dx) live on the layer's device in the
 *    layer's dtype; host copies of parameters are always float32.
 *  - Precision (moe_config.dtype): with MOE_DTYPE_BF16 or MOE_DTYPE_F16 the experts' weights
 *    (experts.*, shared.w*) and their gradients are stored in that dtype, as are x, y, dy, dx and
 *    every activation the layer keeps; products and sums accumulate in float32, and what is
 *    stored is rounded once, to nearest even. Inside each expert FFN these values are stored in
 *    the dtype, and each later step starts from the stored value: h = x W1^T and g = x W3^T; the
 *    activation a = act(h) (* g), computed in float32 from the stored h, g; the expert's output
 *    a W2^T. In backward: dA = dy_e W2; dh and dg (computed in float32 from the stored h, g, dA);
 *    each weight gradient, rounded once when this call's sum is added to it; dx once. (As on
 *    tensor cores, which take the second GEMM's input in 16 bits.) Both backends follow this
 *    rule; they may add the terms of a sum in different orders, and bfloat16 products on the
 *    CPU's bfloat16 instructions (AVX512-BF16, AMX) read denormal inputs (magnitude below
 *    2^-126) as zero. The router (router.*, shared.gate, logits, scores, weights, aux losses) is
 *    float32 whatever the dtype.
 *  - Thread-safety: a layer, and the contexts created from it, may be used by one thread at a
 *    time (callers that share one layer between threads must hold their own lock). Different
 *    layers may be used from different threads concurrently. Functions that take no layer are
 *    thread-safe. Errors are recorded per thread.
 *  - The library never prints, never aborts and never throws across this boundary.
 */
#ifndef MOE_MOE_H
#define MOE_MOE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(MOE_BUILDING_LIBRARY)
#    define MOE_API __declspec(dllexport)
#  else
#    define MOE_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define MOE_API __attribute__((visibility("default")))
#else
#  define MOE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------
 * Version
 * ------------------------------------------------------------------------------------------- */
#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 3
#define MOE_VERSION_PATCH 0
#define MOE_VERSION_NUMBER (MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH)

/* ---------------------------------------------------------------------------------------------
 * Status and errors
 * ------------------------------------------------------------------------------------------- */
typedef enum moe_status {
  MOE_OK = 0,
  MOE_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a size out of range, a name that does not exist */
  MOE_ERR_OUT_OF_MEMORY = 2,    /* a host or device allocation failed; nothing was changed */
  MOE_ERR_UNSUPPORTED = 3,      /* a feature this build or this backend does not provide */
  MOE_ERR_DEVICE = 4,           /* the CUDA runtime or a kernel failed, or no usable device */
  MOE_ERR_COMM = 5,             /* a moe_comm hook returned an error */
  MOE_ERR_STATE = 6,            /* a call out of order, e.g. backward without a training forward */
  MOE_ERR_NONFINITE = 7,        /* check_finite found NaN or Inf in an input */
  MOE_ERR_INTERNAL = 8          /* a bug in libmoe; please report it with the message */
} moe_status;

/**
 * Name of a status code, e.g. "MOE_ERR_INVALID_ARGUMENT"; "MOE_ERR_UNKNOWN" for values outside
 * the enum. @return a static string (never NULL, never freed). Thread-safe.
 */
MOE_API const char *moe_status_name(moe_status s);

/**
 * The message of the calling thread's most recent failed libmoe call, "" if none has failed.
 * @return a thread-local string owned by the library, valid until this thread's next libmoe call.
 * Successful calls do not clear it. Thread-safe.
 */
MOE_API const char *moe_last_error(void);

/** @return MOE_VERSION_NUMBER of the library actually loaded (compare with the header's). */
MOE_API uint32_t moe_version(void);

/* ---------------------------------------------------------------------------------------------
 * Configuration. Enum values are pinned: they never change between versions.
 * ------------------------------------------------------------------------------------------- */
typedef enum moe_device { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 } moe_device;
typedef enum moe_dtype { MOE_DTYPE_F32 = 0, MOE_DTYPE_BF16 = 1, MOE_DTYPE_F16 = 2 } moe_dtype;
typedef enum moe_activation {
  MOE_ACT_SWIGLU = 0, /* (silu(x W1^T) * (x W3^T)) W2^T */
  MOE_ACT_GEGLU = 1,  /* (gelu(x W1^T) * (x W3^T)) W2^T, exact (erf) GELU */
  MOE_ACT_RELU = 2,   /* relu(x W1^T) W2^T */
  MOE_ACT_GELU = 3,   /* gelu(x W1^T) W2^T, exact (erf) GELU */
  MOE_ACT_SILU = 4,   /* silu(x W1^T) W2^T */
  /* gpt-oss's clamped SwiGLU, with h = x W1^T (+ b1), u = x W3^T (+ b3), alpha = swiglu_alpha,
     l = swiglu_limit: hc = min(h, l), uc = clamp(u, -l, l),
     a = (uc + 1) * hc * sigmoid(alpha * hc), out = a W2^T (+ b2). The clamps pass the gradient
     where h <= l and -l <= u <= l (as torch.clamp) and give zero elsewhere. */
  MOE_ACT_SWIGLU_CLAMPED = 5
} moe_activation;
/* Expert choice: each expert takes its C = ceil(capacity_factor*T*top_k/E) best tokens by softmax
   score (per group of capacity_group_size tokens when set), weight = the score; normalize_topk,
   routed_scale, score and groups do not apply. */
typedef enum moe_routing { MOE_ROUTE_TOKEN_CHOICE = 0, MOE_ROUTE_EXPERT_CHOICE = 1 } moe_routing;
typedef enum moe_score { MOE_SCORE_SOFTMAX = 0, MOE_SCORE_SIGMOID = 1 } moe_score;
typedef enum moe_noise { MOE_NOISE_NONE = 0, MOE_NOISE_GAUSSIAN = 1, MOE_NOISE_JITTER = 2 } moe_noise;
typedef enum moe_drop_policy { MOE_DROP_POSITION = 0, MOE_DROP_PROBS = 1 } moe_drop_policy;

typedef struct moe_comm moe_comm; /* expert-parallel communicator, defined at the end */

/**
 * Everything that defines a layer. Always start from moe_config_init() (which sets struct_size
 * and every default) or moe_config_preset(), then change fields. The library reads
 * min(struct_size, sizeof(moe_config)) bytes, so a program built against an older, shorter
 * struct keeps working; fields it does not know take their defaults.
 */
typedef struct moe_config {
  size_t struct_size;           /* sizeof(moe_config), set by moe_config_init */
  int64_t d_model;              /* model (token) width d, > 0; no default */
  int64_t d_ff;                 /* hidden width of each routed expert, > 0; no default */
  int64_t num_experts;          /* E >= 1 (global count, over all ranks); default 8 */
  int64_t top_k;                /* k, 1 <= k <= E; default 2 */
  moe_activation activation;    /* default MOE_ACT_SWIGLU */
  moe_routing routing;          /* default MOE_ROUTE_TOKEN_CHOICE */
  moe_score score;              /* default MOE_SCORE_SOFTMAX */
  int normalize_topk;           /* nonzero: the k weights of a token are divided by their sum; default 1 */
  float routed_scale;           /* multiplies every routed weight; default 1 */
  int64_t num_groups;           /* G: group-limited routing, G divides E; 1 = off (default) */
  int64_t topk_groups;          /* groups kept per token, 1 <= topk_groups <= G; default 1 */
  float capacity_factor;        /* > 0: C = ceil(cf * T * k / E) slots per expert (T: the call's tokens, or
                                   a group's: capacity_group_size); <= 0: dropless (default 0) */
  moe_drop_policy drop_policy;  /* which slots an over-full expert keeps; default MOE_DROP_POSITION */
  moe_noise noise;              /* router noise in training; default MOE_NOISE_NONE */
  float noise_eps;              /* jitter half-width eps for MOE_NOISE_JITTER; default 0.01 */
  float aux_loss_coef;          /* load-balance loss coefficient; default 0.01 */
  float z_loss_coef;            /* router z-loss coefficient; default 0 */
  float importance_loss_coef;   /* Shazeer importance loss coefficient; default 0 */
  float load_loss_coef;         /* Shazeer smooth load loss coefficient; default 0 */
  float bias_update_rate;       /* aux-loss-free balancing step u; 0 = off (default) */
  int64_t num_shared_experts;   /* S always-on experts; default 0 */
  int64_t d_ff_shared;          /* hidden width of each shared expert; 0 = d_ff (default) */
  int shared_gate;              /* nonzero: shared output scaled by sigmoid(x . shared.gate); default 0 */
  moe_device device;            /* default MOE_DEVICE_CPU */
  int device_index;             /* CUDA ordinal; default 0 */
  moe_dtype dtype;              /* storage of activations and expert weights (see Precision above);
                                   default MOE_DTYPE_F32 */
  int allow_tf32;               /* CUDA float32 GEMMs may use TF32; default 0 */
  uint64_t seed;                /* parameter initialisation and router noise; default 0 */
  int check_finite;             /* nonzero: refuse NaN/Inf in x and dy with MOE_ERR_NONFINITE; default 0 */
  const moe_comm *comm;         /* NULL (default): this process holds all experts; not owned */
  /* Added after 0.2 (a program built against 0.1 or 0.2 passes a shorter struct and gets the default): */
  int64_t min_capacity;         /* with capacity_factor > 0, the least number of slots per expert:
                                   C = max(min_capacity, ceil(cf * T * k / E)), at most T*k (expert
                                   choice: T), so that small batches drop nothing (DeepSpeed's
                                   min_capacity); >= 0, default 0 */
  int64_t capacity_group_size;  /* with capacity_factor > 0, the capacity applies per group of tokens:
                                   the call's T tokens are consecutive groups of this many (the last
                                   group is shorter when it does not divide T), and each group gets its
                                   own C = max(min_capacity, ceil(cf * n * k / E)) for its n tokens, at
                                   most n*k (expert choice: n); slots are ranked, and dropped, within
                                   their group (position: choice, then token, in the group; probs: by
                                   weight in the group; expert choice: each expert's best C of the
                                   group). 0 (or >= T) is one group of the whole call, the rule above.
                                   Set it to the sequence length for a capacity per sequence (Switch
                                   Transformer, Mesh TensorFlow's groups, GShard) on a batch laid out
                                   sequence after sequence. Under a comm each rank groups its own
                                   tokens. >= 0, default 0 */
  int router_logit_bias;        /* nonzero: a trainable parameter router.logit_bias [E] is added to
                                   the logits before scoring and selection, L = X Wr^T + b (an
                                   nn.Linear router with bias: gpt-oss, Switch with router_bias);
                                   its gradient is the sum over tokens of dLoss/dL. Distinct from
                                   router.bias, which only steers selection. Default 0 */
  int expert_bias;              /* nonzero: the routed experts have biases experts.b1 [E, d_ff],
                                   experts.b3 [E, d_ff] (GLU activations) and experts.b2 [E, d]:
                                   h = x W1^T + b1, g = x W3^T + b3, y_e = a W2^T + b2; the whole
                                   y_e, b2 included, is scaled by the routing weight (as gpt-oss
                                   does). Trainable, stored like experts.w*. Shared experts have
                                   none. Default 0 */
  float swiglu_alpha;           /* MOE_ACT_SWIGLU_CLAMPED: alpha of sigmoid(alpha * h), > 0; default 1.702 */
  float swiglu_limit;           /* MOE_ACT_SWIGLU_CLAMPED: the clamp limit l, > 0; default 7 */
} moe_config;

/** sizeof(moe_config) in the moe.h of 0.1 and 0.2, the shortest struct_size the library reads. */
#define MOE_CONFIG_SIZE_0_1 offsetof(moe_config, min_capacity)

/**
 * Fill *cfg with the defaults listed beside each field, struct_size = sizeof(moe_config), and
 * d_model = d_ff = 0 (the caller must set them). NULL is a no-op. Thread-safe.
 * A macro below makes this call moe_config_init_size(cfg, sizeof(moe_config)), so that the
 * library writes no more than the caller's struct holds; the function itself (what programs built
 * against 0.1 or 0.2 call) writes MOE_CONFIG_SIZE_0_1 bytes.
 */
MOE_API void moe_config_init(moe_config *cfg);

/**
 * moe_config_init for a struct of size bytes (sizeof(moe_config) in the caller's moe.h): writes
 * min(size, sizeof(moe_config)) bytes, struct_size included. For bindings that cannot use the
 * macro (bindgen, ctypes). NULL, or a size below MOE_CONFIG_SIZE_0_1, is a no-op. Thread-safe.
 */
MOE_API void moe_config_init_size(moe_config *cfg, size_t size);

/**
 * Reset *cfg to the defaults, then apply the routing recipe of a published model:
 *   "mixtral"        E 8, k 2, SwiGLU, softmax, normalized top-k, dropless, aux 0.02
 *   "switch"         E 8, k 1, ReLU FFN, softmax, capacity 1.25 with position dropping, jitter 0.01,
 *                    aux 0.01 (Fedus et al. 2021), router z-loss 0.001 (Zoph et al. 2022); the
 *                    capacity applies to inference too: raise capacity_factor for evaluation.
 *                    Switch computes C per sequence: set capacity_group_size to the sequence
 *                    length (the preset cannot know it; 0 keeps one C for the whole call).
 *                    Hugging Face's SwitchTransformersSparseMLP (an absolute expert_capacity per
 *                    sequence, position dropping by cumulative count) is, exactly, this preset
 *                    with capacity_group_size = sequence length, min_capacity = expert_capacity,
 *                    capacity_factor a tiny positive number such as 1e-6 (so that C is
 *                    max(expert_capacity, 1)), noise none (its jitter draws differ), and its
 *                    router_bias False (a bias inside the logits is not expressed here)
 *   "shazeer"        E 8, k 2, ReLU FFN, softmax over the k noisy logits, Gaussian noise,
 *                    importance and load losses 0.01, no load-balance loss (Shazeer et al. 2017)
 *   "expert-choice"  E 8, k 2, capacity factor 1 (C = 2T/E), each expert picks its tokens (Zhou et al. 2022)
 *   "deepseek-v3"    E 256, k 8, sigmoid scores, 8 groups keep 4, routed_scale 2.5, one shared
 *                    expert, bias-based balancing (u 0.001), aux 0.0001 (DeepSeek-AI 2024)
 *   "qwen2-moe"      E 60, k 4, softmax, not normalized, 4 shared experts behind a sigmoid gate
 *   "qwen3-moe"      E 128, k 8, softmax, normalized, no shared experts, aux 0.001 (Qwen3-30B-A3B)
 *   "olmoe"          E 64, k 8, softmax, not normalized, aux 0.01, router z-loss 0.001
 *                    (OLMoE-1B-7B, Muennighoff et al. 2024)
 *   "gpt-oss"        E 32, k 4 (gpt-oss-20b; set E 128 for gpt-oss-120b), router logit bias, softmax
 *                    over the k largest logits (= softmax, top-k, normalized), expert biases, clamped
 *                    SwiGLU alpha 1.702 limit 7, dropless, aux 0.9 (router_aux_loss_coef of both
 *                    models' config.json; transformers' GptOssConfig, OpenAI 2025)
 * Widths (d_model, d_ff, d_ff_shared) are left 0 for the caller to set; E and k may be changed.
 * moe_config_num_presets and moe_config_preset_name list them at run time.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT if cfg or name is NULL or name is unknown (cfg
 *         untouched); MOE_ERR_UNSUPPORTED for a known preset whose routing this build lacks.
 * Thread-safe.
 */
MOE_API moe_status moe_config_preset(moe_config *cfg, const char *name);

/**
 * moe_config_preset for a struct of size bytes (as moe_config_init_size); the macro below makes
 * moe_config_preset call it with sizeof(moe_config), and the function moe_config_preset writes
 * MOE_CONFIG_SIZE_0_1 bytes. @return as moe_config_preset; MOE_ERR_INVALID_ARGUMENT also for a
 * size below MOE_CONFIG_SIZE_0_1 (cfg untouched).
 */
MOE_API moe_status moe_config_preset_size(moe_config *cfg, size_t size, const char *name);

/* Callers compiled with this header tell the library how large their moe_config is. */
#define moe_config_init(cfg) moe_config_init_size((cfg), sizeof(moe_config))
#define moe_config_preset(cfg, name) moe_config_preset_size((cfg), sizeof(moe_config), (name))

/* ---------------------------------------------------------------------------------------------
 * Configuration by name. Every field of moe_config after struct_size is described by one row of
 * a table inside the library (its name, type, place in the struct, default, allowed values and a
 * one-line description), and can be read and written as text by its name, so that bindings,
 * command-line flags and configuration files need no list of their own. Every value has one
 * canonical text form, the one moe_config_get writes:
 *   MOE_CONFIG_INT64, MOE_CONFIG_INT, MOE_CONFIG_UINT64  decimal ("8", "-1", "18446744073709551615")
 *   MOE_CONFIG_BOOL     "true" or "false" (read also: 1/0, yes/no, on/off)
 *   MOE_CONFIG_FLOAT    the shortest decimal that reads back as the same float32 ("0.01", "1e-05",
 *                       "1.25", "-0"): get, then set, gives the same bits
 *   MOE_CONFIG_ENUM     a lower-case name ("swiglu", "token_choice", "cuda", "bfloat16")
 *   MOE_CONFIG_POINTER  "NULL" or "0x..." (read-only: a pointer cannot be set from text)
 * moe_config_set also reads names in any case, '-' for '_', surrounding spaces, and the aliases
 * of the dtype names (f32 fp32 bf16 f16 fp16 half) and of the routing names (token, expert).
 * ------------------------------------------------------------------------------------------- */
typedef enum moe_config_type {
  MOE_CONFIG_INT64 = 0,   /* int64_t */
  MOE_CONFIG_INT = 1,     /* int */
  MOE_CONFIG_BOOL = 2,    /* int used as a flag: 0 or nonzero */
  MOE_CONFIG_FLOAT = 3,   /* float */
  MOE_CONFIG_UINT64 = 4,  /* uint64_t */
  MOE_CONFIG_ENUM = 5,    /* one of the moe_* enums above (int-sized), values 0 .. num_values-1 */
  MOE_CONFIG_POINTER = 6  /* a pointer (comm) */
} moe_config_type;

/** A buffer of this many bytes holds the canonical text of any field's value, NUL included. */
#define MOE_CONFIG_VALUE_MAX 64

/** The description of one moe_config field. Every string is static: never freed, never NULL. */
typedef struct moe_config_field_info {
  size_t struct_size;              /* sizeof(moe_config_field_info), set by the caller */
  const char *name;                /* the field's name in moe_config, e.g. "top_k" */
  moe_config_type type;            /* how its value is stored and written as text */
  size_t offset;                   /* offsetof(moe_config, <name>) */
  size_t size;                     /* sizeof the field, in bytes */
  const char *default_value;       /* canonical text of the value moe_config_init gives it */
  int num_values;                  /* MOE_CONFIG_ENUM: how many values it has; 0 otherwise */
  const char *const *value_names;  /* MOE_CONFIG_ENUM: value_names[v] is the canonical name of the
                                      C value v, 0 <= v < num_values; NULL otherwise */
  const char *description;         /* one line: meaning, units, range */
} moe_config_field_info;

/** @return the number of described fields: every field of moe_config but struct_size. Thread-safe. */
MOE_API int moe_config_num_fields(void);

/**
 * Describe field number index (0 <= index < moe_config_num_fields(), in the struct's order).
 * out->struct_size must be set; min(out->struct_size, sizeof) bytes are written.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL out, an out->struct_size too small, or an
 *         index out of range (out untouched). Thread-safe.
 */
MOE_API moe_status moe_config_field(int index, moe_config_field_info *out);

/**
 * Set field name of *cfg from its text value (canonical form above, or an accepted alias).
 * Only the text's form and range are checked here (an int64 in range, a finite float32, a known
 * enum name); how fields fit together (top_k <= num_experts, ...) is checked by moe_layer_create.
 * cfg must hold a struct_size set by moe_config_init; a field past it (cfg from an older, shorter
 * moe.h) is refused.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT, with a message naming the field, the value and what is
 *         allowed (the known fields, the enum names, the range), for a NULL argument, a bad
 *         cfg->struct_size, an unknown name, a pointer field, or a value that does not parse or
 *         is out of range. On failure *cfg is unchanged. Thread-safe for different cfg.
 */
MOE_API moe_status moe_config_set(moe_config *cfg, const char *name, const char *value);

/**
 * Write the canonical text of field name of *cfg into buf (size bytes, NUL-terminated).
 * MOE_CONFIG_VALUE_MAX bytes always suffice. An enum holding a value outside its names is written
 * as that decimal value (which moe_config_set refuses).
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL argument, a bad cfg->struct_size, an unknown
 *         name, a field past cfg->struct_size, or a size too small for the text (buf untouched).
 *         Thread-safe.
 */
MOE_API moe_status moe_config_get(const moe_config *cfg, const char *name, char *buf, size_t size);

/** @return the number of presets moe_config_preset knows. Thread-safe. */
MOE_API int moe_config_num_presets(void);

/**
 * The name of preset number index (0 <= index < moe_config_num_presets()), e.g. "mixtral".
 * @return a static string; NULL (and an error message) for an index out of range. Thread-safe.
 */
MOE_API const char *moe_config_preset_name(int index);

/**
 * One line on preset number index: the model it follows, its source, and the fields it sets.
 * @return a static string; NULL (and an error message) for an index out of range. Thread-safe.
 */
MOE_API const char *moe_config_preset_description(int index);

/* ---------------------------------------------------------------------------------------------
 * Layer
 * ------------------------------------------------------------------------------------------- */
typedef struct moe_layer moe_layer;

/**
 * Create a layer from *cfg (copied; cfg->comm is borrowed and must outlive the layer). Parameters
 * are initialised deterministically from cfg->seed: router.weight and expert weights uniform in
 * +-1/sqrt(fan_in) (PyTorch nn.Linear's rule), router.bias and router.noise_weight zero.
 * Gradients start at zero.
 * @param out receives the layer, owned by the caller, freed with moe_layer_destroy.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  cfg or out NULL, a wrong struct_size, a size <= 0, k > E, groups
 *                             that do not divide E, sizes whose products overflow int64, ...;
 *   MOE_ERR_UNSUPPORTED       a feature not built (CUDA module absent, a dtype the backend lacks);
 *   MOE_ERR_DEVICE            the CUDA module loaded but no usable device;
 *   MOE_ERR_OUT_OF_MEMORY     the parameters could not be allocated.
 */
MOE_API moe_status moe_layer_create(const moe_config *cfg, moe_layer **out);

/** Free a layer and everything it owns. Contexts created from it must be destroyed first. NULL: no-op. */
MOE_API void moe_layer_destroy(moe_layer *layer);

/**
 * Copy the layer's effective configuration (defaults filled in, d_ff_shared resolved) into *out.
 * out->struct_size must be set by the caller; min(out->struct_size, sizeof) bytes are written.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL arguments or out->struct_size too small.
 */
MOE_API moe_status moe_layer_get_config(const moe_layer *layer, moe_config *out);

/**
 * Make a CUDA layer issue all its work on cuda_stream (a cudaStream_t). Not owned: it must stay
 * valid until another stream is set or the layer is destroyed (destroy frees memory on it). NULL returns to the layer's own stream, a blocking
 * stream made at create (ordered after work on the legacy default stream). Work already queued on
 * the previous stream is waited for. For a CPU layer only NULL is accepted (and ignored).
 *
 * CUDA layers follow stream semantics: every kernel, copy and GEMM of moe_forward, moe_route and
 * moe_backward is queued on the layer's stream, and the call returns with the outputs queued, not
 * complete. Queue your own work on the same stream, or synchronize it, before reading outputs or
 * reusing inputs. A call waits on the stream at two points only, because counts must reach the
 * host: after routing (the aux-loss statistics) and after the capacity plan (the rows per expert
 * size the expert GEMMs); plus the waits of expert parallelism around each moe_comm hook. Calls
 * that copy to or from host memory (parameters, gradients, context accessors) wait until done.
 * Not thread-safe with other calls on the same layer.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL layer or a stream given to a CPU layer;
 *         MOE_ERR_DEVICE if waiting for the previous stream fails.
 */
MOE_API moe_status moe_layer_set_stream(moe_layer *layer, void *cuda_stream);

/**
 * Bytes of memory a layer holds on its device (host memory for a CPU layer), as allocated. The
 * workspace grows to the largest call seen and is reused; contexts hold their own (see
 * moe_context_memory). A CPU layer's buffers of 8 MB or more start on a 2 MB boundary and are
 * rounded up to whole 2 MB pages, which it asks Linux to back with transparent huge pages
 * (madvise(MADV_HUGEPAGE): the weights are streamed once per forward, and on 4 KB pages each
 * weight row costs a TLB miss); each such buffer may take up to 2 MB more than counted here.
 */
typedef struct moe_memory {
  size_t struct_size; /* sizeof(moe_memory), set by the caller */
  size_t parameters;  /* storage of every parameter */
  size_t gradients;   /* their gradients */
  size_t workspace;   /* the layer's buffers for inference forwards */
  size_t device_pool; /* CUDA layers: what the layer's memory pool holds from the device: the
                         buffers above and those of its contexts, the backend's scratch, and
                         memory freed but kept for reuse, which goes back to the device when a
                         context is destroyed and after a call that outgrew a buffer. 0 for a
                         CPU layer. */
} moe_memory;

/**
 * Fill *out with the bytes layer holds (min(out->struct_size, sizeof) bytes are written).
 * Thread-safe with respect to other readers of the layer.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers or an out->struct_size too small;
 *         MOE_ERR_DEVICE if the CUDA layer's memory pool cannot be queried.
 */
MOE_API moe_status moe_layer_memory(const moe_layer *layer, moe_memory *out);

/* ---------------------------------------------------------------------------------------------
 * Parameters: named tensors in PyTorch nn.Linear layout ([out, in], row-major).
 *   router.weight [E, d]        router.noise_weight [E, d] (noise GAUSSIAN only)
 *   router.bias [E]             selection bias (not trainable; changed by bias_update_rate)
 *   router.logit_bias [E]       added to the logits (router_logit_bias only; trainable)
 *   experts.w1 [E, d_ff, d]     gate projection of GLU experts, up projection otherwise
 *   experts.w3 [E, d_ff, d]     up projection (GLU activations only)
 *   experts.w2 [E, d, d_ff]     down projection
 *   experts.b1, b3 [E, d_ff], experts.b2 [E, d]   biases of w1, w3 (GLU), w2 (expert_bias only)
 *   shared.w1/w3/w2 [S, ...]    the same for the S shared experts (width d_ff_shared)
 *   shared.gate [1, d]          (shared_gate only)
 * With a comm of size R, E above is this rank's E/R experts.
 * ------------------------------------------------------------------------------------------- */
typedef struct moe_param_info {
  const char *name;   /* owned by the layer, valid until it is destroyed */
  int ndim;           /* 1..3 */
  int64_t shape[3];   /* unused dimensions are 0 */
  int trainable;      /* 0 for router.bias */
} moe_param_info;

/** @return the number of named parameters, or -1 (with an error message) if layer is NULL. */
MOE_API int moe_layer_num_params(const moe_layer *layer);

/**
 * Describe parameter number index (0 <= index < moe_layer_num_params).
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers or an index out of range.
 */
MOE_API moe_status moe_layer_param_info(const moe_layer *layer, int index, moe_param_info *out);

/**
 * The storage type of parameter name and of its gradient: the layer's dtype for experts.* and
 * shared.w1/w3/w2, MOE_DTYPE_F32 for router.*, shared.gate. Thread-safe as moe_layer_param_info.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers or an unknown name.
 */
MOE_API moe_status moe_layer_param_dtype(const moe_layer *layer, const char *name, moe_dtype *out);

/**
 * Copy count float32 values from host memory into parameter name (count must equal its number
 * of elements), rounded to nearest even when the parameter is stored in bf16/f16. Changing a
 * trainable parameter between a training forward and its backward makes that backward fail with
 * MOE_ERR_STATE (its saved activations belong to the old values); router.bias may change any time.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers, an unknown name or a wrong count;
 *         MOE_ERR_NONFINITE if check_finite is on and host holds NaN/Inf, or a value that is
 *         not finite once stored (above 65504 in magnitude for a float16 parameter).
 */
MOE_API moe_status moe_layer_set_param(moe_layer *layer, const char *name, const float *host, int64_t count);

/** Copy parameter name into host (count float32 values, exact whatever the storage dtype).
 *  Errors as moe_layer_set_param. */
MOE_API moe_status moe_layer_get_param(const moe_layer *layer, const char *name, float *host, int64_t count);

/**
 * Copy the accumulated gradient of parameter name into host (count float32 values).
 * @return as moe_layer_get_param, and MOE_ERR_INVALID_ARGUMENT for a parameter that is not
 *         trainable (router.bias).
 */
MOE_API moe_status moe_layer_get_grad(const moe_layer *layer, const char *name, float *host, int64_t count);

/** Set every gradient to zero. @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL layer. */
MOE_API moe_status moe_layer_zero_grad(moe_layer *layer);

/**
 * The layer's own storage of parameter name and of its gradient, on the layer's device, in the
 * parameter's dtype (moe_layer_param_dtype), contiguous, in the documented shape; valid until the layer is destroyed. Writing through them
 * is allowed (this is how optimisers and the Python/PyTorch binding update weights in place);
 * not between a training forward and its backward. *grad is NULL for router.bias. Either out
 * pointer may be NULL when not wanted.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL layer or name, or an unknown name.
 */
MOE_API moe_status moe_layer_param_buffers(moe_layer *layer, const char *name, void **data, void **grad);

/* ---------------------------------------------------------------------------------------------
 * Checkpoints: safetensors files (https://huggingface.co/docs/safetensors), read through a memory
 * mapping. What a file holds is untrusted: every offset, size, dtype, shape and name is checked
 * before it is used, and nothing is read outside the file.
 * ------------------------------------------------------------------------------------------- */

/**
 * Set the layer's parameters from a checkpoint.
 * @param path   a .safetensors file; a model.safetensors.index.json (a sharded checkpoint: its
 *               "weight_map" names, for each tensor, a shard file in the same directory; only the
 *               shards holding this layer's tensors are opened); or a directory holding either
 *               (the index is preferred).
 * @param prefix the block's name in the checkpoint, e.g. "model.layers.3.mlp": tensor "router.weight"
 *               is looked up as "model.layers.3.mlp.router.weight". NULL or "": no prefix.
 * @param family how the checkpoint names and lays out the block. NULL or "libmoe": libmoe's own
 *               parameter names and shapes (what moe_layer_save writes). A model family, with the
 *               key names of its transformers modelling code:
 *     "mixtral"      gate.weight; experts.N.w1/w3/w2.weight (w1 gate, w3 up, w2 down)
 *     "qwen2-moe"    gate.weight; experts.N.{gate,up,down}_proj.weight; shared_expert.{gate,up,down}_proj
 *                    .weight (width S*d_ff_shared, split into the layer's S shared experts);
 *                    shared_expert_gate.weight [1, d]
 *     "qwen3-moe", "olmoe"  gate.weight; experts.N.{gate,up,down}_proj.weight
 *     "deepseek-v3"  gate.weight; gate.e_score_correction_bias -> router.bias;
 *                    experts.N.{gate,up,down}_proj.weight; shared_experts.{gate,up,down}_proj.weight
 *                    (width S*d_ff_shared)
 *     "switch"       router.classifier.weight (and router.classifier.bias -> router.logit_bias, for a
 *                    layer with router_logit_bias); experts.expert_N.wi/wo.weight (ReLU or other plain FFN)
 *     "gpt-oss"      router.weight; router.bias -> router.logit_bias; experts.gate_up_proj [E, d, 2*d_ff]
 *                    with gate and up interleaved along the last axis (gate = [..., 0::2], up =
 *                    [..., 1::2]), transposed into experts.w1/w3; experts.gate_up_proj_bias [E, 2*d_ff]
 *                    likewise into experts.b1/b3; experts.down_proj [E, d_ff, d] (transposed into
 *                    experts.w2) and experts.down_proj_bias [E, d] (transformers 5's GptOssMLP). Or, as
 *                    openai/gpt-oss-20b and -120b are published, MXFP4: experts.gate_up_proj_blocks
 *                    [E, 2*d_ff, d/32, 16] and experts.gate_up_proj_scales [E, 2*d_ff, d/32] (U8:
 *                    e2m1 pairs, low nibble first, and e8m0 exponents of blocks of 32; gate and up
 *                    rows interleaved), experts.down_proj_blocks/_scales [E, d, d_ff/32, 16] /
 *                    [E, d, d_ff/32], dequantised on load (d_model and d_ff multiples of 32). The
 *                    layer needs activation MOE_ACT_SWIGLU_CLAMPED (preset "gpt-oss").
 *   Every gated family also accepts transformers 5's fused experts, experts.gate_up_proj
 *   [E, 2*d_ff, d] (gate rows first) and experts.down_proj [E, d, d_ff]: the layout is picked by
 *   whether experts.gate_up_proj exists. Parameters a family has no tensor for (router.bias but in
 *   deepseek-v3, router.noise_weight, router.logit_bias and experts.b1/b3/b2 where the family has none) are
 *   set to zero, as the model has them.
 * The layer's configuration must match the checkpoint: every tensor the layer needs must exist with
 * exactly the layer's shape (global E experts; a gated family needs a GLU activation, "switch" a
 * plain one), and every tensor whose name starts with prefix + "." (every tensor, with no prefix)
 * must have a place in the layer. Tensors may be F32, BF16 or F16, whatever the layer's dtype:
 * each value is converted to the parameter's storage, rounded once to nearest even (exact when
 * the dtypes agree). With a comm of size R, a rank reads only its own experts' slices of the
 * global tensors, so one checkpoint serves any R.
 * Loading reads every tensor into staging memory before anything is changed: on failure the layer
 * is unchanged. Like moe_layer_set_param, a load between a training forward and its backward makes
 * that backward fail with MOE_ERR_STATE. Thread-safety: as moe_layer_set_param (one thread per
 * layer); the files may be read by other threads and processes at the same time, but must not be
 * changed while the call runs.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  layer or path NULL; an unknown family; a path that cannot be opened;
 *                             a malformed file (truncated, a header length past the end or over
 *                             100 MB, JSON that is not valid or not UTF-8, a key twice, offsets
 *                             outside the data or not matching dtype and shape, overlapping
 *                             tensors); a missing tensor, a wrong dtype or shape, a tensor under
 *                             prefix with no place in the layer, a configuration the family
 *                             cannot describe. The message names the file, the tensor and the fault.
 *   MOE_ERR_NONFINITE         check_finite is on and a value is not finite once stored;
 *   MOE_ERR_OUT_OF_MEMORY     the staging copies could not be allocated.
 */
MOE_API moe_status moe_layer_load(moe_layer *layer, const char *path, const char *prefix, const char *family);

/**
 * Write every parameter to one safetensors file in libmoe's names (prefix + "." + name; NULL or ""
 * prefix: the bare names), each in its storage dtype (moe_layer_param_dtype: F32, BF16 or F16) and
 * shape, with __metadata__ {"format": "pt", "producer": "libmoe"}, so that moe_layer_load(path,
 * prefix, "libmoe") into a layer of the same configuration restores it bit for bit. path is the
 * file, or a directory to write model.safetensors in. The write is atomic: a temporary file beside
 * the target, flushed and fsync'ed, renamed over it, the directory fsync'ed; on failure the
 * temporary file is removed and a previous file at path is left intact. Gradients are not saved.
 * Thread-safety: as moe_layer_get_param.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  layer or path NULL; the file cannot be created or written (the message
 *                             gives the system's reason: no such directory, permission, disk full);
 *   MOE_ERR_UNSUPPORTED       a layer with a comm of size > 1 (it holds only its rank's experts);
 *   MOE_ERR_OUT_OF_MEMORY     the host copies could not be allocated.
 */
MOE_API moe_status moe_layer_save(const moe_layer *layer, const char *path, const char *prefix);

/**
 * moe_layer_save in the key names and layout of a model family, so that moe_layer_load(path,
 * prefix, family) into a layer of the same configuration restores it bit for bit (and the family's
 * own code reads the file). family: NULL or "libmoe" is moe_layer_save; otherwise one of the
 * families of moe_layer_load, each written in one layout:
 *   "mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v3": transformers 5's fused experts,
 *       experts.gate_up_proj [E, 2*d_ff, d] (gate rows first) and experts.down_proj [E, d, d_ff],
 *       with the family's router (gate.weight; deepseek-v3's gate.e_score_correction_bias from
 *       router.bias) and shared-expert tensors (one module of width S*d_ff_shared);
 *   "switch": one module per expert, experts.expert_N.wi/wo.weight, router.classifier.weight (and
 *       router.classifier.bias from router.logit_bias, for a layer with router_logit_bias);
 *   "gpt-oss": the plain tensors of transformers 5's GptOssMLP (experts.gate_up_proj [E, d, 2*d_ff]
 *       interleaved, experts.down_proj [E, d_ff, d], their biases, router.weight, router.bias),
 *       never MXFP4.
 * Each tensor is in the storage dtype of the parameters it holds (the router's F32, the experts'
 * the layer's dtype). The write is atomic as moe_layer_save's; on any failure nothing is written
 * and a previous file at path is left intact. Thread-safety: as moe_layer_get_param.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  layer or path NULL; an unknown family; a configuration the family
 *                             cannot describe (as moe_layer_load refuses it: a gated family for a
 *                             plain FFN, shared experts or a shared gate the family lacks, gpt-oss
 *                             without MOE_ACT_SWIGLU_CLAMPED); a parameter the family has no tensor
 *                             for (router.bias but in deepseek-v3, router.noise_weight,
 *                             router.logit_bias and experts.b1/b3/b2 where the family has none)
 *                             holding a value other than zero, which a load would lose (the message
 *                             names the family, the parameter and the first such element; -0.0
 *                             counts as zero and loads as +0.0); the file cannot be created or
 *                             written (the message gives the system's reason);
 *   MOE_ERR_UNSUPPORTED       a layer with a comm of size > 1;
 *   MOE_ERR_OUT_OF_MEMORY     the host copies could not be allocated.
 */
MOE_API moe_status moe_layer_save_as(const moe_layer *layer, const char *path, const char *prefix,
                                     const char *family);

/* ---------------------------------------------------------------------------------------------
 * Contexts and compute
 * ------------------------------------------------------------------------------------------- */
typedef struct moe_context moe_context; /* what one training forward keeps for its backward */

/**
 * Create an empty context bound to layer (it may only be used with that layer and must be
 * destroyed before it). It owns the activations a training forward saves; reusing it for the
 * next step reuses its memory.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL arguments; MOE_ERR_OUT_OF_MEMORY.
 */
MOE_API moe_status moe_context_create(moe_layer *layer, moe_context **out);

/**
 * Free a context. NULL: no-op. On a CUDA layer its memory goes back to the device (the call waits
 * for the layer's stream), not only to the layer's memory pool.
 */
MOE_API void moe_context_destroy(moe_context *ctx);

/**
 * y = MoE(x) for num_tokens tokens. x and y are [num_tokens, d_model] in the layer's dtype on the
 * layer's device and must not overlap. num_tokens may be 0.
 * ctx NULL: inference (no noise, no saved state, no bias update).
 * ctx given: training: router noise on, routing statistics and activations saved in ctx for
 * moe_backward and the moe_context_* accessors, then, if bias_update_rate > 0, router.bias
 * updated from this batch's loads. The context's previous contents are replaced.
 * Deterministic: the same inputs, parameters, seed, step and thread count give the same bits.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  NULL layer, x or y with num_tokens > 0, num_tokens < 0 or too large,
 *                             a context of another layer, pointers on the wrong device;
 *   MOE_ERR_NONFINITE         check_finite on and x holds NaN/Inf (the message gives the index);
 *   MOE_ERR_OUT_OF_MEMORY, MOE_ERR_DEVICE, MOE_ERR_COMM.
 */
MOE_API moe_status moe_forward(moe_layer *layer, const void *x, int64_t num_tokens, void *y, moe_context *ctx);

/**
 * Backward of the training forward saved in ctx: given dy = dLoss/dy ([num_tokens, d_model]),
 * write dx = dLoss/dx (may be NULL if not wanted) and ADD to the gradient of every trainable
 * parameter, including the gradients of the auxiliary losses scaled by their coefficients, as if
 * the caller had added aux_loss_total to its loss. May be called again on the same context
 * (gradients accumulate again). Parameters must not change between the forward and this call.
 * @return MOE_OK;
 *   MOE_ERR_INVALID_ARGUMENT  NULL layer, ctx or dy (with tokens), a context of another layer;
 *   MOE_ERR_STATE             ctx holds no training forward (new, or filled by moe_route), or
 *                             moe_layer_set_param changed a trainable parameter since that forward
 *                             (writes through moe_layer_param_buffers are not tracked: the caller
 *                             must not make them in between);
 *   MOE_ERR_NONFINITE         check_finite on and dy holds NaN/Inf;
 *   MOE_ERR_OUT_OF_MEMORY, MOE_ERR_DEVICE, MOE_ERR_COMM.
 */
MOE_API moe_status moe_backward(moe_layer *layer, moe_context *ctx, const void *dy, void *dx);

/**
 * Scale the auxiliary-loss gradient that moe_backward adds for this context by scale (default 1,
 * kept until changed). 0 leaves the aux losses out of the gradient, as when the caller reports
 * them but does not train on them; a loss scaler passes its scale here (Megatron-Core's
 * MoEAuxLossAutoScaler). The reported loss values are not scaled.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for a NULL ctx or a scale that is not finite.
 */
MOE_API moe_status moe_context_set_aux_grad_scale(moe_context *ctx, float scale);

/**
 * Route num_tokens tokens without running any expert: fills ctx with the routing decisions and
 * statistics of an inference forward (no noise, no bias update). ctx cannot then be used for
 * moe_backward. @return as moe_forward; ctx is required (MOE_ERR_INVALID_ARGUMENT if NULL).
 */
MOE_API moe_status moe_route(moe_layer *layer, const void *x, int64_t num_tokens, moe_context *ctx);

typedef struct moe_stats {
  size_t struct_size;        /* sizeof(moe_stats), set by the caller */
  int64_t num_tokens;        /* T of the forward */
  int64_t num_slots;         /* routing slots: T*k (token choice) or E*C (expert choice) */
  int64_t dropped_slots;     /* slots dropped by capacity */
  float load_balance_loss;   /* LB, 1.0 when perfectly balanced */
  float z_loss;              /* mean over tokens of logsumexp(logits)^2 */
  float importance_loss;     /* CV^2 of per-expert gate-weight sums */
  float load_loss;           /* CV^2 of the smooth per-expert load (noisy routing) */
  float aux_loss_total;      /* the coefficient-weighted sum that backward differentiates */
  float load_cv;             /* std/mean of per-expert kept slot counts */
  float max_load_ratio;      /* max / mean of per-expert kept slot counts */
} moe_stats;

/**
 * Statistics of the forward or route held by ctx. out->struct_size must be set.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers or a struct_size too small;
 *         MOE_ERR_STATE if ctx holds no forward.
 */
MOE_API moe_status moe_context_stats(const moe_context *ctx, moe_stats *out);

/**
 * Bytes of memory ctx holds: what its training forward keeps for backward and the workspace of
 * its forwards and backwards (grow-only: reused by the next step of the same size). After a
 * training step this is the activation memory that step needs. An empty context holds 0.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL pointers.
 */
MOE_API moe_status moe_context_memory(const moe_context *ctx, size_t *bytes);

/** Per-expert kept slot counts [E] (after capacity). Errors as moe_context_stats. */
MOE_API moe_status moe_context_expert_counts(const moe_context *ctx, int64_t *counts);

/**
 * Token-choice routing decisions, [num_tokens, k] each, in choice order; a slot dropped by
 * capacity reads expert -1 and weight 0. Either pointer may be NULL.
 * @return as moe_context_stats; MOE_ERR_UNSUPPORTED for expert-choice routing (use
 *         moe_context_assignments).
 */
MOE_API moe_status moe_context_topk(const moe_context *ctx, int32_t *expert_ids, float *weights);

/**
 * Every kept (token, expert, weight) assignment, ordered by expert then token. *count receives
 * how many there are. With token, expert and weight all NULL this only queries *count; otherwise
 * each non-NULL array must hold capacity entries.
 * @return MOE_OK; MOE_ERR_INVALID_ARGUMENT for NULL ctx/count, capacity < 0, or capacity smaller
 *         than the number of assignments (the message gives it); MOE_ERR_STATE if no forward.
 */
MOE_API moe_status moe_context_assignments(const moe_context *ctx, int64_t capacity, int32_t *token,
                                           int32_t *expert, float *weight, int64_t *count);

/* ---------------------------------------------------------------------------------------------
 * Expert parallelism: a moe_comm is the caller's all-to-all. A rank holds E/size experts, rank r
 * the experts [r*E/size, (r+1)*E/size). libmoe_mpi (moe_mpi.h) provides a ready-made one.
 *  - moe_forward, moe_route and moe_backward become collective: every rank makes the same sequence
 *    of calls (a rank may pass num_tokens = 0). Hooks are called from the calling thread.
 *  - Routing is local; the aux losses, their gradients, the statistics and the bias update use
 *    sums over all ranks' tokens, so every rank sees the losses of the global batch.
 *  - router.* and shared.* are replicated: their gradients hold this rank's share; sum them over
 *    ranks (as data parallelism does) to get the gradient of the global batch. experts.* are the
 *    local experts and their gradients are complete.
 *  - Capacity is applied per rank over its own tokens (as in Megatron-Core); with
 *    capacity_group_size each rank groups its own tokens, so a rank whose num_tokens is a multiple
 *    of the group size (whole sequences) routes them as one process would.
 *  - Expert-choice routing with a comm is refused (MOE_ERR_UNSUPPORTED).
 * A hook returns MOE_OK or an error status; the call then fails with MOE_ERR_COMM naming the hook
 * (and giving the comm's reason, when last_error has one), the context is left empty, and the
 * layer stays usable. Every rank's hook must fail at the same
 * collective, or the others wait: a comm that can fail on one rank should abort its communicator.
 * ------------------------------------------------------------------------------------------- */
struct moe_comm {
  size_t struct_size; /* sizeof(moe_comm); see last_error for the older, shorter size */
  int size;           /* number of ranks R >= 1 */
  int rank;           /* 0 <= rank < size */
  void *user;         /* passed back to the hooks */
  /* send[r] rows go to rank r; receive recv[r] rows from rank r. Host arrays of size entries. */
  moe_status (*exchange_counts)(void *user, const int64_t *send, int64_t *recv);
  /* all-to-all of rows of row_bytes bytes: send holds send_counts[0] rows for rank 0, then rank 1,
     ...; recv likewise. Buffers on the layer's device. CPU layers pass stream NULL: the transfer
     is complete when the hook returns. CUDA layers pass the layer's cudaStream_t: send is ready
     when the hook is called, and the hook may return once the transfer is queued on stream
     (libmoe's next work on recv is queued after it); a hook that copies on any other stream or
     through the host must finish before it returns. */
  moe_status (*exchange_rows)(void *user, const void *send, const int64_t *send_counts, void *recv,
                              const int64_t *recv_counts, size_t row_bytes, void *stream);
  /* Optional (may be NULL): the comm's reason for the failure of the hook that just returned an
     error, e.g. MPI's or NCCL's message. Called right after such a hook, on the same thread, before
     any other hook call on this comm; the call then fails with a moe_last_error() text that ends
     with this reason (up to 1024 bytes of it). Returns a NUL-terminated string owned by the comm,
     valid until the next hook call on this comm or its destruction; NULL or "" when there is no
     reason to give (the text then names the hook and its status only). Called only by the thread
     running the failed collective, so it needs no more thread-safety than the hooks themselves.
     A comm built against a moe.h without this field has struct_size offsetof(moe_comm,
     last_error): it is accepted, and this field is never read. */
  const char *(*last_error)(void *user);
};

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOE_MOE_H */
