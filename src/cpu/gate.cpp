// Router logits L = X Wr^T and their backward.
#include "cpu/blas.h"
#include "cpu/cpu.h"

namespace moe::cpu {

moe_status gate(void *st, const moe_gate_args *a) {
  return guarded(st, [&] {
    if (a->T == 0) return;
    sgemm(false, true, a->T, a->E, a->d, 1.0f, a->x, a->d, a->w, a->d, 0.0f, a->logits, a->E);
  });
}

moe_status gate_bwd(void *st, const moe_gate_args *a) {
  return guarded(st, [&] {
    if (a->T == 0) return;
    if (a->dx) sgemm(false, false, a->T, a->d, a->E, 1.0f, a->dlogits, a->E, a->w, a->d, 1.0f, a->dx, a->d);
    sgemm(true, false, a->E, a->d, a->T, 1.0f, a->dlogits, a->E, a->x, a->d, 1.0f, a->dw, a->d);
  });
}

}  // namespace moe::cpu
