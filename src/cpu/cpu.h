// Shared pieces of the CPU backend's stage files.
#pragma once
#include <exception>
#include <new>
#include <string>

#include "core/backend.h"
#include "core/error.h"

namespace moe::cpu {

struct State {
  std::string error;
};

// Runs a stage body, turning exceptions into a status and the state's message.
template <class F>
moe_status guarded(void *state, F &&body) noexcept {
  auto *st = static_cast<State *>(state);
  try {
    body();
    return MOE_OK;
  } catch (const Error &e) {
    st->error = e.what();
    return e.status();
  } catch (const std::bad_alloc &) {
    st->error = "out of host memory";
    return MOE_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    st->error = e.what();
    return MOE_ERR_INTERNAL;
  }
}

// Stage entry points (one file each, named for the stage).
moe_status gate(void *, const moe_gate_args *);
moe_status gate_bwd(void *, const moe_gate_args *);
moe_status select(void *, const moe_select_args *);
moe_status plan(void *, const moe_plan_args *);
moe_status select_bwd(void *, const moe_select_bwd_args *);
moe_status dispatch(void *, const moe_rows_args *);
moe_status dispatch_bwd(void *, const moe_rows_args *);
moe_status expert_ffn(void *, const moe_ffn_args *);
moe_status expert_ffn_bwd(void *, const moe_ffn_args *);
moe_status combine(void *, const moe_rows_args *);
moe_status combine_bwd(void *, const moe_rows_args *);
moe_status shared_combine(void *, const moe_shared_args *);
moe_status shared_combine_bwd(void *, const moe_shared_args *);

}  // namespace moe::cpu
