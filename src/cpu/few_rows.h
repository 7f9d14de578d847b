// Products over a few rows (decoding: one to a handful of tokens per expert), where the time is
// the time to read the weights once. oneDNN's GEMMs read a weight in the [out, in] layout at about
// half the memory bandwidth at these sizes (0.30 ms for a 2048 x 1024 float32 weight at 1 to 8
// rows, 2 cores of an Emerald Rapids Xeon, against 0.15 ms for one pass over it), so these rows
// run on kernels of their own, each reading a weight (or a weight gradient) once: a dot-product
// kernel for the forward (X W^T; on AVX2 from a dozen rows, one that broadcasts each weight
// element against the input rows laid out as columns, cpu/few_rows_columns.h), and for the
// backward X W and the gradients' A^T B.
#pragma once
#include <atomic>
#include <cstdint>

namespace moe::cpu {

// The instruction sets the kernels below may use, each including the ones before it. They run on
// the best the CPU has (few_rows_best_isa) unless a caller names a lower one: each level gives the
// same bits as the others wherever a kernel documents its order of sums, so tests run every level
// on one CPU. avx512 includes AVX512-BF16 where the CPU has it (bfloat16 then sums pairs in
// VDPBF16PS's own order). Naming a level the CPU lacks throws std::invalid_argument, having done
// nothing.
enum class FewRowsIsa { portable, avx2, avx512 };
FewRowsIsa few_rows_best_isa();

// C[m, n] = sum_k X[m, k] W[n, k] for m < M, n < N: X [M, K] (row stride ldx)
// and W [N, K] (row stride ldw) in dtype (a moe_dtype: both the same), products and sums in
// float32, C float32 (row stride ldc). bfloat16 on a CPU with AVX512-BF16 runs on VDPBF16PS,
// whose pairs are summed in its own order and whose denormal inputs count as zero (as oneDNN's
// bfloat16 kernels), X laid out in pairs of rows first (few_rows_paired) in memory of its own
// (std::bad_alloc where there is none). Everything else is summed in one order, so the same bits
// with AVX-512, with AVX2 or with neither: 16 lanes, lane j the fused sum over k = j, j + 16, ...
// in order, then the halves added pairwise (lane i + lane i + 8, then + 4, + 2, + 1). Threads
// over N with OpenMP, in chunks handed out first come first served; each output is one thread's
// sum in a fixed order, so the result does not depend on the thread count, on which thread ran
// it or on the other rows of X.
void few_rows_xwt(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t N, int64_t K,
                  float *C, int64_t ldc, FewRowsIsa isa = few_rows_best_isa());

// The row stride (in elements of dtype) at which few_rows_xwt reads M input rows of stride ld at
// full speed: ld, or 64 bytes more where M > 4, ld's bytes are a multiple of 4 KB and the CPU has
// AVX-512. At such strides the input rows and the four weight rows of a step all fall into one of
// L1's sets and evict each other, so few_rows_xwt copies such rows to the wider stride, again for
// every chunk of weight rows; a caller that writes the input rows itself writes them at this
// stride instead.
int64_t few_rows_input_ld(int64_t ld, int dtype, int64_t M);

// C[m, n] (+)= sum_k X[m, k] W[k, n] for m < M, n < N: X [M, K] (row stride ldx) and W [K, N] (row
// stride ldw) in dtype: the backward's products with a weight read along its rows (dY W2, dH
// W1). Each sum runs over k in order, one fused multiply-add per term (16-bit values widened
// exactly), from zero; with accumulate, C + sum (one rounding more), else the sum; C float32 (row
// stride ldc). The same bits with or without AVX-512; but bfloat16 on a CPU with AVX512-BF16 runs
// on VDPBF16PS, pairs of k (k, k + 1) in order, each pair's two products summed in its own order
// (denormal inputs as zero). The same bits for any thread count: threads over N with OpenMP, in
// chunks of columns handed out first come first served, each thread fetching its next chunk into
// L2. (oneDNN's GEMMs run these at 16 rows at half the multiply-add rate; see gemm.cpp.)
void few_rows_xw(const void *X, int64_t ldx, const void *W, int64_t ldw, int dtype, int64_t M, int64_t N, int64_t K,
                 float *C, int64_t ldc, bool accumulate, FewRowsIsa isa = few_rows_best_isa());

// G[j, k] += sum_m A[m, j] B[m, k] for j < N, k < K: A [M, N] and B [M, K] float32 (row strides lda,
// ldb), G [N, K] in dtype (row stride ldg): the weight gradients of experts with few rows (dW1 +=
// dH^T X). Each sum runs over m in order, one fused multiply-add per term, from zero, and is added
// to G once (and rounded once, to a 16-bit dtype). The same bits with or without AVX-512 and for
// any thread count: threads over G's rows, in chunks handed out first come first served, each
// thread fetching its next chunk into L2.
void few_rows_grad(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t M, void *G, int64_t ldg, int dtype,
                   int64_t N, int64_t K, FewRowsIsa isa = few_rows_best_isa());

// One weight gradient of few_rows_grads: G += A^T B, with few_rows_grad's arguments.
struct GradProduct {
  const float *A;
  int64_t lda;
  const float *B;
  int64_t ldb;
  int64_t M;
  void *G;
  int64_t ldg;
  int64_t N, K;
};

// few_rows_grad on several gradients of one dtype (an expert's dW2, dW1, dW3) in one parallel
// region, their chunks one stream handed out first come first served, each thread fetching its
// next chunk ahead across the gradients' ends too: the same bits as few_rows_grad on each in turn
// (float32 training step of 1, 8 and 64 tokens, d 1024, d_ff 2048, 8 experts, top-2, 2 cores of
// an AMD EPYC Zen 4: 0.99 of the time, the median of six same-process A/B runs, each 0.97-1.02).
// No G may overlap another G, an A or a B.
void few_rows_grads(const GradProduct *products, int64_t count, int dtype, FewRowsIsa isa = few_rows_best_isa());

// few_rows_grad for bfloat16 A [M, N], B [M, K] and G [N, K] (a bfloat16 layer's weight gradients
// from its stored dH, dY, a and x), on VDPBF16PS: the sums over m run over pairs of rows (m, m + 1)
// in order, each pair's two products summed in the instruction's own order (denormal inputs as
// zero; an odd M's last row pairs with zero), and are added to G in float32 and rounded once. The
// same bits for any thread count. scratch: few_rows_grad_bf16_scratch(M, N, K) elements (A and B
// in pairs). Only where the CPU has AVX512-BF16 (small_rows().grad_bf16 is 0 on the others);
// elsewhere it throws std::logic_error, having done nothing.
int64_t few_rows_grad_bf16_scratch(int64_t M, int64_t N, int64_t K);
void few_rows_grad_bf16(const void *A, int64_t lda, const void *B, int64_t ldb, int64_t M, void *G, int64_t ldg,
                        int64_t N, int64_t K, uint32_t *scratch);

// Whether the products of XwtBatch read X of this dtype in pairs of rows (bfloat16 at the avx512
// level on a CPU with AVX512-BF16, where VDPBF16PS serves two input rows at once): X is then laid
// out by few_rows_pair_row, in few_rows_pairs_size(M, K) elements, and its row stride is not
// read. few_rows_xwt lays out its own X.
bool few_rows_paired(int dtype, FewRowsIsa isa = few_rows_best_isa());
int64_t few_rows_pairs_size(int64_t M, int64_t K);
// Row i of M bfloat16 rows (K elements from src) into their pairs layout: in pieces of 16 elements
// (the last padded with zeros), each next to the same piece of its partner row (i ^ 1); the last
// row of an odd M has zeros for a partner, written with it.
void few_rows_pair_row(const void *src, int64_t K, int64_t M, int64_t i, void *pairs);

// The columns layout of an XwtProduct's X: its M rows side by side, widened to float32, element k
// of row i at [k * few_rows_columns_ld(M) + i] (the stride M rounded up to 8; the columns past M
// zero), in few_rows_columns_size(M, K) floats. few_rows_column writes row i (K elements of dtype
// from src), and with the last row (i == M - 1) the columns past M.
int64_t few_rows_columns_ld(int64_t M);
int64_t few_rows_columns_size(int64_t M, int64_t K);
void few_rows_column(const void *src, int dtype, int64_t K, int64_t M, int64_t i, float *columns);

// One product of few_rows_xwt's form; X in pairs where paired (few_rows_paired(dtype, isa) must
// say the same, isa the batch's), or in columns where columns (ldx then few_rows_columns_ld(M)).
// In columns, each weight element is broadcast against 8 to 24 input rows at once, and each sum
// runs over k in order, one fused multiply-add per term (16-bit values widened exactly), from
// zero: another order than few_rows_xwt's, the same bits for any M, thread count or level (the
// avx512 level runs the AVX2 kernel). Where a weight serves several rows, a step of k then costs
// a load of the input rows and one broadcast per weight row (the rows kernel loads an input piece
// per weight row pair and sums across lanes): 2 cores of an AMD EPYC Zen 3, a 2048 x 1024 weight
// against 16 rows from memory, float32 0.8 of oneDNN's W X^T time, bfloat16 0.7 of the rows
// kernel's. Used where the layer says so (SmallRows::columns_from).
struct XwtProduct {
  const void *X;
  int64_t ldx;
  const void *W;
  int64_t ldw;
  int64_t M, N, K;
  float *C;
  int64_t ldc;
  bool paired = false;
  bool columns = false;
  // In columns: M2 more input rows as rows (X2, row stride ldx2, in dtype; C's rows from M on),
  // on the rows kernel over each chunk of weight rows while it is in cache. Not where the dtype
  // is read in pairs (few_rows_paired): XwtBatch refuses it.
  const void *X2 = nullptr;
  int64_t ldx2 = 0, M2 = 0;
};

// Several independent products of one dtype as one stream of work, for the threads of a parallel
// region: the chunks of weight rows of all of them handed out first come first served, each
// thread fetching its next chunk ahead while it computes one, across the products' ends too (a
// product of its own starts on a cold fetch and ends with a thread waiting for the last chunk).
// Each output is the same sum as few_rows_xwt's. The products (not copied) must outlive it.
// Throws std::logic_error, having done nothing, where a product's `paired` is not
// few_rows_paired(dtype, isa).
class XwtBatch {
 public:
  XwtBatch(const XwtProduct *products, int64_t count, int dtype, FewRowsIsa isa = few_rows_best_isa());
  // Chunks in all: more than one is worth a team of threads.
  int64_t chunks() const { return chunks_; }
  // Called by each thread of a region (or by one thread alone): computes chunks until none is
  // left to claim. Returns before other threads finish theirs; a barrier follows where the
  // results are read.
  void drain();

 private:
  const XwtProduct *p_;
  int64_t count_;
  int dtype_;
  FewRowsIsa isa_;
  int64_t chunks_ = 0;
  std::atomic<int64_t> next_{0};
};

}  // namespace moe::cpu
