// The CPU backend's matrix products, on oneDNN matmul primitives.
//
// Row-major C[M,N] (+)= op(A)[M,K] · op(B)[K,N], where op() is the identity or a transpose read
// through strides, so weights stay in their public [out, in] layout (no packed copies to keep in
// step with writes through moe_layer_param_buffers). A primitive is made for each shape, dtype and
// thread count and kept in the backend's cache: a fixed M reaches oneDNN's brgemm kernels, which
// a runtime M does not, and a cached primitive costs a lookup instead of 0.05-0.3 ms.
//
// Deterministic: the same primitive on the same data gives the same bits for a fixed thread count.
// Errors throw moe::Error: MOE_ERR_OUT_OF_MEMORY when oneDNN cannot allocate, MOE_ERR_INTERNAL
// for anything else (a shape or dtype oneDNN refuses is a libmoe bug).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace moe::cpu {

// One GEMM's shape. Strides: A is [M,K] with row stride lda (trans_a: stored [K,M], stride lda),
// B is [K,N] with row stride ldb (trans_b: stored [N,K]), C is [M,N] with row stride ldc.
struct GemmShape {
  int64_t M = 0, N = 0, K = 0;
  bool trans_a = false, trans_b = false;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int a_dtype = 0, b_dtype = 0, c_dtype = 0;  // moe_dtype; A and B the same, C float32 or theirs
  bool accumulate = false;                    // C += product (else C = product)
  bool runtime_m = false, runtime_n = false, runtime_k = false;  // one primitive for any M, N or K (gemm:jit)
  bool single_thread = false;                 // run inside a parallel region, on the calling thread
  bool operator==(const GemmShape &o) const;
};

class Gemms;

// A prepared GEMM: run it any number of times, from any thread (its scratchpad comes from the
// caller's Scratch). Valid until its Gemms is destroyed or cleared.
class Gemm {
 public:
  // M, K, N: this call's sizes where the shape has runtime_m / runtime_k / runtime_n, ignored
  // otherwise.
  void run(const void *A, const void *B, void *C, std::vector<unsigned char> &scratch, int64_t M = -1,
           int64_t K = -1, int64_t N = -1) const;
  size_t scratch_bytes() const { return scratch_bytes_; }

 private:
  friend class Gemms;
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  size_t scratch_bytes_ = 0;
};

// The primitive cache of one CPU backend state (one layer). Not thread-safe: prepare every GEMM
// before a parallel region, run them inside it.
class Gemms {
 public:
  Gemms();
  ~Gemms();
  Gemms(const Gemms &) = delete;
  Gemms &operator=(const Gemms &) = delete;

  // The GEMM of shape s, created on first use. Throws as described above.
  Gemm prepare(const GemmShape &s);
  // Forgets every GEMM when more than max are kept. Shapes with a row count of their own (each
  // expert's rows change from batch to batch) come and go; oneDNN's own primitive cache makes
  // re-creating a dropped one cheap. Never called between a backward's prepare and its run.
  void trim(size_t max);
  // Whether oneDNN has a kernel for A and B in dtype (bf16: AVX512-BF16 or AMX).
  bool supports(int dtype);
  // The largest scratchpad any GEMM prepared so far needs.
  size_t max_scratch() const { return max_scratch_; }

 private:
  struct State;
  std::unique_ptr<State> st_;
  size_t max_scratch_ = 0;
};

// Rows of A up to which a bfloat16 GEMM runs on bfloat16 kernels; from there on it runs on float32
// copies (see gemm.cpp: where the CPU's bfloat16 dot product is no faster than its float32 FMA,
// only the halved weight traffic of small M pays). INT64_MAX: always bfloat16.
int64_t bf16_native_max_rows();

// Which kernel a forward product over an expert's few rows runs on, by row count: the few-rows
// kernel (cpu/few_rows.h) up to few_f32 (float32) or few_16 (16-bit) rows (its input rows as
// columns from columns_f32 or columns_bf16 rows), then float32 experts as W X^T up to wxt_f32
// rows, then oneDNN's X W^T. In backward, the products read along a weight's rows (dY W2, dH
// W1) run on few_rows_xw up to bwd_f32 (float32, from bwd_f32_from) or bwd_16 (16-bit) rows,
// float32 weight gradients on few_rows_grad up to grad_f32 rows and bfloat16 ones on
// few_rows_grad_bf16 up to grad_bf16 rows (where the CPU has AVX512-BF16); beyond, on oneDNN.
// router: the router's logits X Wr^T and their input gradient run on the few-rows kernels, at
// every token count.
// Measured per CPU family (see gemm.cpp); fixed for a process, so that the same rows always take
// the same kernel (bitwise repeatable).
struct SmallRows {
  int64_t few_f32, few_16, wxt_f32;
  int64_t bwd_f32, bwd_16, grad_f32, grad_bf16;
  bool router;
  // Rows from nn_copy_from to nn_copy_to: a float32 product X W with W [K, N] read along rows a
  // multiple of 4 KB apart (dY W2, dH W1) runs on a copy of W at a padded row stride, where
  // oneDNN's kernels read W in place (see gemm.cpp).
  int64_t nn_copy_from = 0, nn_copy_to = 0;
  // Rows up to which a widened backward (16-bit weights on float32 GEMMs, cpu/expert_ffn.cpp)
  // adds its weight gradients on few_rows_grads, each gradient read and written once.
  int64_t widened_grad = 0;
  // Rows from which a float32 or bfloat16 forward product on the few-rows kernel reads its input
  // rows as columns (XwtProduct::columns: each weight element broadcast against the rows); 0:
  // never. (float16 never: its weight elements take a conversion each, which binds.)
  int64_t columns_f32 = 0, columns_bf16 = 0;
  // Of such rows, up to this many past a multiple of 8 run on the few-rows kernel as rows.
  int64_t columns_rest = 0;
  // Rows from which float32 products read along a weight's rows run on few_rows_xw (up to
  // bwd_f32): below, oneDNN.
  int64_t bwd_f32_from = 0;
  // Rows per call of a bfloat16 product on oneDNN's AMX kernels, each call's rows a multiple of
  // 16 (a short last block padded; expert_ffn.cpp says why); 0: the rows as they come. Products of
  // more rows than that run in calls of multiples of 64 rows, at most bf16_brgemm_most each.
  int64_t bf16_brgemm_rows = 0, bf16_brgemm_most = 0;
  // Rows up to which a bfloat16 forward on oneDNN (past few_16) runs as W X^T, the weight read
  // as stored (expert_ffn.cpp, forward_few_rows); 0: never.
  int64_t wxt_bf16 = 0;
  // float32 forward products X W^T of at least this many rows, not a multiple of 16, run as the
  // rows up to the multiple of 16 below and the rest as W X^T (expert_ffn.cpp says why); 0: never.
  int64_t f32_sixteens_from = 0;
  // bfloat16 forward rows up to which the few-rows kernel runs, where it differs from few_16
  // (float16's); -1: few_16.
  int64_t few_bf16 = -1;
  // An expert's rows from which its bfloat16 products run on amx_gemm (cpu/amx_gemm.h) where it
  // fits and amx_gemm_available(): the forward's X W^T, the backward's X W (a weight read along
  // its rows) and the weight gradients A^T B; 0: never.
  int64_t amx_xwt_from = 0, amx_xw_from = 0, amx_grad_from = 0;
};
const SmallRows &small_rows();

// Name of the GEMM library and the ISA oneDNN uses on this CPU (moe-bench, error messages).
const char *gemm_library();

}  // namespace moe::cpu
