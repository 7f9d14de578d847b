// The CUDA backend module, loaded with dlopen the first time a CUDA layer is made.
#pragma once
#include "core/backend.h"

namespace moe {

// The backend table of libmoe_cuda.so.0. The first call loads the module and keeps it (and the
// CUDA runtime and cuBLAS it brings) for the life of the process; a load that failed is
// remembered and reported again by every later call, with no new search. Loading and unloading
// those libraries per layer cost ~80 ms and leaked loader memory on every failed CUDA create.
// Throws MOE_ERR_UNSUPPORTED when the module is absent or does not belong to this libmoe.
// Thread-safe.
const moe_backend_ops *cuda_backend_ops();

}  // namespace moe
