// Each expert's FFN over its rows: GEMM, activation (GLU or plain), GEMM; and the backward.
#include <algorithm>
#include <climits>
#include <vector>

#include "cpu/activation.h"
#include "cpu/blas.h"
#include "cpu/cpu.h"
#include "cpu/elem.h"

namespace moe::cpu {

namespace {

// Elementwise work split into contiguous chunks, one per thread, each a vectorised call.
template <class F>
void chunked(int64_t n, F &&f) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk) - c * kChunk);
}

bool glu(int kind) { return kind == MOE_ACT_SWIGLU || kind == MOE_ACT_GEGLU; }

struct Rows {
  int64_t begin, n;
};

Rows rows_of(const moe_ffn_args *a, int64_t e) {
  if (a->shared_input) return {e * a->offsets[1], a->offsets[1]};
  return {a->offsets[e], a->offsets[e + 1] - a->offsets[e]};
}

// Typed views of the args' float32 storage.
const float *cf(const void *p) { return static_cast<const float *>(p); }
float *mf(void *p) { return static_cast<float *>(p); }

const float *input_of(const moe_ffn_args *a, const Rows &r) {
  return a->shared_input ? cf(a->x) : cf(a->x) + r.begin * a->d;
}

void forward_f32(const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  for (int64_t e = 0; e < a->num_experts; ++e) {
    Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const float *x = input_of(a, r);
    float *h = mf(a->h) + r.begin * ff;
    float *g = is_glu ? mf(a->g) + r.begin * ff : nullptr;
    float *act_out = mf(a->a) + r.begin * ff;
    sgemm(false, true, r.n, ff, d, 1.0f, x, d, cf(a->w1) + e * ff * d, d, 0.0f, h, ff);
    if (is_glu) sgemm(false, true, r.n, ff, d, 1.0f, x, d, cf(a->w3) + e * ff * d, d, 0.0f, g, ff);
    chunked(r.n * ff, [&](int64_t at, int64_t len) {
      activation_forward(a->activation, h + at, g ? g + at : nullptr, act_out + at, len);
    });
    sgemm(false, true, r.n, d, ff, 1.0f, act_out, ff, cf(a->w2) + e * d * ff, ff, 0.0f, mf(a->y) + r.begin * d, d);
  }
}

void backward_f32(const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  const int kind = a->activation;
  for (int64_t e = 0; e < a->num_experts; ++e) {
    Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const float *x = input_of(a, r);
    const float *h = cf(a->h) + r.begin * ff;
    const float *g = is_glu ? cf(a->g) + r.begin * ff : nullptr;
    const float *dy = cf(a->dy) + r.begin * d;
    float *act_out = mf(a->a) + r.begin * ff;
    float *dh = mf(a->dh) + r.begin * ff;
    float *dg = is_glu ? mf(a->dg) + r.begin * ff : nullptr;
    const float *w1 = cf(a->w1) + e * ff * d, *w2 = cf(a->w2) + e * d * ff;
    const float *w3 = is_glu ? cf(a->w3) + e * ff * d : nullptr;
    // A is recomputed rather than saved: one pass over H and G instead of R*ff more memory.
    chunked(r.n * ff, [&](int64_t at, int64_t len) {
      activation_forward(kind, h + at, g ? g + at : nullptr, act_out + at, len);
    });
    // dW2 += dY^T A ; dA = dY W2 (into dh)
    sgemm(true, false, d, ff, r.n, 1.0f, dy, d, act_out, ff, 1.0f, mf(a->dw2) + e * d * ff, ff);
    sgemm(false, false, r.n, ff, d, 1.0f, dy, d, w2, ff, 0.0f, dh, ff);
    chunked(r.n * ff, [&](int64_t at, int64_t len) {
      activation_backward(kind, h + at, g ? g + at : nullptr, dh + at, dg ? dg + at : nullptr, len);
    });
    sgemm(true, false, ff, d, r.n, 1.0f, dh, ff, x, d, 1.0f, mf(a->dw1) + e * ff * d, d);
    if (is_glu) sgemm(true, false, ff, d, r.n, 1.0f, dg, ff, x, d, 1.0f, mf(a->dw3) + e * ff * d, d);
    if (a->dx) {
      // Shared experts all read the same x, so their input gradients add into the caller's dx.
      float *dx = a->shared_input ? mf(a->dx) : mf(a->dx) + r.begin * d;
      const float beta = a->shared_input ? 1.0f : 0.0f;
      sgemm(false, false, r.n, d, ff, 1.0f, dh, ff, w1, d, beta, dx, d);
      if (is_glu) sgemm(false, false, r.n, d, ff, 1.0f, dg, ff, w3, d, 1.0f, dx, d);
    }
  }
}

// bfloat16/float16 experts run the float32 code one expert at a time on widened copies: the GEMMs
// accumulate in float32 (as cuBLAS does with a 32F compute type), and what the stage stores (h, g,
// y, dx, the accumulated weight gradients) is rounded once per call. The float32 copies live in the
// backend's arena, grown for the largest expert before any output is written, so running out of
// memory leaves every output (and gradient) as it was.
class Widened {
 public:
  Widened(int dtype, std::vector<float> &arena, size_t floats) : dtype_(dtype), arena_(arena) {
    if (arena_.size() < floats) arena_.resize(floats);
  }
  // A float32 copy of n elements of p from element offset.
  float *in(const void *p, int64_t offset, int64_t n) {
    float *v = next(n);
    convert_host(v, MOE_DTYPE_F32, elem_at(p, dtype_, offset), dtype_, n);
    return v;
  }
  // A float32 buffer of n elements (zeros, or p's values when accumulate) that flush() rounds into
  // p from element offset; p NULL: scratch, never stored.
  float *out(void *p, int64_t offset, int64_t n, bool accumulate = false) {
    float *buf = accumulate ? in(p, offset, n) : next(n);
    if (!accumulate) std::fill(buf, buf + n, 0.0f);
    if (p) pending_[npending_++] = {buf, elem_at(p, dtype_, offset), n};
    return buf;
  }
  // What was taken so far stays for the whole call (flush() recycles only what follows).
  void keep() { kept_ = used_; }
  // Stores the outputs and recycles the arena past what keep() kept.
  void flush() {
    for (size_t i = 0; i < npending_; ++i)
      convert_host(pending_[i].dst, dtype_, pending_[i].src, MOE_DTYPE_F32, pending_[i].n);
    npending_ = 0;
    used_ = kept_;
  }

 private:
  struct Pending {
    const float *src;
    void *dst;
    int64_t n;
  };
  float *next(int64_t n) {
    if (static_cast<size_t>(n) > arena_.size() - used_ || npending_ == kMaxPending)
      fail(MOE_ERR_INTERNAL, "expert_ffn: float32 arena of %zu elements too small", arena_.size());
    float *p = arena_.data() + used_;
    used_ += static_cast<size_t>(n);
    return p;
  }
  static constexpr size_t kMaxPending = 8;
  int dtype_;
  std::vector<float> &arena_;
  size_t used_ = 0, kept_ = 0;
  Pending pending_[kMaxPending];
  size_t npending_ = 0;
};

// Arena size: the shared input rows (shared experts), `weights` expert-weight-sized copies, and
// `per_row` floats for each row of the largest expert.
size_t arena_floats(const moe_ffn_args *a, int64_t weights, int64_t per_row) {
  int64_t rows = 0;
  for (int64_t e = 0; e < a->num_experts; ++e) rows = std::max(rows, rows_of(a, e).n);
  const int64_t parts[3] = {checked_mul(weights, checked_mul(a->ff, a->d, "d_ff * d_model"), "expert weights"),
                            checked_mul(rows, per_row, "expert rows"),
                            a->shared_input ? checked_mul(a->offsets[1], a->d, "rows * d_model") : 0};
  int64_t total = 0;
  for (int64_t p : parts) {
    if (p > INT64_MAX - total) fail(MOE_ERR_INVALID_ARGUMENT, "expert_ffn: float32 copies overflow int64");
    total += p;
  }
  return static_cast<size_t>(total);
}

// Calls body(o, w, e, r) for each expert with rows, o being its arguments over float32 copies
// (num_experts 1, rows [0, r.n), x and the weights widened); body widens or allocates the rest
// through w, and what it marked for storing is rounded into a's buffers after it returns.
template <class F>
void each_expert_widened(State &st, const moe_ffn_args *a, int64_t weights, int64_t per_row, F &&body) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  Widened w(a->dtype, st.widened, arena_floats(a, weights, per_row));
  // Shared experts all read the same rows: widened once for every expert.
  const float *shared_x = a->shared_input ? w.in(a->x, 0, a->offsets[1] * d) : nullptr;
  w.keep();
  for (int64_t e = 0; e < a->num_experts; ++e) {
    const Rows r = rows_of(a, e);
    if (r.n == 0) continue;
    const int64_t offsets[2] = {0, r.n};
    moe_ffn_args o = *a;
    o.num_experts = 1;
    o.offsets = offsets;
    o.dtype = MOE_DTYPE_F32;
    o.x = a->shared_input ? shared_x : w.in(a->x, r.begin * d, r.n * d);
    o.w1 = w.in(a->w1, e * ff * d, ff * d);
    o.w3 = is_glu ? w.in(a->w3, e * ff * d, ff * d) : nullptr;
    o.w2 = w.in(a->w2, e * d * ff, d * ff);
    body(o, w, e, r);
    w.flush();
  }
}

void forward_lowp(State &st, const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  // x, y and h, g, a per row; w1, w3, w2.
  each_expert_widened(st, a, 3, checked_mul(5, std::max(d, ff), "row width"),
                      [&](moe_ffn_args &o, Widened &w, int64_t, const Rows &r) {
                        o.h = w.out(a->h, r.begin * ff, r.n * ff);
                        o.g = is_glu ? w.out(a->g, r.begin * ff, r.n * ff) : nullptr;
                        o.a = w.out(nullptr, 0, r.n * ff);
                        o.y = w.out(a->y, r.begin * d, r.n * d);
                        forward_f32(&o);
                      });
}

void backward_lowp(State &st, const moe_ffn_args *a) {
  const int64_t d = a->d, ff = a->ff;
  const bool is_glu = glu(a->activation);
  // x, dy, dx and h, g, a, dh, dg per row; w1, w3, w2 and their gradients.
  each_expert_widened(st, a, 6, checked_mul(8, std::max(d, ff), "row width"),
                      [&](moe_ffn_args &o, Widened &w, int64_t e, const Rows &r) {
                        o.h = w.in(a->h, r.begin * ff, r.n * ff);
                        o.g = is_glu ? w.in(a->g, r.begin * ff, r.n * ff) : nullptr;
                        o.dy = w.in(a->dy, r.begin * d, r.n * d);
                        o.a = w.out(nullptr, 0, r.n * ff);
                        o.dh = w.out(nullptr, 0, r.n * ff);
                        o.dg = is_glu ? w.out(nullptr, 0, r.n * ff) : nullptr;
                        o.dw1 = w.out(a->dw1, e * ff * d, ff * d, true);
                        o.dw3 = is_glu ? w.out(a->dw3, e * ff * d, ff * d, true) : nullptr;
                        o.dw2 = w.out(a->dw2, e * d * ff, d * ff, true);
                        // Shared experts add into the caller's float32 dx; a routed expert's dx
                        // rows are stored.
                        if (a->dx && !a->shared_input) o.dx = w.out(a->dx, r.begin * d, r.n * d);
                        backward_f32(&o);
                      });
}

}  // namespace

moe_status expert_ffn(void *st, const moe_ffn_args *a) {
  return guarded(st, [&] { a->dtype == MOE_DTYPE_F32 ? forward_f32(a) : forward_lowp(*static_cast<State *>(st), a); });
}

moe_status expert_ffn_bwd(void *st, const moe_ffn_args *a) {
  return guarded(st,
                 [&] { a->dtype == MOE_DTYPE_F32 ? backward_f32(a) : backward_lowp(*static_cast<State *>(st), a); });
}

}  // namespace moe::cpu
