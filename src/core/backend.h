/* The table of stage functions a backend implements. The core owns the order of the stages and
 * every buffer; a backend only computes. Plain C so that the CUDA module (built and loaded
 * separately) and the core share no C++ types. Pointers are on the backend's device unless a
 * field says "host". Every function returns a moe_status; on failure, ops->last_error(state)
 * gives the message. */
#ifndef MOE_CORE_BACKEND_H
#define MOE_CORE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_BACKEND_ABI 6

/* Stages that run after an output was first written (the shared experts' expert_ffn after y; in
 * backward, expert_ffn_bwd, shared_combine_bwd and gate_bwd, which add to gradients) are first
 * called with `prepare` set: the call makes ready everything the same call without it needs
 * (kernels, scratch memory) and computes and writes nothing. The core does this before the first
 * write, so that no allocation can fail once an output or a gradient has changed. */

/* Activation storage (shared/DESIGN.md section 3): fields typed `void *` below hold elements of
 * the args' `dtype` (a moe_dtype: float32, bfloat16 or float16); everything typed `float *` is
 * float32 whatever the dtype. Products accumulate in float32, and an output in bf16/f16 is
 * rounded once, to nearest even. The router works in float32 throughout: its input is a float32
 * copy of x, and router.weight, router.noise_weight, router.bias and shared.gate are float32;
 * experts.* and shared.w* are stored in the layer's dtype. */

typedef struct moe_gate_args {
  int64_t T, d, E;
  const float *x;       /* [T,d] router input */
  const float *w;       /* [E,d] */
  float *logits;        /* [T,E] out */
  /* training noise (shared/DESIGN.md section 4); noise = MOE_NOISE_NONE in inference */
  int noise;            /* moe_noise */
  float noise_eps;      /* jitter half-width */
  uint64_t seed, step;  /* key the counter-based draws with (t, e) or (t, c) */
  const float *wn;      /* [E,d] router.noise_weight (GAUSSIAN) */
  float *xr;            /* [T,d] out: the jittered router input (JITTER) */
  float *clean_logits;  /* [T,E] out: x Wr^T before noise (GAUSSIAN) */
  float *noise_std;     /* [T,E] out: softplus(x Wn^T) (GAUSSIAN) */
  float *noise_draws;   /* [T,E] out: the N(0,1) draws (GAUSSIAN) */
  /* backward */
  const float *dlogits; /* [T,E] gradient of the (noisy) logits */
  const float *dclean_extra, *dstd_extra; /* [T,E] load-loss terms (GAUSSIAN) */
  float *scratch;       /* [2,T,E] (GAUSSIAN); [T,d] (JITTER with dx; NULL: the stage allocates) */
  float *dx;            /* [T,d] accumulated (+=); NULL: not wanted */
  float *dw;            /* [E,d] accumulated (+=) */
  float *dwn;           /* [E,d] accumulated (+=) (GAUSSIAN) */
  int prepare;          /* gate_bwd: make ready only (see above) */
  /* router_logit_bias: b [E] added to every row of the logits (to the clean logits, before noise,
     with GAUSSIAN); NULL: none. Backward: db += sum over tokens of the gradient of the (clean)
     logits, in token order. */
  const float *logit_bias;
  float *dlogit_bias;
} moe_gate_args;

typedef struct moe_select_args {
  int64_t T, E, k;
  int score;            /* moe_score */
  int normalize;
  float routed_scale;
  int64_t num_groups, topk_groups;
  const float *logits;  /* [T,E] */
  const float *bias;    /* [E] selection bias */
  float *scores;        /* [T,E] out: S */
  float *lse;           /* [T] out: logsumexp of each logits row */
  int32_t *topk_ids;    /* [T,k] out */
  float *topk_w;        /* [T,k] out: final weights, before capacity */
  int expert_choice;    /* nonzero: no per-token top-k (the plan selects) */
  const float *clean_logits, *noise_std; /* [T,E] GAUSSIAN training, else NULL */
  /* aux-loss terms, out, reduced in a fixed order */
  double *load_sum;     /* host [E]: sum over tokens of Phi((clean - threshold) / std) (GAUSSIAN) */
  int64_t *counts;      /* host [E]: slots routed to each expert before capacity */
  double *prob_sum;     /* host [E]: sum over tokens of P[t,e] */
  double *lse_sq_sum;   /* host [1]: sum over tokens of lse^2 */
} moe_select_args;

typedef struct moe_plan_args {
  int64_t T, E, k;
  int64_t capacity;          /* slots per expert in each capacity group, < 0: dropless */
  int drop_policy;           /* moe_drop_policy */
  /* Capacity groups (moe_config.capacity_group_size): tokens [g*group_size, (g+1)*group_size) are
     group g, whose slots are ranked and capped on their own (expert choice: each expert takes its
     best tokens of each group). The last group is shorter when group_size does not divide T and
     then has last_capacity. group_size <= 0 or >= T: one group of all T tokens with `capacity`. */
  int64_t group_size;
  int64_t last_capacity;
  const int32_t *topk_ids;   /* [T,k] */
  const float *topk_w;       /* [T,k] */
  int32_t *row_of_slot;      /* [T*k] out: row of slot t*k+j, -1 when dropped */
  int32_t *row_token;        /* [T*k] out: token of row r (first R entries) */
  int32_t *row_slot;         /* [T*k] out: slot of row r */
  float *row_weight;         /* [T*k] out: weight of row r */
  int64_t *offsets;          /* host [E+1] out: rows of expert e are [offsets[e], offsets[e+1]) */
  int64_t *kept;             /* host [E] out: rows kept per expert */
  double *weight_sum;        /* host [E] out: sum of kept weights per expert, in the order of core/weight_sum.h */
  /* expert choice: each expert takes its `capacity` best tokens by scores[:, e] */
  int expert_choice;
  const float *scores;       /* [T,E] */
  int64_t *token_offsets;    /* [T+1] out: rows of token t are token_rows[token_offsets[t]..] */
  int32_t *token_rows;       /* [E * the capacities of the groups] out, each token's rows in expert order */
} moe_plan_args;

typedef struct moe_select_bwd_args {
  int64_t T, E, k;
  int score, normalize;
  float routed_scale;
  const float *logits, *scores, *lse; /* saved by select */
  const int32_t *topk_ids;            /* [T,k] */
  const int32_t *row_of_slot;         /* [T*k] */
  const float *drow_weight;           /* [R] dLoss/d(weight of row r) */
  const float *lb_coef;               /* host [E]: dLoss/dP[t,e] for every t (load-balance term) */
  const float *gate_coef;             /* host [E] or NULL: added to dLoss/dweight of each kept slot of e */
  float z_coef;                       /* dLoss/dZ */
  float *dlogits;                     /* [T,E] out (overwritten) */
  /* expert choice: rows reached through each token's rows; row_slot[r] = t*E + e */
  int expert_choice;
  const int64_t *token_offsets;
  const int32_t *token_rows;
  const int32_t *row_slot;
  /* Shazeer's smooth load loss (GAUSSIAN) */
  const float *clean_logits, *noise_std;
  const float *load_coef;             /* host [E] dLoss/dload_e, or NULL */
  float *dclean_extra, *dstd_extra;   /* [T,E] out when load_coef is set */
} moe_select_bwd_args;

typedef struct moe_rows_args {
  int64_t T, d, R;
  int dtype;                 /* moe_dtype of x, xe, dxe, ye, dy, dye */
  int64_t k;                 /* rows per token in token_rows when token_offsets is NULL */
  const int64_t *token_offsets; /* [T+1] or NULL (fixed k per token) */
  const int32_t *token_rows; /* row of each (token, j); -1 = none */
  const int32_t *row_token;  /* [R] */
  const float *row_weight;   /* [R] */
  /* dispatch: xe[r] = x[row_token[r]];  backward: dx[t] = sum of dxe over t's rows (float32) */
  const void *x; void *xe;
  const void *dxe; float *dx;
  /* combine: y[t] = sum of row_weight[r] * ye[r] (float32);
     backward: dye[r] = w_r dy[t], dw_r = <dy[t], ye[r]> */
  const void *ye; float *y;
  const void *dy; void *dye; float *drow_weight;
} moe_rows_args;

typedef struct moe_ffn_args {
  int64_t num_experts, d, ff;
  int activation;            /* moe_activation */
  int dtype;                 /* moe_dtype of every tensor below but a float32 dx (shared_input) */
  const int64_t *offsets;    /* host [num_experts+1]: row range of each expert */
  int shared_input;          /* nonzero: every expert reads rows [0, offsets[1]) of x */
  const void *x;             /* [R,d] (or [rows,d]) */
  const void *w1, *w3, *w2;  /* [E,ff,d], [E,ff,d] (GLU only), [E,d,ff] */
  void *h, *g;               /* [R,ff] pre-activations (g: GLU only); saved for backward */
  void *a;                   /* [R,ff] scratch: activation output */
  void *y;                   /* [R,d] out */
  /* backward */
  const void *dy;            /* [R,d] */
  void *dx;                  /* [R,d] out (overwritten), in dtype; with shared_input it is float32
                                [rows,d] and every expert's dx is added (+=); NULL: not wanted */
  void *dw1, *dw3, *dw2;     /* accumulated (+=) */
  void *dh, *dg;             /* [R,ff] scratch */
  int prepare;               /* expert_ffn, expert_ffn_bwd: make ready only (see above) */
  /* expert_bias: [E,ff], [E,ff] (GLU), [E,d] in dtype, added before h, g and y are stored (each
     rounded once with its sum); NULL: none. Backward: db1 += column sums of dh, db3 of dg, db2
     of dy over the expert's rows, rounded once when added. */
  const void *b1, *b3, *b2;
  void *db1, *db3, *db2;
  float swiglu_alpha, swiglu_limit; /* MOE_ACT_SWIGLU_CLAMPED */
  /* expert_ffn: nonzero when nothing reads h, g and a after the call (an inference forward): the
     backend may leave them in any layout; only y counts. Backward never sees it set. */
  int inference;
} moe_ffn_args;

typedef struct moe_shared_args {
  int64_t T, d, S;
  int dtype;                 /* moe_dtype of x, ys, dy, dys */
  const void *x;             /* [T,d] */
  const float *gate_w;       /* [d] or NULL: no gate */
  const void *ys;            /* [S*T,d] outputs of the shared experts */
  float *gate;               /* [T] saved sigmoid(x . gate_w) */
  float *y;                  /* [T,d] accumulated: y += gate * sum_s ys[s] */
  /* backward */
  const void *dy;            /* [T,d] */
  void *dys;                 /* [S*T,d] out */
  float *dx;                 /* [T,d] accumulated */
  float *dgate_w;            /* [d] accumulated */
  float *scratch;            /* [T] backward scratch when gate_w is set (NULL: the stage allocates) */
  int prepare;               /* shared_combine_bwd: make ready only (see above) */
} moe_shared_args;

typedef struct moe_backend_ops {
  uint32_t abi;     /* MOE_BACKEND_ABI */
  const char *name; /* "cpu", "cuda" */
  /* On failure *state is NULL, or a state whose last_error gives the reason; the caller destroys it. */
  moe_status (*create)(const moe_config *cfg, void **state);
  void (*destroy)(void *state);
  const char *(*last_error)(void *state);
  moe_status (*set_stream)(void *state, void *stream);
  /* memory */
  moe_status (*alloc)(void *state, size_t bytes, void **out);
  void (*free)(void *state, void *p);
  moe_status (*memset_zero)(void *state, void *p, size_t bytes);
  moe_status (*upload)(void *state, void *dst, const void *host, size_t bytes);
  moe_status (*download)(void *state, void *host, const void *src, size_t bytes);
  moe_status (*copy)(void *state, void *dst, const void *src, size_t bytes); /* device to device */
  moe_status (*check_pointer)(void *state, const void *p); /* MOE_OK if p is on this device */
  /* *first = index of the first element of p (n elements of dtype) that is not finite, -1: none */
  moe_status (*find_nonfinite)(void *state, const void *p, int dtype, int64_t n, int64_t *first);
  /* dst[i] = src[i] for n elements, converted (rounded to nearest even when narrowing); dst and
     src do not overlap */
  moe_status (*convert)(void *state, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n);
  moe_status (*synchronize)(void *state);
  /* stages, in pipeline order */
  moe_status (*gate)(void *state, const moe_gate_args *a);
  moe_status (*select)(void *state, const moe_select_args *a);
  moe_status (*plan)(void *state, const moe_plan_args *a);
  moe_status (*dispatch)(void *state, const moe_rows_args *a);
  moe_status (*expert_ffn)(void *state, const moe_ffn_args *a);
  moe_status (*combine)(void *state, const moe_rows_args *a);
  moe_status (*shared_combine)(void *state, const moe_shared_args *a);
  /* backward stages, in pipeline order */
  moe_status (*shared_combine_bwd)(void *state, const moe_shared_args *a);
  moe_status (*combine_bwd)(void *state, const moe_rows_args *a);
  moe_status (*expert_ffn_bwd)(void *state, const moe_ffn_args *a);
  moe_status (*dispatch_bwd)(void *state, const moe_rows_args *a);
  moe_status (*select_bwd)(void *state, const moe_select_bwd_args *a);
  moe_status (*gate_bwd)(void *state, const moe_gate_args *a);
  /* the stream the stages run on (cudaStream_t), handed to moe_comm hooks; NULL for the CPU */
  void *(*stream)(void *state);
  /* *bytes = the device memory the backend holds from its device: every buffer it allocated, its
     own scratch, and memory freed but kept for reuse. With trim set, first gives back to the
     device what none of those holds (waiting for the work queued on the stream, whose frees
     return memory when they run). The core trims when a context is destroyed and after a call
     that replaced a buffer by a larger one. NULL for a backend that keeps no memory of its own
     (the CPU backend: its buffers are the process heap's). */
  moe_status (*reserved)(void *state, int trim, size_t *bytes);
} moe_backend_ops;

/* The CPU backend, always linked in. */
const moe_backend_ops *moe_cpu_backend(void);

/* Symbol the CUDA module exports: returns its table for the given ABI, NULL on mismatch. */
typedef const moe_backend_ops *(*moe_backend_entry_fn)(uint32_t abi);
#define MOE_CUDA_BACKEND_ENTRY "moe_cuda_backend_v1"

#ifdef __cplusplus
}
#endif

#endif /* MOE_CORE_BACKEND_H */
