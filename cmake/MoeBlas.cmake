# The GEMM behind the CPU backend, as the interface target moe_blas.
#
# Chosen by measurement (see bench/ and the README): Debian's oneDNN picks its AVX-512 sgemm from
# the CPU's feature bits, while Debian's OpenBLAS 0.3.21 and BLIS 0.9 pick by CPU model and fall
# back to SSE3/AVX2 kernels on CPUs they do not recognise (4-6x slower on AVX-512 machines unless
# the user sets OPENBLAS_CORETYPE). oneDNN threads with OpenMP, like the rest of the backend.
set(MOE_CPU_BLAS "dnnl" CACHE STRING "GEMM library of the CPU backend: dnnl (oneDNN) or openblas")
set_property(CACHE MOE_CPU_BLAS PROPERTY STRINGS dnnl openblas)

add_library(moe_blas INTERFACE)
if(MOE_CPU_BLAS STREQUAL "dnnl")
  find_path(MOE_DNNL_INCLUDE dnnl.h REQUIRED)
  find_library(MOE_DNNL_LIBRARY NAMES dnnl REQUIRED)
  target_include_directories(moe_blas INTERFACE ${MOE_DNNL_INCLUDE})
  target_link_libraries(moe_blas INTERFACE ${MOE_DNNL_LIBRARY})
  target_compile_definitions(moe_blas INTERFACE MOE_BLAS_DNNL=1)
elseif(MOE_CPU_BLAS STREQUAL "openblas")
  find_path(MOE_CBLAS_INCLUDE cblas.h PATH_SUFFIXES x86_64-linux-gnu openblas REQUIRED)
  find_library(MOE_OPENBLAS_LIBRARY NAMES openblas REQUIRED)
  target_include_directories(moe_blas INTERFACE ${MOE_CBLAS_INCLUDE})
  target_link_libraries(moe_blas INTERFACE ${MOE_OPENBLAS_LIBRARY})
  target_compile_definitions(moe_blas INTERFACE MOE_BLAS_OPENBLAS=1)
else()
  message(FATAL_ERROR "MOE_CPU_BLAS must be dnnl or openblas, not '${MOE_CPU_BLAS}'")
endif()
message(STATUS "libmoe CPU GEMM: ${MOE_CPU_BLAS}")
