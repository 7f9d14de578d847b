// Expert parallelism (shared/DESIGN.md section 3, moe_comm): rows travel to the ranks that own
// their experts and back, through the caller's all-to-all hooks.
#pragma once
#include <vector>

#include "core/layer.h"

namespace moe {

// Sums the per-expert routing statistics over all ranks (an all-gather through exchange_rows),
// so that every rank computes the aux losses and the bias update of the global batch.
void exchange_routing_stats(moe_layer &l, RoutingSummary &r);

// Plans the exchange of this forward's rows (collective: exchanges the per-expert counts).
ExchangePlan plan_exchange(moe_layer &l, Workspace &w, const RoutingSummary &r);

// Sends rows [R, width] of the layer's dtype (grouped by owner rank, in the sender's expert order)
// and returns them expert-major in `local` [recv_rows, width]; `from` does the reverse.
void exchange_to_experts(moe_layer &l, Workspace &w, const ExchangePlan &p, const void *rows, void *local, int64_t width);
void exchange_from_experts(moe_layer &l, Workspace &w, const ExchangePlan &p, const void *local, void *rows, int64_t width);

}  // namespace moe
