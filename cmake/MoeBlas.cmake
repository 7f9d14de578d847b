# The GEMM behind the CPU backend, as the interface target moe_blas: oneDNN's matmul primitive.
#
# Chosen by measurement (see bench/ and the README): oneDNN picks its kernels from the CPU's feature
# bits (AVX-512, AVX512-BF16, AMX), has bfloat16 GEMMs, and its matmul primitive reads weights in
# the public [out, in] layout at full speed at every batch size, where Debian's OpenBLAS 0.3.21 and
# BLIS 0.9 pick kernels by CPU model (SSE3 on CPUs they do not know) and have no 16-bit GEMM.
# oneDNN threads with OpenMP, like the rest of the backend.
add_library(moe_blas INTERFACE)
find_path(MOE_DNNL_INCLUDE dnnl.hpp REQUIRED)
find_library(MOE_DNNL_LIBRARY NAMES dnnl REQUIRED)
target_include_directories(moe_blas INTERFACE ${MOE_DNNL_INCLUDE})
target_link_libraries(moe_blas INTERFACE ${MOE_DNNL_LIBRARY})
message(STATUS "libmoe CPU GEMM: oneDNN (${MOE_DNNL_LIBRARY})")
