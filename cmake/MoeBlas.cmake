# The BLAS behind the CPU backend, as the interface target moe_blas.
find_path(MOE_CBLAS_INCLUDE cblas.h PATH_SUFFIXES x86_64-linux-gnu openblas REQUIRED)
find_library(MOE_BLAS_LIBRARY NAMES openblas REQUIRED)
add_library(moe_blas INTERFACE)
target_include_directories(moe_blas INTERFACE ${MOE_CBLAS_INCLUDE})
target_link_libraries(moe_blas INTERFACE ${MOE_BLAS_LIBRARY})
