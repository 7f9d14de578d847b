// Conversions between activation dtypes, and the search for the first non-finite element.
#include <cmath>

#include "cpu/cpu.h"
#include "cpu/elem.h"

namespace moe::cpu {

moe_status convert(void *st, void *dst, int dst_dtype, const void *src, int src_dtype, int64_t n) {
  return guarded(st, [&] {
    if (dst_dtype == src_dtype) {
      convert_host(dst, dst_dtype, src, src_dtype, n);
      return;
    }
    with_dtype(dst_dtype, [&](auto dtag) {
      with_dtype(src_dtype, [&](auto stag) {
        using D = decltype(dtag);
        using S = decltype(stag);
        D *out = static_cast<D *>(dst);
        const S *in = static_cast<const S *>(src);
#pragma omp parallel for schedule(static) if (worth_threads(n))
        for (int64_t i = 0; i < n; ++i) put(out[i], f32(in[i]));
      });
    });
  });
}

moe_status find_nonfinite(void *st, const void *p, int dtype, int64_t n, int64_t *first) {
  return guarded(st, [&] {
    *first = -1;
    with_dtype(dtype, [&](auto tag) {
      using E = decltype(tag);
      const E *v = static_cast<const E *>(p);
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(f32(v[i]))) {
          *first = i;
          break;
        }
    });
  });
}

}  // namespace moe::cpu
