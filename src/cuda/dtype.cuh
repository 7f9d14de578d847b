// Activation storage types (moe_dtype): float32, bfloat16, float16. Kernels are templates on the
// element type T; loads widen to float, arithmetic is float32, stores round to nearest even.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <library_types.h>

#include "core/error.h"
#include "moe/moe.h"

namespace moe::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// cuBLAS's name for an element type.
template <class T>
constexpr cudaDataType_t blas_type();
template <>
constexpr cudaDataType_t blas_type<float>() { return CUDA_R_32F; }
template <>
constexpr cudaDataType_t blas_type<__nv_bfloat16>() { return CUDA_R_16BF; }
template <>
constexpr cudaDataType_t blas_type<__half>() { return CUDA_R_16F; }

template <class T>
struct Type {
  using type = T;
};

// Calls body(Type<T>{}) for the element type of dtype. The core validated the config, so an
// unknown value here is a bug on the caller's side of the table, not bad user input.
template <class F>
void with_dtype(int dtype, const char *what, F &&body) {
  switch (dtype) {
    case MOE_DTYPE_F32:
      body(Type<float>{});
      return;
    case MOE_DTYPE_BF16:
      body(Type<__nv_bfloat16>{});
      return;
    case MOE_DTYPE_F16:
      body(Type<__half>{});
      return;
    default:
      fail(MOE_ERR_INTERNAL, "%s: dtype %d is not a moe_dtype", what, dtype);
  }
}

}  // namespace moe::cuda
