// Shared pieces of the CPU backend's stage files.
#pragma once
#include <omp.h>

#include <string>
#include <vector>

#include "core/backend.h"
#include "core/checked.h"
#include "core/error.h"
#include "core/stage_status.h"
#include "cpu/few_rows.h"
#include "cpu/gemm.h"

namespace moe::cpu {

// Below this many elements a loop runs on the calling thread: waking the team costs more than the
// work (tens of microseconds per region for a few tokens).
constexpr int64_t kMinParallelElements = int64_t{1} << 14;
inline bool worth_threads(int64_t elements) { return elements >= kMinParallelElements; }

// The run [begin, end) of [0, n) that the calling thread of an OpenMP team takes: about equal
// shares, every boundary inside a multiple of 32 (whole cache lines of 16-bit elements), the last
// thread to n.
struct Run {
  int64_t begin, end;
};
inline Run thread_run(int64_t n) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  return {n * t / nt / 32 * 32, t + 1 == nt ? n : n * (t + 1) / nt / 32 * 32};
}

// Element count of a host scratch vector, a * b, through the library's checked multiplication.
inline size_t checked_count(int64_t a, int64_t b, const char *what) {
  return static_cast<size_t>(checked_mul(a, b, what));
}

struct State {
  std::string error;
  Gemms gemms;                              // oneDNN primitives of this layer's shapes
  std::vector<unsigned char> gemm_scratch;  // their scratchpad: grow-only, reused across calls
  std::vector<unsigned char> gemm_pad;      // rows padded for them (expert_ffn.cpp): grow-only
  // float32 copies for the bf16/f16 expert FFN (expert_ffn.cpp): grow-only, reused across calls.
  std::vector<float> widened;
  // The products of the few-rows experts of a forward (expert_ffn.cpp): grow-only.
  std::vector<XwtProduct> xwt;
};

inline void set_error(State *st, const char *message) noexcept { keep_message(st->error, message); }

// Runs a stage body, turning exceptions into a status and the state's message.
template <class F>
moe_status guarded(void *state, F &&body) noexcept {
  return stage_status(static_cast<State *>(state)->error, body);
}

// Float32 row-major C = op(A) op(B) (+ C when beta is 1) for the router's products, whose token
// dimension (M, or K when trans_a) is a runtime size: one primitive serves every batch size.
// dry: only prepare the primitive (and grow the scratch), so that a later call cannot fail for
// memory.
void router_gemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc, bool dry = false);

// out[t] = sum of (weight[r] *) src[r] over token t's rows, src in a->dtype (combine.cpp; used by
// dispatch_bwd).
void sum_token_rows(const moe_rows_args *a, const void *src, const float *weight, float *out);

// Stage entry points (one file each, named for the stage).
moe_status gate(void *, const moe_gate_args *);
moe_status gate_bwd(void *, const moe_gate_args *);
moe_status select(void *, const moe_select_args *);
moe_status plan(void *, const moe_plan_args *);
moe_status select_bwd(void *, const moe_select_bwd_args *);
moe_status dispatch(void *, const moe_rows_args *);
moe_status dispatch_bwd(void *, const moe_rows_args *);
moe_status expert_ffn(void *, const moe_ffn_args *);
moe_status expert_ffn_bwd(void *, const moe_ffn_args *);
moe_status combine(void *, const moe_rows_args *);
moe_status combine_bwd(void *, const moe_rows_args *);
moe_status shared_combine(void *, const moe_shared_args *);
moe_status shared_combine_bwd(void *, const moe_shared_args *);
moe_status convert(void *, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n);
moe_status find_nonfinite(void *, const void *p, int dtype, int64_t n, int64_t *first);

}  // namespace moe::cpu
