// Included by the files whose kernels use AVX-512 intrinsics: GCC 12's AVX-512 headers
// initialise the pass-through operand of several intrinsics from itself (_mm512_undefined_*),
// which warns at every inlined call (GCC bug 105593, fixed in GCC 13). The pragmas hold to the
// end of the including file.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
