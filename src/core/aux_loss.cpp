// The auxiliary losses of shared/DESIGN.md section 4 from a forward's per-expert sums, and the
// coefficients their backward needs. Shared by every backend: only E-sized host arrays.
#include <algorithm>
#include <cmath>

#include "core/layer.h"

namespace moe {
namespace {

struct Cv2 {
  double value;
  std::vector<double> grad;  // d CV^2 / d v_e
};

// Squared coefficient of variation, population variance, mean^2 floored at 1e-10.
Cv2 cv_squared(const std::vector<double> &v) {
  const double n = static_cast<double>(v.size());
  double mean = 0.0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0.0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  const double m2 = mean * mean;
  const bool floored = m2 < 1e-10;
  const double denom = floored ? 1e-10 : m2;
  Cv2 out{var / denom, std::vector<double>(v.size())};
  for (size_t e = 0; e < v.size(); ++e) {
    double dvar = 2.0 * (v[e] - mean) / n;
    double g = dvar / denom;
    if (!floored) g -= 2.0 * var / (m2 * mean) / n;
    out.grad[e] = g;
  }
  return out;
}

}  // namespace

void compute_aux_losses(const Config &cfg, RoutingSummary &r) {
  // With expert parallelism the sums are over every rank's tokens (exchange_routing_stats), so
  // each rank reports and differentiates the losses of the global batch.
  const int64_t E = cfg.E, T = r.global_T;
  const double slots = static_cast<double>(T) * cfg.k;  // T*k for both routings, as section 4 writes f_e
  moe_stats &s = r.stats;
  s = moe_stats{};
  s.struct_size = sizeof(moe_stats);
  s.num_tokens = r.T;
  const bool ec = cfg.c.routing == MOE_ROUTE_EXPERT_CHOICE;
  // An expert-choice expert cannot take more tokens than there are.
  s.num_slots = ec ? E * r.groups.taken() : r.T * cfg.k;
  s.dropped_slots = s.num_slots - r.R;
  r.lb_coef.assign(E, 0.0f);
  r.gate_coef.assign(E, 0.0f);
  r.load_coef.assign(E, 0.0f);
  if (T == 0) return;

  // LB = E * sum_e f_e * Pbar_e, f_e = n_e / (T k), Pbar_e = mean_t P[t,e]; gradient through P only.
  double lb = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const double f = r.counts[e] / slots;
    lb += f * (r.prob_sum[e] / T);
    r.lb_coef[e] = static_cast<float>(cfg.c.aux_loss_coef * E * f / T);
  }
  s.load_balance_loss = static_cast<float>(E * lb);
  s.z_loss = static_cast<float>(r.lse_sq_sum / T);

  Cv2 imp = cv_squared(r.weight_sum);
  s.importance_loss = static_cast<float>(imp.value);
  if (cfg.c.importance_loss_coef != 0.0f)
    for (int64_t e = 0; e < E; ++e) r.gate_coef[e] = static_cast<float>(cfg.c.importance_loss_coef * imp.grad[e]);

  if (r.noisy && !r.load_sum.empty()) {
    Cv2 load = cv_squared(r.load_sum);
    s.load_loss = static_cast<float>(load.value);
    if (cfg.c.load_loss_coef != 0.0f)
      for (int64_t e = 0; e < E; ++e) r.load_coef[e] = static_cast<float>(cfg.c.load_loss_coef * load.grad[e]);
  }

  s.aux_loss_total = static_cast<float>(cfg.c.aux_loss_coef * static_cast<double>(s.load_balance_loss) +
                                        cfg.c.z_loss_coef * static_cast<double>(s.z_loss) +
                                        cfg.c.importance_loss_coef * imp.value +
                                        cfg.c.load_loss_coef * static_cast<double>(s.load_loss));

  double mean = 0.0, mx = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    mean += static_cast<double>(r.global_kept[e]);
    mx = std::max(mx, static_cast<double>(r.global_kept[e]));
  }
  mean /= E;
  double var = 0.0;
  for (int64_t e = 0; e < E; ++e) var += (r.global_kept[e] - mean) * (r.global_kept[e] - mean);
  var /= E;
  s.load_cv = mean > 0 ? static_cast<float>(std::sqrt(var) / mean) : 0.0f;
  s.max_load_ratio = mean > 0 ? static_cast<float>(mx / mean) : 0.0f;
}

}  // namespace moe
