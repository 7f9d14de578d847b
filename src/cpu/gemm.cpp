// oneDNN is used through its C API: each object is owned by a unique_ptr with oneDNN's destroy
// function, which never allocates. (The C++ wrapper allocates a shared_ptr control block after
// oneDNN has made an object; when that allocation fails, the object is lost.)
#include "cpu/gemm.h"

#include <cpuid.h>
#include <dnnl.h>

#include <climits>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "cpu/cpu.h"
#include "moe/moe.h"

namespace moe::cpu {

namespace {

template <class T, dnnl_status_t (*Destroy)(T)>
struct Deleter {
  void operator()(T p) const {
    if (p) Destroy(p);
  }
};
template <class T, dnnl_status_t (*Destroy)(T)>
using Owned = std::unique_ptr<std::remove_pointer_t<T>, Deleter<T, Destroy>>;

using Engine = Owned<dnnl_engine_t, dnnl_engine_destroy>;
using Stream = Owned<dnnl_stream_t, dnnl_stream_destroy>;
using Attr = Owned<dnnl_primitive_attr_t, dnnl_primitive_attr_destroy>;
using PostOps = Owned<dnnl_post_ops_t, dnnl_post_ops_destroy>;
using PrimDesc = Owned<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy>;
using Prim = Owned<dnnl_primitive_t, dnnl_primitive_destroy>;
using Memory = Owned<dnnl_memory_t, dnnl_memory_destroy>;

dnnl_data_type_t dnnl_type(int dtype) {
  switch (dtype) {
    case MOE_DTYPE_BF16:
      return dnnl_bf16;
    case MOE_DTYPE_F16:
      return dnnl_f16;
    default:
      return dnnl_f32;
  }
}

// A failed oneDNN call: MOE_ERR_OUT_OF_MEMORY for memory, MOE_ERR_INTERNAL otherwise (a shape or
// type oneDNN refuses is a libmoe bug).
void ok(dnnl_status_t st, const GemmShape &s, const char *what) {
  if (st == dnnl_success) return;
  if (st == dnnl_out_of_memory)
    fail(MOE_ERR_OUT_OF_MEMORY, "oneDNN matmul %lldx%lldx%lld: %s: out of memory", (long long)s.M, (long long)s.N,
         (long long)s.K, what);
  fail(MOE_ERR_INTERNAL, "oneDNN matmul %lldx%lldx%lld: %s failed with status %d", (long long)s.M, (long long)s.N,
       (long long)s.K, what, static_cast<int>(st));
}

// A [rows, cols] matrix read row-major with row stride ld, or its transpose (stored [cols, rows]).
dnnl_memory_desc_t matrix(int64_t rows, int64_t cols, int dtype, int64_t ld, bool trans, const GemmShape &s) {
  const dnnl_dims_t dims = {rows, cols};
  const dnnl_dims_t strides = {trans ? 1 : ld, trans ? ld : 1};
  dnnl_memory_desc_t md;
  ok(dnnl_memory_desc_init_by_strides(&md, 2, dims, dnnl_type(dtype), strides), s, "memory descriptor");
  return md;
}

Memory make_memory(const dnnl_memory_desc_t &md, dnnl_engine_t engine, void *p, const GemmShape &s) {
  dnnl_memory_t m = nullptr;
  ok(dnnl_memory_create(&m, &md, engine, p), s, "memory");
  return Memory(m);
}

bool is_amd() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  return b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "AuthenticAMD"
}

dnnl_cpu_isa_t effective_isa() { return dnnl_get_effective_cpu_isa(); }

}  // namespace

bool GemmShape::operator==(const GemmShape &o) const {
  return M == o.M && N == o.N && K == o.K && trans_a == o.trans_a && trans_b == o.trans_b && lda == o.lda &&
         ldb == o.ldb && ldc == o.ldc && a_dtype == o.a_dtype && b_dtype == o.b_dtype && c_dtype == o.c_dtype &&
         accumulate == o.accumulate && runtime_m == o.runtime_m && runtime_n == o.runtime_n &&
         runtime_k == o.runtime_k &&
         single_thread == o.single_thread;
}

struct Gemm::Impl {
  GemmShape shape;
  dnnl_engine_t engine = nullptr;  // the state's
  dnnl_stream_t stream = nullptr;  // the state's: in order, on the calling thread
  Prim prim;
  dnnl_memory_desc_t scratch{};
  // Made once with the primitive (fixed sizes): a run only points them at its data, so that it
  // allocates nothing in libmoe (a failure there after gradients were added would change them).
  Memory ma, mb, mc, ms;
};

void Gemm::run(const void *A, const void *B, void *C, std::vector<unsigned char> &scratch, int64_t M, int64_t K,
               int64_t N) const {
  const Impl &g = *impl_;
  const GemmShape &s = g.shape;
  const int64_t rows = s.runtime_m ? M : s.M, inner = s.runtime_k ? K : s.K, cols = s.runtime_n ? N : s.N;
  if (rows == 0 || cols == 0) return;
  if (inner == 0) fail(MOE_ERR_INTERNAL, "gemm: K is 0");  // callers skip empty products
  if (scratch.size() < scratch_bytes_)
    fail(MOE_ERR_INTERNAL, "gemm %lldx%lldx%lld: scratchpad of %zu bytes, %zu needed", (long long)rows,
         (long long)cols, (long long)inner, scratch.size(), scratch_bytes_);
  void *data[4] = {const_cast<void *>(A), const_cast<void *>(B), C, scratch.data()};
  const int keys[4] = {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST, DNNL_ARG_SCRATCHPAD};
  dnnl_exec_arg_t args[4];
  if (s.runtime_m || s.runtime_n || s.runtime_k) {
    // Sizes of this run: memory objects of its own (made, and any allocation, inside oneDNN).
    const Memory mems[4] = {make_memory(matrix(rows, inner, s.a_dtype, s.lda, s.trans_a, s), g.engine, data[0], s),
                            make_memory(matrix(inner, cols, s.b_dtype, s.ldb, s.trans_b, s), g.engine, data[1], s),
                            make_memory(matrix(rows, cols, s.c_dtype, s.ldc, false, s), g.engine, data[2], s),
                            make_memory(g.scratch, g.engine, data[3], s)};
    for (int i = 0; i < 4; ++i) args[i] = {keys[i], mems[i].get()};
    ok(dnnl_primitive_execute(g.prim.get(), g.stream, 4, args), s, "execute");
    return;
  }
  const Memory *mems[4] = {&g.ma, &g.mb, &g.mc, &g.ms};
  for (int i = 0; i < 4; ++i) {
    ok(dnnl_memory_set_data_handle(mems[i]->get(), data[i]), s, "set data handle");
    args[i] = {keys[i], mems[i]->get()};
  }
  ok(dnnl_primitive_execute(g.prim.get(), g.stream, 4, args), s, "execute");
}

struct Gemms::State {
  Engine engine;
  Stream stream;
  std::vector<Gemm> cache;  // looked up linearly: a layer uses a few dozen shapes
  int bf16 = -1, f16 = -1;  // supports(), probed once
};

Gemms::Gemms() : st_(std::make_unique<State>()) {
  const GemmShape none;
  dnnl_engine_t e = nullptr;
  ok(dnnl_engine_create(&e, dnnl_cpu, 0), none, "engine");
  st_->engine.reset(e);
  dnnl_stream_t s = nullptr;
  ok(dnnl_stream_create(&s, e, dnnl_stream_in_order), none, "stream");
  st_->stream.reset(s);
}
Gemms::~Gemms() = default;

Gemm Gemms::prepare(const GemmShape &s) {
  for (const Gemm &g : st_->cache)
    if (g.impl_->shape == s) return g;
  auto impl = std::make_shared<Gemm::Impl>();
  impl->shape = s;
  impl->engine = st_->engine.get();
  impl->stream = st_->stream.get();
  const int64_t M = s.runtime_m ? DNNL_RUNTIME_DIM_VAL : s.M, K = s.runtime_k ? DNNL_RUNTIME_DIM_VAL : s.K;
  const int64_t N = s.runtime_n ? DNNL_RUNTIME_DIM_VAL : s.N;
  const dnnl_memory_desc_t a = matrix(M, K, s.a_dtype, s.lda, s.trans_a, s);
  const dnnl_memory_desc_t b = matrix(K, N, s.b_dtype, s.ldb, s.trans_b, s);
  const dnnl_memory_desc_t c = matrix(M, N, s.c_dtype, s.ldc, false, s);
  dnnl_matmul_desc_t op;
  ok(dnnl_matmul_desc_init(&op, &a, &b, nullptr, &c), s, "descriptor");
  dnnl_primitive_attr_t attr_raw = nullptr;
  ok(dnnl_primitive_attr_create(&attr_raw), s, "attributes");
  const Attr attr(attr_raw);
  ok(dnnl_primitive_attr_set_scratchpad_mode(attr.get(), dnnl_scratchpad_mode_user), s, "scratchpad mode");
  if (s.accumulate) {
    dnnl_post_ops_t ops_raw = nullptr;
    ok(dnnl_post_ops_create(&ops_raw), s, "post-ops");
    const PostOps ops(ops_raw);
    ok(dnnl_post_ops_append_sum(ops.get(), 1.0f), s, "sum post-op");
    ok(dnnl_primitive_attr_set_post_ops(attr.get(), ops.get()), s, "post-ops");
  }
  dnnl_primitive_desc_t pd_raw = nullptr;
  ok(dnnl_primitive_desc_create(&pd_raw, &op, attr.get(), st_->engine.get(), nullptr), s, "primitive descriptor");
  const PrimDesc pd(pd_raw);
  impl->scratch = *dnnl_primitive_desc_query_md(pd.get(), dnnl_query_scratchpad_md, 0);
  dnnl_primitive_t prim = nullptr;
  ok(dnnl_primitive_create(&prim, pd.get()), s, "primitive");
  impl->prim.reset(prim);
  if (!s.runtime_m && !s.runtime_n && !s.runtime_k) {
    impl->ma = make_memory(a, st_->engine.get(), DNNL_MEMORY_NONE, s);
    impl->mb = make_memory(b, st_->engine.get(), DNNL_MEMORY_NONE, s);
    impl->mc = make_memory(c, st_->engine.get(), DNNL_MEMORY_NONE, s);
    impl->ms = make_memory(impl->scratch, st_->engine.get(), DNNL_MEMORY_NONE, s);
  }
  Gemm g;
  g.scratch_bytes_ = dnnl_memory_desc_get_size(&impl->scratch);
  g.impl_ = std::move(impl);
  st_->cache.push_back(g);
  if (g.scratch_bytes_ > max_scratch_) max_scratch_ = g.scratch_bytes_;
  return g;
}

void Gemms::trim(size_t max) {
  if (st_->cache.size() > max) st_->cache.clear();
}

bool Gemms::supports(int dtype) {
  if (dtype == MOE_DTYPE_F32) return true;
  int &known = dtype == MOE_DTYPE_BF16 ? st_->bf16 : st_->f16;
  if (known < 0) {
    known = 0;
    GemmShape s;
    s.M = 16, s.N = 64, s.K = 64;
    const dnnl_memory_desc_t a = matrix(16, 64, dtype, 64, false, s), b = matrix(64, 64, dtype, 64, true, s),
                             c = matrix(16, 64, MOE_DTYPE_F32, 64, false, s);
    dnnl_matmul_desc_t op;
    dnnl_primitive_desc_t pd_raw = nullptr;
    if (dnnl_matmul_desc_init(&op, &a, &b, nullptr, &c) == dnnl_success &&
        dnnl_primitive_desc_create(&pd_raw, &op, nullptr, st_->engine.get(), nullptr) == dnnl_success) {
      const PrimDesc pd(pd_raw);
      const char *impl = nullptr;
      // oneDNN's reference kernels take any type, slowly: only a JIT kernel counts.
      if (dnnl_primitive_desc_query(pd.get(), dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl)
        known = std::strstr(impl, "ref") == nullptr;
    }
  }
  return known == 1;
}

int64_t bf16_native_max_rows() {
  // With AMX, or on AMD CPUs (whose AVX512-BF16 dot product runs at twice the float32 FMA rate),
  // bfloat16 kernels win at every size. On Intel CPUs without AMX (or with AMX hidden, as in many
  // virtual machines) VDPBF16PS issues at half the rate of FMA, so a bfloat16 product reaches
  // about half the float32 rate: measured with oneDNN 2.6 on 2 cores of a Xeon (Emerald Rapids,
  // AMX not exposed), N 2048 K 1024: 0.14 vs 0.30 ms at M 1 and 0.54 vs 0.49 ms at M 16 (weight
  // traffic bound: bf16 reads half the bytes), 1.8 vs 1.1 ms at M 64, 25 vs 14 ms at M 1024.
  static const int64_t rows = [] {
    const dnnl_cpu_isa_t isa = effective_isa();
    if (isa == dnnl_cpu_isa_avx512_core_amx) return int64_t{INT64_MAX};
    if (isa == dnnl_cpu_isa_avx512_core_bf16) return is_amd() ? int64_t{INT64_MAX} : int64_t{32};
    return int64_t{0};
  }();
  return rows;
}

const SmallRows &small_rows() {
  // Times of one 2048 x 1024 weight against M rows, 2 cores, weights from memory (24 of them in
  // turn, on 2 MB pages as the layer's), the few-rows kernel / oneDNN X W^T / oneDNN W X^T:
  //  - AMD EPYC (Zen 4, AVX512-BF16): float32 M 16 0.42 / 0.58 / 0.67 ms, M 24 0.61 / 0.71 / 1.28,
  //    M 32 0.75 / 0.86 / 0.78, M 48 1.12-1.15 / 1.14-1.24 / 1.01-1.04, M 64 1.48 / 1.43-1.53 /
  //    1.29-1.33, M 96 2.25 / 2.03 / 2.01 (W X^T is quick only where M is a multiple of 16);
  //    bfloat16 M 16 0.21 / 0.42 / 0.37, M 32 0.39 / 0.62 / 0.44, M 48 0.55 / 0.62 / 0.53, M 64
  //    0.70 / 0.76 / 0.66, M 96 1.03 / 1.05 / 0.99, M 128 1.38 / 1.35 / 1.29.
  //  - Intel Xeon (Emerald Rapids, AMX hidden), measured with the kernel's earlier blocking (two
  //    weight rows, no VDPBF16PS, no fetching ahead): float32 M 16 W X^T 0.32 against X W^T 0.47;
  //    the few-rows kernel ahead up to 4 rows (8 for 16-bit weights, half the bytes).
  // Backward, dY W2 and dH W1 (1024 x 2048 weights, 8 of them in turn), few_rows_xw / oneDNN:
  //  - AMD EPYC (Zen 4): float32 M 1 0.33 / 0.66 ms, M 4 0.33 / 0.72, M 16 0.56 / 1.12, M 32
  //    0.93-0.96 / 1.20-1.24, M 64 1.33 / 1.52, M 96 1.97 / 2.09 (about even from there);
  //    bfloat16 (VDPBF16PS) M 1 0.10-0.12 / 0.23, M 16 0.21-0.23 / 0.34-0.37, M 32 0.38-0.41 /
  //    0.53-0.59, M 64 0.78-0.81 / 0.87-0.91, M 96 1.08 / 1.10. The weight gradients, dW2 += dY^T
  //    a and dW1 += dH^T X, few_rows_grad / oneDNN: float32 M 1 0.24-0.25 / 0.39-0.48, M 4
  //    0.24-0.26 / 0.51-0.55, M 16 0.46-0.48 / 0.78-0.91, M 32 0.82 / 1.10, M 48 1.12-1.19 /
  //    1.39-1.52, M 64 1.44-1.50 / 1.68-1.70, M 96 2.45 / 2.29 (oneDNN ahead); bfloat16 on
  //    few_rows_grad_bf16 (VDPBF16PS) up to 12 rows, measured in the layer (training step, d
  //    1024, d_ff 2048, 8 experts, top-2; same-process A/B against oneDNN for every row count):
  //    8, 16 and 32 tokens (2, 4 and 8 rows per expert on average) 0.87, 0.85 and 0.90 of the
  //    time; with the kernel up to 64 rows, 64 tokens 1.02-1.03 and 128 tokens 1.05-1.06 (each
  //    element of G read, summed and rounded in registers costs as much as 16 rows of products).
  //  - Intel Xeon with AMX (AVX512-BF16, AVX512-FP16, AMX-BF16; 2 MB of L2 per core), in the
  //    layer (d 1024, d_ff 2048, 8 experts, top-2, same-process A/B, caches flushed between
  //    calls): float32 forward on the few-rows kernel up to 48 rows against 4 (then W X^T):
  //    8, 64, 128, 256 tokens 0.93, 0.90, 0.92, 0.99 of the time (the columns kernel of AVX2
  //    CPUs there 1.12-1.18x: left off); bfloat16 up to 16, 32 or 64 rows against 8 (then
  //    oneDNN's AMX kernels): 64 tokens 1.22, 1.55, 1.55x, 128 tokens 0.99, 1.83, 2.7x: left at
  //    8 (4 once W X^T took over from X W^T there, see below). Training step, float32 weight gradients on few_rows_grad up to 64 rows: 8, 64, 128
  //    tokens 0.79, 0.80, 0.83 (up to 128: 256 tokens 0.95 but 512 tokens 1.04); dY W2, dH W1
  //    on few_rows_xw up to 16 or 64 rows 1.13 and 1.25x at 64 tokens (oneDNN kept); bfloat16
  //    weight gradients on few_rows_grad_bf16 up to 12 rows: 1, 8, 32 tokens 0.73, 0.70, 0.83;
  //    up to 24 against 12: 64 tokens 0.85, 32, 96, 128, 192 tokens 0.98-1.01; few_rows_xw
  //    for bfloat16 up to 8 or 16 rows 0.99-1.23x. Intel CPUs with AVX-512 but no AMX take
  //    the same, unmeasured (the AVX512-BF16 gradient kernel where they have it).
  //  - CPUs with AVX2 but not AVX-512, where the few-rows kernels run on AVX2: measured in the
  //    layer on 2 cores of an AMD EPYC (Zen 3, no AVX-512), d 1024, d_ff 2048, 8 experts, top-2,
  //    same-process A/B, caches flushed between calls. Forward, float32, few-rows kernel up to 8
  //    rows against 4: 16, 32, 64, 128 tokens 0.82, 0.96, 1.01, 0.99 of the time (up to 16: 0.82,
  //    0.89, 1.08); W X^T up to 64 rows against X W^T: 0.90-0.94 at 16 to 64 tokens, 1.02 at 128. bfloat16
  //    (widened to float32 for oneDNN: no bfloat16 GEMM on AVX2), the kernel up to 32 rows
  //    against 8: 32, 64, 128 tokens 0.70, 0.84, 1.02 (up to 64: 1.15 at 128). Training step,
  //    float32 weight gradients on few_rows_grad (then its portable loop) up to 4 rows: 8, 16, 32,
  //    64 tokens 0.82, 0.96, 0.98, 1.02 (up to 8 or 16 rows: 0.81-0.90 at 32 tokens in one run,
  //    1.09 in another); on its AVX2 kernel since (tiles of 4 rows by 16 columns, 16-bit
  //    gradients widened and narrowed in registers), against the loop: float32 1, 8, 32 tokens
  //    0.74, 0.81, 1.00, bfloat16 0.89, 0.83, 0.72, float16 0.90, 0.86, 0.88; then up to 16 rows
  //    against 4, float32 16, 32, 64 tokens 0.97, 0.93, 0.94 (up to 32 against 16: 1.05-1.06 at
  //    64 and 128 tokens);
  //    few_rows_xw (then its portable loop) for dY W2 and dH W1 up to 16 or 64 rows 1.4-2.3x the
  //    time (oneDNN throughout); on its AVX2 kernel since, float32 up to 8 rows still 1.06-1.23x
  //    at 1, 8 and 32 tokens;
  //    the router on the few-rows kernels 0.97-1.02 (left on oneDNN). Intel CPUs without AVX-512
  //    take the same, unmeasured.
  //    There oneDNN runs float32 products on its sgemm, which reads both operands in place (no
  //    packed copies) where 1/M + 1/N >= 0.0038, so up to about 300 rows; a right operand read
  //    along rows a multiple of 4 KB apart (dY W2, dH W1: the weights' rows) then runs at half
  //    speed or less, its rows falling into the same cache sets. X [M, 1024] W2 [1024, 2048],
  //    alone, caches flushed: M 24 1.26 ms, through a copy at a stride of 2064 floats 0.99 (copy
  //    not counted); M 32 1.84 / 1.03, M 64 3.55 / 2.09, M 128 6.4 / 3.7, M 256 19.9 / 6.2, M 384
  //    9.3 / 9.3 (copied by oneDNN itself). In the layer (training step, d 1024, d_ff 2048, 8
  //    experts, top-2, same-process A/B, the copy counted) with the copy from 32 to 352 rows:
  //    128, 256, 512 and 1024 tokens 0.95, 0.86, 0.86 and 0.81 of the time. The copy takes K x
  //    (N + 16) floats of the layer's scratch (8 MB for a 1024 x 2048 weight).
  //    16-bit layers run there on float32 copies (widened, see expert_ffn.cpp); their weight
  //    gradients on few_rows_grad (each gradient read and written once in its dtype) against
  //    oneDNN on widened panels, training step, bfloat16: up to 64 rows, 1, 8, 32, 64 and 128
  //    tokens 0.82, 0.82, 1.07, 1.30, 1.19 of the time; up to 8 rows against up to 4: 16, 32, 64
  //    tokens 0.97, 0.88, 0.99; up to 8 against none: 16 and 32 tokens 0.93 and 0.90 (float16,
  //    up to 4: 1 and 8 tokens 0.95 and 0.93); on few_rows_grad's AVX2 kernel, up to 16 rows
  //    against 8, 32 and 64 tokens bfloat16 0.99 and 0.94, float16 0.94 and 0.98 (up to 32 against
  //    8: 1.07 at 64 and 128 tokens). Their dY W2, dH W1 and dG W3 on few_rows_xw's
  //    AVX2 kernel (each weight read once in its dtype, not widened into panels) against the
  //    panels: up to 64 rows, bfloat16 1, 8, 32, 64, 128, 256 tokens 0.79, 0.69, 0.81, 0.92, 1.11,
  //    1.13 of the time, float16 1, 8, 64 tokens 0.77, 0.76, 1.04; up to 16 rows, bfloat16 8, 32,
  //    64 tokens 0.89, 1.00, 1.02, float16 32 tokens 0.97; up to 24 against up to 8, 64 tokens
  //    1.04 (bfloat16) and 1.17 (float16). So up to 8.
  //    Forward products with input rows as columns (the weights broadcast against 8 to 24 rows
  //    at once, few_rows_columns.cpp), one 2048 x 1024 weight against M rows from memory, against
  //    the rows kernel: float32 M 8 1.23, M 12 0.77, M 16 0.57, M 24 0.66, M 32 0.70, M 48 0.76
  //    (oneDNN's W X^T at M 16: 0.8 of its time); bfloat16 M 8 1.19, M 12 1.11, M 16 0.73-0.83,
  //    M 24 0.93, M 32 0.98 (since, its elements of 1-2 vectors widened by an AND rather than a
  //    shift: forward of 64 and 96 tokens 0.95 and 0.94 of the time); float16 (a conversion per
  //    weight element) 1.3-2.4 at every M. In the
  //    layer, float32 on columns from 12 rows and on the few-rows path up to 64 (from 8 and W X^T
  //    to 64): 32, 64, 128, 256 tokens 0.86, 0.75, 0.93 (up to 96 rows: 0.90), 0.99 of the time;
  //    from 9 rows against 12: 32 and 48 tokens 1.00-1.01 and 0.97-0.99. bfloat16 on columns
  //    from 12 rows and on the few-rows path up to 48 (from 32, then widened for oneDNN): 64,
  //    128, 192 tokens 0.88, 0.89, 0.91 (up to 96 rows: 1.05 at 256 tokens); float16 up to 48
  //    on the rows kernel, 64 tokens 1.01. Up to 4 rows past 16, 24, .. on the rows kernel,
  //    over each chunk while it is in cache (XwtProduct::M2), rather than in a vector of 8
  //    columns of their own: float32 64, 96, 128 tokens 0.95, 0.92, 0.90 of the time, bfloat16
  //    64, 80, 96 tokens 1.00, 1.00, 0.94 (up to 2 or 6 rows: 1.00-1.02; past 8 rows as well:
  //    float32 48 tokens 1.39, the 8-column vector with 12 weight rows a tile runs slowly).
  //    Backward, float32 dY W2, dH W1 and dG W3 on few_rows_xw from 7 to 48 rows (more than one
  //    pass: its strips, see few_rows.cpp) against oneDNN: 64, 96, 128 tokens 0.93, 0.92, 0.96
  //    of the time; from 1 row, 32 tokens 1.06 (one pass, the weight read in place). 16-bit
  //    layers on the strips up to 48 rows against 8: bfloat16 64, 96, 128 tokens 0.98, 1.01,
  //    1.04, float16 64 tokens 1.02: left at 8 (7 and 8 rows on the strips: bfloat16 16 and 32
  //    tokens 1.02 and 0.97).
  //  Elsewhere (no AVX2: the portable loops, a libm call per multiply-add) oneDNN but for float32
  //  W X^T; and Intel CPUs with AVX-512 as above.
  // The router's logits X Wr^T (float32, N = experts: oneDNN's matmul is slow with so few
  // columns), the few-rows kernel over slices of tokens (gate.cpp) / oneDNN, microseconds, AMD
  // EPYC (Zen 4), 2 cores, d 1024: 8 experts T 1 0.8 / 2.0, T 64 11.5-12.9 / 22-40, T 512 53-118
  // / 117-234, T 4096 419-1183 / 921-1884; 64 experts T 8 11 / 22, T 64 59-79 / 97-208, T 4096
  // 2784-3039 / 3469-3817; 256 experts T 1 6.5 / 7.8, T 64 174-241 / 466-500, T 512 1472-1503 /
  // 1497-1625; d 4096, 256 experts T 1 41 / 38, T 8 115 / 151, T 64 912 / 2205, T 4096 47007 /
  // 56356. Their input gradient G Wr (K = experts), few_rows_xw / oneDNN, d 1024, 8 experts: T 1
  // 0.9 / 5-620, T 8 2.4 / 6.6-7.2, T 64 19 / 20 (a training step of one token 0.97-1.00 of the
  // time).
  static const SmallRows rows = [] {
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool bf16 = __builtin_cpu_supports("avx512bf16");
    SmallRows r{0, 0, 64, 0, 0, 0, 0, false};
    if (avx512 && is_amd()) {
      r = SmallRows{48, 64, 0, 64, 64, 64, bf16 ? 12 : 0, true};
    } else if (avx512) {
      r = SmallRows{48, 8, 64, 0, 0, 64, bf16 ? 24 : 0, false};
      r.f32_sixteens_from = 768;
    } else if (avx2) {
      r = SmallRows{64, 48, 64, 48, 8, 16, 0, false, 32, 352, 16, 9, 12, 4, 7};
    }
    // With AMX, a bfloat16 forward of 9 to 480 rows per expert as W X^T (the weight as the left
    // operand, read as stored; as the right one, oneDNN copies it into its tile layout on every
    // call) against X W^T, in the layer as above: 64, 128, 256, 512, 1024, 1536, 1792 tokens
    // 0.66, 0.77, 0.85, 0.95, 0.88, 0.83, 0.91 of the time; 2048 and 4096 tokens (512 and 1024
    // rows) 1.03 and 1.22. (float32 W X^T up to 128 or 320 rows: 1.00-1.07, left at 64.) With
    // it, the few-rows kernel up to 4 bfloat16 rows rather than 8: 8, 16, 24, 64 tokens 0.97,
    // 0.85, 0.91, 0.97 of the time (up to 6: 0.99, 0.85, 0.94, 0.94; up to 2: 1.03 at 8 tokens).
    if (effective_isa() == dnnl_cpu_isa_avx512_core_amx) {
      r.bf16_brgemm_rows = 256;
      r.bf16_brgemm_most = 1024;
      r.wxt_bf16 = 480;
      r.few_bf16 = 4;
      // The forward's X W^T from 256 rows on the tile kernel of amx_gemm.cpp (which says how
      // fast; where it fits and the system grants the tile state), rather than as W X^T on oneDNN
      // from 256 to 480 rows and X W^T on oneDNN past that; in the layer as above (medians of
      // three alternated runs): 1024, 2048, 4096 tokens 0.92, 0.83, 0.84 of the time (from 128
      // rows: no better at 512 tokens; from 512: 1024 tokens 1.05x the time of from 256). The
      // weight gradients past the few-rows kernel's 24 rows since the kernel fetches ahead the
      // rows of C it adds to, and the backward's X W at any row count since it reads B [K, N] a
      // row at a time (amx_gemm.cpp); before, from 768 and 384 rows (the kernel slower than
      // oneDNN below them). Training step, in one build, medians of three: weight gradients from
      // 128 rows against 768, 512, 1024, 2048 tokens 0.90, 0.94, 0.88 of the time; from 32
      // against 128, 128 and 256 tokens 0.91, 0.88; from 25 against 32, 128 tokens 0.95
      // (few_rows_grad_bf16 up to 12 or 0 rows rather than 24: 8 tokens 1.08 and 1.48x). X W from
      // 25 rows against 256: 128, 256, 512, 1024 tokens 0.95, 0.99, 0.92, 0.97; from 1 against 25
      // (medians of five): 8, 16, 32 tokens 0.99, 1.01, 0.97.
      r.amx_xwt_from = 256;
      r.amx_xw_from = 1;
      r.amx_grad_from = 25;
    }
    return r;
  }();
  return rows;
}

const char *gemm_library() {
  switch (effective_isa()) {
    case dnnl_cpu_isa_avx512_core_amx:
      return "oneDNN matmul (AMX), libmoe's AMX kernel for the large bfloat16 products";
    case dnnl_cpu_isa_avx512_core_bf16:
      return "oneDNN matmul (AVX-512, AVX512-BF16)";
    case dnnl_cpu_isa_avx512_core_vnni:
    case dnnl_cpu_isa_avx512_core:
      return "oneDNN matmul (AVX-512)";
    case dnnl_cpu_isa_avx2:
    case dnnl_cpu_isa_avx2_vnni:
      return "oneDNN matmul (AVX2)";
    default:
      return "oneDNN matmul";
  }
}

void router_gemm(State &st, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc, bool dry) {
  GemmShape s;
  s.trans_a = trans_a;
  s.trans_b = trans_b;
  s.runtime_m = !trans_a;
  s.runtime_k = trans_a;
  s.M = s.runtime_m ? 0 : M;
  s.K = s.runtime_k ? 0 : K;
  s.N = N;
  s.lda = lda;
  s.ldb = ldb;
  s.ldc = ldc;
  s.accumulate = beta != 0.0f;
  const Gemm g = st.gemms.prepare(s);
  if (st.gemm_scratch.size() < g.scratch_bytes()) st.gemm_scratch.resize(g.scratch_bytes());
  if (!dry && M > 0 && N > 0 && K > 0) g.run(A, B, C, st.gemm_scratch, M, K);
}

}  // namespace moe::cpu
