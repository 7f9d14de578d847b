// Elementwise conversion between the activation dtypes, and the scan for the first value that is
// not finite (check_finite).
#include "cuda/cuda.h"
#include "cuda/rows.cuh"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;
// Every conversion has a 16-bit side, so 8 elements are 16 bytes of it (and 32 of a float32 side).
constexpr int kPack = 8;

// Packs of W, then the n % W elements past the last pack one at a time. Widening is exact, and
// narrowing from float32 rounds once, so bf16 <-> f16 through float32 is rounded once too.
template <class D, class S, int W>
__global__ void convert_kernel(D *dst, const S *src, int64_t n) {
  const int64_t first = blockIdx.x * int64_t{blockDim.x} + threadIdx.x, stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t packs = n / W;
  for (int64_t i = first; i < packs; i += stride) store<W>(dst, i, load<W>(src, i));
  for (int64_t i = packs * W + first; i < n; i += stride) store<1>(dst, i, load<1>(src, i));
}

template <class T>
__global__ void first_nonfinite_kernel(const T *p, int64_t n, unsigned long long *first) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    if (!isfinite(to_float(p[i]))) atomicMin(first, static_cast<unsigned long long>(i));  // integer min: order-free
}

}  // namespace

void convert_elements(State &st, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  if (n <= 0) return;
  if (dst_dtype == src_dtype) {
    with_dtype(dst_dtype, "convert", [&](auto type) {
      using T = typename decltype(type)::type;
      const size_t bytes = checked_bytes(n, sizeof(T), "convert");
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st.stream), "cudaMemcpyAsync");
    });
    return;
  }
  with_dtype(dst_dtype, "convert", [&](auto dst_type) {
    using D = typename decltype(dst_type)::type;
    with_dtype(src_dtype, "convert", [&](auto src_type) {
      using S = typename decltype(src_type)::type;
      auto *out = static_cast<D *>(dst);
      const auto *in = static_cast<const S *>(src);
      if constexpr (!std::is_same_v<D, S>) {
        if (aligned16({out, in}))
          convert_kernel<D, S, kPack>
              <<<stride_blocks(st, n / kPack + 1, kThreads), kThreads, 0, st.stream>>>(out, in, n);
        else
          convert_kernel<D, S, 1><<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(out, in, n);
        check_launch("convert");
      }
    });
  });
}

moe_status convert(void *state, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  return guarded(state, [&](State &st) { convert_elements(st, dst, dst_dtype, src, src_dtype, n); });
}

moe_status find_nonfinite(void *state, const void *p, int dtype, int64_t n, int64_t *first) {
  return guarded(state, [&](State &st) {
    *first = -1;
    if (n <= 0) return;
    with_dtype(dtype, "find_nonfinite", [&](auto type) {
      using T = typename decltype(type)::type;
      st.scratch[0].ensure(sizeof(unsigned long long), st);
      auto *d = st.scratch[0].as<unsigned long long>();
      check(cudaMemsetAsync(d, 0xff, sizeof *d, st.stream), "cudaMemsetAsync");
      first_nonfinite_kernel<T>
          <<<stride_blocks(st, n, kThreads), kThreads, 0, st.stream>>>(static_cast<const T *>(p), n, d);
      check_launch("find non-finite");
      unsigned long long h = 0;
      check(cudaMemcpyAsync(&h, d, sizeof h, cudaMemcpyDeviceToHost, st.stream), "cudaMemcpyAsync");
      check(cudaStreamSynchronize(st.stream), "cudaStreamSynchronize");
      if (h != ~0ull) *first = static_cast<int64_t>(h);
    });
  });
}

}  // namespace moe::cuda
