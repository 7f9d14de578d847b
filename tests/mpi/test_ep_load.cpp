// moe_layer_load under expert parallelism: R in-process ranks each load the same checkpoint (libmoe's
// fused names, DeepSeek-V3's per-expert modules, gpt-oss's interleaved experts), keep only their
// own experts' slices, and together compute what one layer holding all experts computes. A
// checkpoint never depends on R.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "ep_world.h"
#include "moe/moe.h"
#include "support/half.h"
#include "support/random.h"
#include "support/safetensors.h"

namespace {

const int64_t d = 12, ff = 10, E = 8, S = 1;

std::vector<std::string> errors;
std::mutex errors_mu;
void check(bool ok, const std::string &what) {
  if (ok) return;
  std::lock_guard<std::mutex> lock(errors_mu);
  errors.push_back(what);
}

void configure(moe_config &cfg, int dtype, uint64_t seed) {
  moe_config_init(&cfg);
  cfg.dtype = static_cast<moe_dtype>(dtype);
  cfg.d_model = d;
  cfg.d_ff = ff;
  cfg.num_experts = E;
  cfg.top_k = 3;
  cfg.score = MOE_SCORE_SIGMOID;
  cfg.num_groups = 4;
  cfg.topk_groups = 2;
  cfg.routed_scale = 2.5f;
  cfg.num_shared_experts = S;
  cfg.seed = seed;
}

std::vector<float> param(moe_layer *l, const char *name, int64_t n) {
  std::vector<float> v(n);
  check(moe_layer_get_param(l, name, v.data(), n) == MOE_OK, std::string("get_param: ") + moe_last_error());
  return v;
}

std::vector<float> slice(const std::vector<float> &v, int64_t first, int64_t n) {
  return std::vector<float>(v.begin() + first, v.begin() + first + n);
}

double rel(const std::vector<float> &a, const std::vector<float> &b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num) / (std::sqrt(den) + 1e-30);
}

// gpt-oss's layout (the interleaved, transposed gate_up_proj and the biases, sliced per expert in
// other ways than the fused [E, R, C] tensors above): each rank keeps its experts' weights and
// biases, and the ranks together compute the single-rank layer's output.
void gpt_oss_ep_load(const std::string &dir, int dt) {
  const size_t es = moe_test::dtype_size(dt);
  const double tol = dt == MOE_DTYPE_F32 ? 1e-5 : 1e-2;
  auto make = [&](uint64_t seed, const moe_comm *comm) {
    moe_config c;
    moe_config_init(&c);
    check(moe_config_preset(&c, "gpt-oss") == MOE_OK, moe_last_error());
    c.d_model = d;
    c.d_ff = ff;
    c.num_experts = E;
    c.top_k = 2;
    c.dtype = static_cast<moe_dtype>(dt);
    c.seed = seed;
    c.comm = comm;
    moe_layer *l = nullptr;
    if (moe_layer_create(&c, &l) != MOE_OK) std::abort();
    return l;
  };
  moe_layer *ref = make(5, nullptr);
  moe_test::Rng rng(23);
  const int np = moe_layer_num_params(ref);
  for (int i = 0; i < np; ++i) {
    moe_param_info pi;
    moe_layer_param_info(ref, i, &pi);
    int64_t n = 1;
    for (int j = 0; j < pi.ndim; ++j) n *= pi.shape[j];
    if (std::strcmp(pi.name, "router.bias") == 0) continue;  // gpt-oss has no selection bias: it stays 0
    const std::vector<float> v = rng.uniforms(n, -0.5f, 0.5f);
    check(moe_layer_set_param(ref, pi.name, v.data(), n) == MOE_OK, moe_last_error());
  }
  const std::vector<float> w1 = param(ref, "experts.w1", E * ff * d), w3 = param(ref, "experts.w3", E * ff * d),
                           w2 = param(ref, "experts.w2", E * d * ff), b1 = param(ref, "experts.b1", E * ff),
                           b3 = param(ref, "experts.b3", E * ff), b2 = param(ref, "experts.b2", E * d);
  std::vector<float> gate_up(E * d * 2 * ff), gate_up_bias(E * 2 * ff), down(E * ff * d);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t f = 0; f < ff; ++f) {
      for (int64_t i = 0; i < d; ++i) {
        gate_up[(e * d + i) * 2 * ff + 2 * f] = w1[(e * ff + f) * d + i];
        gate_up[(e * d + i) * 2 * ff + 2 * f + 1] = w3[(e * ff + f) * d + i];
        down[(e * ff + f) * d + i] = w2[(e * d + i) * ff + f];
      }
      gate_up_bias[e * 2 * ff + 2 * f] = b1[e * ff + f];
      gate_up_bias[e * 2 * ff + 2 * f + 1] = b3[e * ff + f];
    }
  const std::string path = dir + "/gpt-oss.safetensors";
  {
    moe_test::SafetensorsWriter w;
    w.add("model.layers.0.mlp.router.weight", {E, d}, param(ref, "router.weight", E * d));
    w.add("model.layers.0.mlp.router.bias", {E}, param(ref, "router.logit_bias", E));
    w.add("model.layers.0.mlp.experts.gate_up_proj", {E, d, 2 * ff}, gate_up, dt);
    w.add("model.layers.0.mlp.experts.gate_up_proj_bias", {E, 2 * ff}, gate_up_bias, dt);
    w.add("model.layers.0.mlp.experts.down_proj", {E, ff, d}, down, dt);
    w.add("model.layers.0.mlp.experts.down_proj_bias", {E, d}, b2, dt);
    w.write(path);
  }
  for (int R : {2, 4}) {
    const int64_t Tg = 9 * R;
    const std::vector<unsigned char> x = moe_test::encode(dt, moe_test::inputs(Tg * d, 7, 1.0f));
    std::vector<unsigned char> yrb(Tg * d * es);
    check(moe_forward(ref, x.data(), Tg, yrb.data(), nullptr) == MOE_OK, moe_last_error());
    const std::vector<float> yr = moe_test::decode(dt, yrb);
    ep_world::World world(R);
    std::vector<std::thread> threads;
    for (int r = 0; r < R; ++r)
      threads.emplace_back([&, r] {
        ep_world::Rank me{&world, r};
        moe_comm comm{sizeof(moe_comm), R, r, &me, ep_world::counts_hook, ep_world::rows_hook, nullptr};
        moe_layer *ep = make(99, &comm);
        const int64_t El = E / R, T = 9;
        const std::string tag = "gpt-oss R=" + std::to_string(R) + " rank " + std::to_string(r) +
                                (dt == MOE_DTYPE_F32 ? " float32" : " bfloat16");
        check(moe_layer_load(ep, path.c_str(), "model.layers.0.mlp", "gpt-oss") == MOE_OK,
              tag + ": load: " + moe_last_error());
        check(param(ep, "experts.w1", El * ff * d) == slice(w1, r * El * ff * d, El * ff * d), tag + ": experts.w1");
        check(param(ep, "experts.w2", El * d * ff) == slice(w2, r * El * d * ff, El * d * ff), tag + ": experts.w2");
        check(param(ep, "experts.b3", El * ff) == slice(b3, r * El * ff, El * ff), tag + ": experts.b3");
        check(param(ep, "experts.b2", El * d) == slice(b2, r * El * d, El * d), tag + ": experts.b2");
        std::vector<unsigned char> yb(T * d * es);
        check(moe_forward(ep, x.data() + r * T * d * es, T, yb.data(), nullptr) == MOE_OK,
              tag + ": forward: " + moe_last_error());
        check(rel(moe_test::decode(dt, yb), slice(yr, r * T * d, T * d)) < tol,
              tag + ": y differs from the single-rank layer");
        moe_layer_destroy(ep);
      });
    for (auto &t : threads) t.join();
    std::printf("gpt-oss load under %d in-process ranks, %s: %zu failed checks so far\n", R,
                dt == MOE_DTYPE_F32 ? "float32" : "bfloat16", errors.size());
  }
  moe_layer_destroy(ref);
}

}  // namespace

int main() {
  std::string dir = (std::filesystem::temp_directory_path() / "moe_ep_load_XXXXXX").string();
  if (!::mkdtemp(dir.data())) return 2;
  for (int dt : {MOE_DTYPE_F32, MOE_DTYPE_BF16}) {
    const size_t es = moe_test::dtype_size(dt);
    const double tol = dt == MOE_DTYPE_F32 ? 1e-5 : 1e-2;
    // The single-rank layer, with random values (not any seed's), saved both ways.
    moe_config cfg;
    configure(cfg, dt, 5);
    moe_layer *ref = nullptr;
    if (moe_layer_create(&cfg, &ref) != MOE_OK) return 2;
    moe_test::Rng rng(17);
    const int np = moe_layer_num_params(ref);
    for (int i = 0; i < np; ++i) {
      moe_param_info pi;
      moe_layer_param_info(ref, i, &pi);
      int64_t n = 1;
      for (int j = 0; j < pi.ndim; ++j) n *= pi.shape[j];
      const std::vector<float> v = rng.uniforms(n, -0.5f, 0.5f);
      check(moe_layer_set_param(ref, pi.name, v.data(), n) == MOE_OK, moe_last_error());
    }
    const std::string own = dir + "/libmoe.safetensors", ds = dir + "/deepseek.safetensors";
    check(moe_layer_save(ref, own.c_str(), "blk") == MOE_OK, std::string("save: ") + moe_last_error());
    {
      const std::vector<float> w1 = param(ref, "experts.w1", E * ff * d), w3 = param(ref, "experts.w3", E * ff * d),
                               w2 = param(ref, "experts.w2", E * d * ff);
      moe_test::SafetensorsWriter w;
      const int sdt = dt;  // the experts as the layer stores them: the file holds the same values
      w.add("model.layers.3.mlp.gate.weight", {E, d}, param(ref, "router.weight", E * d));
      w.add("model.layers.3.mlp.gate.e_score_correction_bias", {E}, param(ref, "router.bias", E));
      for (int64_t e = 0; e < E; ++e) {
        const std::string p = "model.layers.3.mlp.experts." + std::to_string(e) + ".";
        w.add(p + "gate_proj.weight", {ff, d}, slice(w1, e * ff * d, ff * d), sdt);
        w.add(p + "up_proj.weight", {ff, d}, slice(w3, e * ff * d, ff * d), sdt);
        w.add(p + "down_proj.weight", {d, ff}, slice(w2, e * d * ff, d * ff), sdt);
      }
      w.add("model.layers.3.mlp.shared_experts.gate_proj.weight", {S * ff, d}, param(ref, "shared.w1", S * ff * d), sdt);
      w.add("model.layers.3.mlp.shared_experts.up_proj.weight", {S * ff, d}, param(ref, "shared.w3", S * ff * d), sdt);
      w.add("model.layers.3.mlp.shared_experts.down_proj.weight", {d, S * ff}, param(ref, "shared.w2", S * d * ff),
            sdt);
      w.write(ds);
    }
    for (int R : {2, 4}) {
      std::vector<int64_t> T(R), first(R);
      int64_t Tg = 0;
      for (int r = 0; r < R; ++r) {
        T[r] = 3 + 2 * r;
        first[r] = Tg;
        Tg += T[r];
      }
      const std::vector<unsigned char> x = moe_test::encode(dt, moe_test::inputs(Tg * d, 3, 1.0f));
      std::vector<unsigned char> yrb(Tg * d * es);
      check(moe_forward(ref, x.data(), Tg, yrb.data(), nullptr) == MOE_OK, moe_last_error());
      const std::vector<float> yr = moe_test::decode(dt, yrb);
      const std::vector<float> w2r = param(ref, "experts.w2", E * d * ff);

      ep_world::World world(R);
      std::vector<std::thread> threads;
      for (int r = 0; r < R; ++r)
        threads.emplace_back([&, r] {
          ep_world::Rank me{&world, r};
          moe_comm comm{sizeof(moe_comm), R, r, &me, ep_world::counts_hook, ep_world::rows_hook, nullptr};
          moe_config c;
          configure(c, dt, 99);  // another seed: nothing agrees before the load
          c.comm = &comm;
          moe_layer *ep = nullptr;
          if (moe_layer_create(&c, &ep) != MOE_OK) std::abort();
          const int64_t El = E / R;
          const std::vector<float> want_w2 = slice(w2r, r * El * d * ff, El * d * ff);
          check(param(ep, "experts.w2", El * d * ff) != want_w2, "the layers agree before any load");
          for (const auto &[path, prefix, family] :
               {std::tuple{own, "blk", "libmoe"}, std::tuple{ds, "model.layers.3.mlp", "deepseek-v3"}}) {
            const std::string tag = std::string(family) + " R=" + std::to_string(R) + " rank " + std::to_string(r) +
                                    (dt == MOE_DTYPE_F32 ? " float32" : " bfloat16");
            check(moe_layer_load(ep, path.c_str(), prefix, family) == MOE_OK,
                  tag + ": load: " + moe_last_error());
            check(param(ep, "experts.w2", El * d * ff) == want_w2, tag + ": experts.w2 is not this rank's slice");
            check(param(ep, "router.bias", E) == param(ref, "router.bias", E), tag + ": router.bias differs");
            std::vector<unsigned char> yb(T[r] * d * es);
            check(moe_forward(ep, x.data() + first[r] * d * es, T[r], yb.data(), nullptr) == MOE_OK,
                  tag + ": forward: " + moe_last_error());
            const std::vector<float> y = moe_test::decode(dt, yb);
            check(rel(y, slice(yr, first[r] * d, T[r] * d)) < tol, tag + ": y differs from the single-rank layer");
          }
          // Saving an expert-parallel layer is refused, not written half.
          check(moe_layer_save(ep, (dir + "/ep" + std::to_string(r)).c_str(), nullptr) == MOE_ERR_UNSUPPORTED,
                "saving an expert-parallel layer was not refused");
          moe_layer_destroy(ep);
        });
      for (auto &t : threads) t.join();
      std::printf("load under %d in-process ranks, %s: %zu failed checks so far\n", R,
                  dt == MOE_DTYPE_F32 ? "float32" : "bfloat16", errors.size());
    }
    moe_layer_destroy(ref);
    gpt_oss_ep_load(dir, dt);
  }
  std::filesystem::remove_all(dir);
  for (const auto &e : errors) std::fprintf(stderr, "FAIL: %s\n", e.c_str());
  return errors.empty() ? 0 : 1;
}
