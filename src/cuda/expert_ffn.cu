// Each expert's FFN over its rows: GEMM (W1 and W3 together for GLU), the activation over every
// row at once, GEMM; and the backward. GEMMs are issued per expert on the layer's stream, sized
// from the host offsets the plan returned. Every tensor is in the layer's dtype (T); GEMMs
// accumulate in float32 and the activation computes in float32 from the stored h and g.
#include "cuda/activation.cuh"
#include "cuda/cuda.h"
#include "cuda/gemm.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;

bool glu(int kind) { return kind == MOE_ACT_SWIGLU || kind == MOE_ACT_GEGLU || kind == MOE_ACT_SWIGLU_CLAMPED; }

struct Rows {
  int64_t begin, n;
};

Rows rows_of(const moe_ffn_args *a, int64_t e) {
  if (a->shared_input) return {e * a->offsets[1], a->offsets[1]};
  return {a->offsets[e], a->offsets[e + 1] - a->offsets[e]};
}

// Rows of every expert together; they start at row 0 (the core's offsets begin at 0), so the
// activation runs over all of them in one launch.
int64_t total_rows(const moe_ffn_args *a) {
  if (!a->shared_input && a->offsets[0] != 0)
    fail(MOE_ERR_INTERNAL, "expert_ffn: offsets[0] is %lld, expected 0", (long long)a->offsets[0]);
  return a->shared_input ? a->num_experts * a->offsets[1] : a->offsets[a->num_experts];
}

// The activation and its parameters (MOE_ACT_SWIGLU_CLAMPED's alpha and limit).
struct ActK {
  int kind;
  float alpha, limit;
};

// out = act(h) (* g) for the W elements of pack i.
template <int W, class T>
__device__ __forceinline__ void act_fwd_at(ActK k, const T *h, const T *g, T *out, int64_t i) {
  const int kind = k.kind;
  const Frag<W> hv = load<W>(h, i);
  Frag<W> o;
  if (kind == MOE_ACT_SWIGLU_CLAMPED) {
    const Frag<W> gv = load<W>(g, i);
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] = swiglu_clamped(hv.v[j], gv.v[j], k.alpha, k.limit).a;
    store<W>(out, i, o);
    return;
  }
#pragma unroll
  for (int j = 0; j < W; ++j) o.v[j] = activation(kind, hv.v[j]).a;
  if (g) {
    const Frag<W> gv = load<W>(g, i);
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] *= gv.v[j];
  }
  store<W>(out, i, o);
}

// From d = dLoss/d(out): dh = d * g * act'(h), dg = d * act(h) (GLU); dh overwrites d.
template <int W, class T>
__device__ __forceinline__ void act_bwd_at(ActK k, const T *h, const T *g, T *d_dh, T *dg, int64_t i) {
  const int kind = k.kind;
  const Frag<W> hv = load<W>(h, i), dv = load<W>(d_dh, i);
  Frag<W> dh, dgv;
  if (kind == MOE_ACT_SWIGLU_CLAMPED) {
    const Frag<W> gv = load<W>(g, i);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const Clamped v = swiglu_clamped(hv.v[j], gv.v[j], k.alpha, k.limit);
      dgv.v[j] = dv.v[j] * v.du;
      dh.v[j] = dv.v[j] * v.dh;
    }
    store<W>(dg, i, dgv);
  } else if (kind == MOE_ACT_RELU) {
    // A select, as on the CPU: an inf or NaN gradient stays out.
#pragma unroll
    for (int j = 0; j < W; ++j) dh.v[j] = hv.v[j] > 0.0f ? dv.v[j] : 0.0f;
  } else if (g) {
    const Frag<W> gv = load<W>(g, i);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const Act v = activation(kind, hv.v[j]);
      dgv.v[j] = dv.v[j] * v.a;
      dh.v[j] = dv.v[j] * gv.v[j] * v.da;
    }
    store<W>(dg, i, dgv);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) dh.v[j] = dv.v[j] * activation(kind, hv.v[j]).da;
  }
  store<W>(d_dh, i, dh);
}

// Elementwise kernels: W-wide packs, then the n % W elements past the last pack one at a time.
template <class T, int W>
__global__ void act_fwd_kernel(ActK kind, const T *h, const T *g, T *out, int64_t n) {
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x, stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t packs = n / W;
  for (int64_t i = first; i < packs; i += stride) act_fwd_at<W>(kind, h, g, out, i);
  for (int64_t i = packs * W + first; i < n; i += stride) act_fwd_at<1>(kind, h, g, out, i);
}

template <class T, int W>
__global__ void act_bwd_kernel(ActK kind, const T *h, const T *g, T *d_dh, T *dg, int64_t n) {
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x, stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t packs = n / W;
  for (int64_t i = first; i < packs; i += stride) act_bwd_at<W>(kind, h, g, d_dh, dg, i);
  for (int64_t i = packs * W + first; i < n; i += stride) act_bwd_at<1>(kind, h, g, d_dh, dg, i);
}

ActK act_of(const moe_ffn_args *a) { return {a->activation, a->swiglu_alpha, a->swiglu_limit}; }

// Every row of m [rows, n] (type T) = b [n] (type T): the bias that a GEMM with beta 1 then adds
// to, so that the sum is rounded once.
template <class T>
__global__ void broadcast_rows_kernel(T *m, const T *b, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x)
    m[i] = b[i % n];
}

// db [n] += column sums of src [rows, n] (type T), each summed in row order in float32 and
// rounded once when added.
template <class T>
__global__ void column_sums_kernel(T *db, const T *src, int64_t rows, int64_t n) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < n; c += int64_t{gridDim.x} * blockDim.x) {
    float s = 0.0f;
    for (int64_t r = 0; r < rows; ++r) s += to_float(src[r * n + c]);
    db[c] = from_float<T>(to_float(db[c]) + s);
  }
}

template <class T>
void broadcast_rows(State &st, T *m, const T *b, int64_t rows, int64_t n) {
  const int64_t total = checked_mul(rows, n, "rows * bias width");
  broadcast_rows_kernel<T><<<stride_blocks(st, total, kThreads), kThreads, 0, st.stream>>>(m, b, rows, n);
  check_launch("expert bias");
}

template <class T>
void column_sums(State &st, T *db, const T *src, int64_t rows, int64_t n) {
  column_sums_kernel<T><<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(db, src, rows, n);
  check_launch("expert bias backward");
}

template <class T>
void act_forward(State &st, const moe_ffn_args *a, int64_t n) {
  if (n == 0) return;
  const T *h = static_cast<const T *>(a->h), *g = glu(a->activation) ? static_cast<const T *>(a->g) : nullptr;
  T *out = static_cast<T *>(a->a);
  // Packs need aligned pointers only: the tail takes any length.
  with_width<T>(aligned16({h, g, out}), [&](auto width) {
    constexpr int W = decltype(width)::value;
    act_fwd_kernel<T, W>
        <<<stride_blocks(st, n / W + 1, kThreads), kThreads, 0, st.stream>>>(act_of(a), h, g, out, n);
  });
  check_launch("activation");
}

template <class T>
void act_backward(State &st, const moe_ffn_args *a, int64_t n) {
  if (n == 0) return;
  const bool is_glu = glu(a->activation);
  const T *h = static_cast<const T *>(a->h), *g = is_glu ? static_cast<const T *>(a->g) : nullptr;
  T *dh = static_cast<T *>(a->dh), *dg = is_glu ? static_cast<T *>(a->dg) : nullptr;
  with_width<T>(aligned16({h, g, dh, dg}), [&](auto width) {
    constexpr int W = decltype(width)::value;
    act_bwd_kernel<T, W>
        <<<stride_blocks(st, n / W + 1, kThreads), kThreads, 0, st.stream>>>(act_of(a), h, g, dh, dg, n);
  });
  check_launch("activation backward");
}

template <class T>
void forward(State &st, const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  const T *x = static_cast<const T *>(a->x), *w1 = static_cast<const T *>(a->w1), *w3 = static_cast<const T *>(a->w3),
          *w2 = static_cast<const T *>(a->w2);
  T *h = static_cast<T *>(a->h), *g = static_cast<T *>(a->g), *act = static_cast<T *>(a->a),
    *y = static_cast<T *>(a->y);
  const T *b1 = static_cast<const T *>(a->b1), *b3 = static_cast<const T *>(a->b3), *b2 = static_cast<const T *>(a->b2);
  for (int64_t e = 0; e < a->num_experts; ++e) {
    const Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const T *xr = a->shared_input ? x : x + r.begin * d;
    // With biases the rows start as the bias and the GEMM adds to them (beta 1).
    if (b1) broadcast_rows(st, h + r.begin * ff, b1 + e * ff, r.n, ff);
    if (b3 && is_glu) broadcast_rows(st, g + r.begin * ff, b3 + e * ff, r.n, ff);
    gemm(st, false, true, r.n, ff, d, 1.0f, xr, d, w1 + e * ff * d, d, b1 ? 1.0f : 0.0f, h + r.begin * ff, ff);
    if (is_glu)
      gemm(st, false, true, r.n, ff, d, 1.0f, xr, d, w3 + e * ff * d, d, b3 ? 1.0f : 0.0f, g + r.begin * ff, ff);
  }
  act_forward<T>(st, a, checked_mul(total_rows(a), ff, "rows * d_ff"));
  for (int64_t e = 0; e < a->num_experts; ++e) {
    const Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    if (b2) broadcast_rows(st, y + r.begin * d, b2 + e * d, r.n, d);
    gemm(st, false, true, r.n, d, ff, 1.0f, act + r.begin * ff, ff, w2 + e * d * ff, ff, b2 ? 1.0f : 0.0f,
         y + r.begin * d, d);
  }
}

template <class T>
void backward(State &st, const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  const int64_t rows = total_rows(a), n = checked_mul(rows, ff, "rows * d_ff");
  const T *x = static_cast<const T *>(a->x), *w1 = static_cast<const T *>(a->w1), *w3 = static_cast<const T *>(a->w3),
          *w2 = static_cast<const T *>(a->w2), *dy_all = static_cast<const T *>(a->dy);
  T *act = static_cast<T *>(a->a), *dh_all = static_cast<T *>(a->dh), *dg_all = static_cast<T *>(a->dg);
  T *dw1 = static_cast<T *>(a->dw1), *dw3 = static_cast<T *>(a->dw3), *dw2 = static_cast<T *>(a->dw2);
  // A routed expert's dx in 16 bits takes two GEMMs under GLU (dh W1 + dg W3): they add in a float32
  // buffer so that dx is rounded once. Shared experts' dx is float32 already. Allocated first:
  // nothing may fail for lack of memory once dw has been added to.
  constexpr bool kNarrow = sizeof(T) < sizeof(float);
  float *dx32 = nullptr;
  if (kNarrow && a->dx && !a->shared_input && is_glu && rows > 0) {
    st.scratch[0].ensure(checked_bytes(checked_mul(rows, d, "rows * d_model"), sizeof(float), "expert_ffn_bwd"), st);
    dx32 = st.scratch[0].as<float>();
  }
  if (a->prepare) return;  // ready: the scratch is there
  // A is recomputed rather than saved: one pass over H and G instead of R*ff more memory.
  act_forward<T>(st, a, n);
  for (int64_t e = 0; e < a->num_experts; ++e) {
    const Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const T *dy = dy_all + r.begin * d;
    if (a->db2) column_sums(st, static_cast<T *>(a->db2) + e * d, dy, r.n, d);
    // dW2 += dY^T A ; dA = dY W2 (into dh)
    gemm(st, true, false, d, ff, r.n, 1.0f, dy, d, act + r.begin * ff, ff, 1.0f, dw2 + e * d * ff, ff);
    gemm(st, false, false, r.n, ff, d, 1.0f, dy, d, w2 + e * d * ff, ff, 0.0f, dh_all + r.begin * ff, ff);
  }
  act_backward<T>(st, a, n);
  for (int64_t e = 0; e < a->num_experts; ++e) {
    const Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const T *xr = a->shared_input ? x : x + r.begin * d;
    const T *dh = dh_all + r.begin * ff, *dg = is_glu ? dg_all + r.begin * ff : nullptr;
    if (a->db1) column_sums(st, static_cast<T *>(a->db1) + e * ff, dh, r.n, ff);
    if (a->db3 && dg) column_sums(st, static_cast<T *>(a->db3) + e * ff, dg, r.n, ff);
    gemm(st, true, false, ff, d, r.n, 1.0f, dh, ff, xr, d, 1.0f, dw1 + e * ff * d, d);
    if (is_glu) gemm(st, true, false, ff, d, r.n, 1.0f, dg, ff, xr, d, 1.0f, dw3 + e * ff * d, d);
    if (!a->dx) continue;
    const T *w1e = w1 + e * ff * d, *w3e = is_glu ? w3 + e * ff * d : nullptr;
    if (a->shared_input) {
      // Shared experts all read the same x, so their input gradients add into the caller's dx.
      float *dx = static_cast<float *>(a->dx);
      gemm(st, false, false, r.n, d, ff, 1.0f, dh, ff, w1e, d, 1.0f, dx, d);
      if (is_glu) gemm(st, false, false, r.n, d, ff, 1.0f, dg, ff, w3e, d, 1.0f, dx, d);
    } else if (dx32) {
      float *dx = dx32 + r.begin * d;
      gemm(st, false, false, r.n, d, ff, 1.0f, dh, ff, w1e, d, 0.0f, dx, d);
      gemm(st, false, false, r.n, d, ff, 1.0f, dg, ff, w3e, d, 1.0f, dx, d);
    } else {
      T *dx = static_cast<T *>(a->dx) + r.begin * d;
      gemm(st, false, false, r.n, d, ff, 1.0f, dh, ff, w1e, d, 0.0f, dx, d);
      if (is_glu) gemm(st, false, false, r.n, d, ff, 1.0f, dg, ff, w3e, d, 1.0f, dx, d);
    }
  }
  if (dx32) convert_elements(st, a->dx, a->dtype, dx32, MOE_DTYPE_F32, checked_mul(rows, d, "rows * d_model"));
}

}  // namespace

moe_status expert_ffn(void *state, const moe_ffn_args *a) {
  return guarded(state, [&](State &st) {
    if (a->prepare) return;  // the forward allocates nothing
    with_dtype(a->dtype, "expert_ffn", [&](auto type) { forward<typename decltype(type)::type>(st, a); });
  });
}

moe_status expert_ffn_bwd(void *state, const moe_ffn_args *a) {
  return guarded(state, [&](State &st) {
    with_dtype(a->dtype, "expert_ffn_bwd", [&](auto type) { backward<typename decltype(type)::type>(st, a); });
  });
}

}  // namespace moe::cuda
