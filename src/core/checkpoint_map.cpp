// Key names and layouts of each model family's MoE block, as its transformers modelling code
// names them, mapped onto libmoe's parameters.
#include <cstring>

#include "core/checkpoint.h"
#include "core/error.h"

namespace moe {

const char *const kFamilyNames = "libmoe, mixtral, qwen2-moe, qwen3-moe, olmoe, deepseek-v3, switch, gpt-oss";

namespace {

struct Family {
  const char *name;
  const char *router;       // [E, d]
  const char *router_bias;  // [E] selection bias, or NULL: the family has none (zero)
  const char *expert_dir;   // per-expert modules: "<experts>.<dir><e>.<proj>.weight"
  const char *up, *gate, *down;  // per-expert projection names; gate NULL: plain (non-GLU) experts
  const char *shared;       // the shared expert module, or NULL
  const char *shared_gate;  // [1, d], or NULL
  const char *router_linear_bias;  // [E] of an nn.Linear router with bias (-> router.logit_bias), or NULL
};

// transformers' modelling code of each family (per-expert nn.Linear layout of 4.x; 5.x stores the
// experts fused as experts.gate_up_proj [E, 2*ff, d] (gate rows first) and experts.down_proj
// [E, d, ff], which every GLU family here also accepts):
//   mixtral      MixtralSparseMoeBlock: gate, experts.N.w1 (gate) / w3 (up) / w2 (down)
//   qwen2-moe    Qwen2MoeSparseMoeBlock: gate, experts.N.{gate,up,down}_proj, shared_expert.*,
//                shared_expert_gate [1, d]
//   qwen3-moe    Qwen3MoeSparseMoeBlock, olmoe OlmoeSparseMoeBlock: gate, experts.N.{gate,up,down}_proj
//   deepseek-v3  DeepseekV3MoE: gate.weight, gate.e_score_correction_bias, experts.N.*_proj,
//                shared_experts.* (width n_shared_experts * moe_intermediate_size)
//   switch       SwitchTransformersSparseMLP: router.classifier, experts.expert_N.wi / wo (ReLU)
const Family kFamilies[] = {
    {"mixtral", "gate.weight", nullptr, "", "w3", "w1", "w2", nullptr, nullptr, nullptr},
    {"qwen2-moe", "gate.weight", nullptr, "", "up_proj", "gate_proj", "down_proj", "shared_expert",
     "shared_expert_gate.weight", nullptr},
    {"qwen3-moe", "gate.weight", nullptr, "", "up_proj", "gate_proj", "down_proj", nullptr, nullptr, nullptr},
    {"olmoe", "gate.weight", nullptr, "", "up_proj", "gate_proj", "down_proj", nullptr, nullptr, nullptr},
    {"deepseek-v3", "gate.weight", "gate.e_score_correction_bias", "", "up_proj", "gate_proj", "down_proj",
     "shared_experts", nullptr, nullptr},
    {"switch", "router.classifier.weight", nullptr, "expert_", "wi", nullptr, "wo", nullptr, nullptr,
     "router.classifier.bias"},
};

class Mapper {
 public:
  Mapper(const moe_layer &l, const std::string &family, const std::string &prefix)
      : l_(l), c_(l.cfg), family_(family), prefix_(prefix) {}

  std::string key(const std::string &s) const { return prefix_.empty() ? s : prefix_ + "." + s; }

  Target &target(Param *p) {
    out_.push_back(Target{});
    out_.back().param = p;
    return out_.back();
  }

  // The whole tensor `k` of `shape` into p (row-major, same element order), as rows of its last dimension.
  void whole(Param *p, const std::string &k, std::vector<int64_t> shape) {
    Target &t = target(p);
    Piece pc;
    pc.key = k;
    pc.shape = shape;
    pc.cols = shape.back();
    pc.rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) pc.rows *= shape[i];  // sizes the layer already checked
    pc.dst_ld = pc.cols;
    t.pieces.push_back(std::move(pc));
  }

  void zero(Param *p, const char *why) {
    if (p) target(p).zero_reason = why;
  }

  // One piece per expert e of the model (a rank reads only its own: read) holding a [rows, cols]
  // block, into expert e - begin of t; at(pc, e) says where the block lies in the tensor.
  template <class At>
  void expert_pieces(Target &t, const std::string &k, std::vector<int64_t> shape, int64_t rows, int64_t cols, At &&at) {
    for (int64_t e = 0; e < c_.E; ++e) {
      Piece pc;
      pc.key = k;
      pc.shape = shape;
      pc.rows = rows;
      pc.cols = cols;
      pc.dst = (e - c_.expert_begin) * rows * cols;
      pc.dst_ld = cols;
      pc.read = local(e);
      at(pc, e);
      t.pieces.push_back(std::move(pc));
    }
  }

  // Expert e's [rows, cols] block of a [E, R, C] tensor (rows from row0) into expert e - begin of p.
  void fused(Target &t, const std::string &k, std::vector<int64_t> shape, int64_t row0, int64_t rows) {
    expert_pieces(t, k, shape, rows, shape[2], [&](Piece &pc, int64_t e) {
      pc.outer = e;
      pc.row0 = row0;
    });
  }

  // Expert e's own [rows, cols] tensor into expert e - begin of p.
  void per_expert(Target &t, const std::string &dir, const char *proj, int64_t rows, int64_t cols) {
    expert_pieces(t, "", {rows, cols}, rows, cols,
                  [&](Piece &pc, int64_t e) { pc.key = key(dir + std::to_string(e) + "." + proj + ".weight"); });
  }

  bool local(int64_t e) const { return e >= c_.expert_begin && e < c_.expert_begin + c_.E_local; }

  // This rank's rows of a [E, n] tensor of per-expert vectors: columns col0, col0 + step, ... (cols
  // of them) of each row.
  void expert_rows(Param *p, const std::string &k, int64_t n, int64_t col0, int64_t step, int64_t cols) {
    Piece pc;
    pc.key = k;
    pc.shape = {c_.E, n};
    pc.row0 = c_.expert_begin;
    pc.rows = c_.E_local;
    pc.col0 = col0;
    pc.col_step = step;
    pc.cols = cols;
    pc.dst_ld = cols;
    target(p).pieces.push_back(std::move(pc));
  }

  // Expert e's [rows, cols] parameter from the transpose of columns col0, col0 + step, ... of its
  // [cols, rows*step] slice of a [E, cols, N] tensor (gpt-oss's [in, out] layout).
  void fused_transposed(Target &t, const std::string &k, std::vector<int64_t> shape, int64_t col0, int64_t step,
                        int64_t rows, int64_t cols) {
    expert_pieces(t, k, shape, rows, cols, [&](Piece &pc, int64_t e) {
      pc.outer = e;
      pc.transpose = true;
      pc.col0 = col0;
      pc.col_step = step;
    });
  }

  // Expert e's [rows, cols] parameter from rows row0, row0 + step, ... of its slice of the MXFP4
  // tensor name + "_blocks" (shape: [E, R, G, 16]) with its name + "_scales".
  void mxfp4(Target &t, const std::string &name, std::vector<int64_t> shape, int64_t row0, int64_t step, int64_t rows,
             int64_t cols) {
    expert_pieces(t, key(name + "_blocks"), shape, rows, cols, [&](Piece &pc, int64_t e) {
      pc.scales_key = key(name + "_scales");
      pc.outer = e;
      pc.row0 = row0;
      pc.row_step = step;
    });
  }

  // Parameters the family has no tensor for are zero, as the model has them.
  void zero_biases(const char *fam_has_none) {
    zero(l_.b1, fam_has_none);
    zero(l_.b3, fam_has_none);
    zero(l_.b2, fam_has_none);
  }

  // gpt-oss (transformers' GptOssMLP): router.weight [E, d] and router.bias [E] (inside the
  // logits); experts.gate_up_proj [E, d, 2*ff] with gate and up interleaved along the last axis
  // (gate = [..., ::2], up = [..., 1::2]), experts.gate_up_proj_bias [E, 2*ff] likewise,
  // experts.down_proj [E, ff, d], experts.down_proj_bias [E, d].
  std::vector<Target> gpt_oss(const KeyLookup &keys) {
    if (c_.c.activation != MOE_ACT_SWIGLU_CLAMPED)
      fail(MOE_ERR_INVALID_ARGUMENT,
           "family: gpt-oss's experts compute the clamped SwiGLU, but the layer's activation is %d: create the layer "
           "with MOE_ACT_SWIGLU_CLAMPED (preset \"gpt-oss\")",
           (int)c_.c.activation);
    if (c_.S > 0)
      fail(MOE_ERR_INVALID_ARGUMENT, "family: gpt-oss has no shared experts, but the layer has num_shared_experts %lld",
           (long long)c_.S);
    whole(l_.router_w, key("router.weight"), {c_.E, c_.d});
    if (l_.logit_bias) whole(l_.logit_bias, key("router.bias"), {c_.E});
    zero(l_.noise_w, "the family has no noise router");
    zero(l_.router_bias, "the family has no selection bias");
    const int64_t E = c_.E, d = c_.d, ff = c_.ff;
    if (keys.has(key("experts.gate_up_proj_blocks"))) {
      // The published files: MXFP4 weights in nn.Linear layout, [E, 2ff, d] (gate and up rows
      // interleaved) and [E, d, ff], dequantised on load.
      if (d % 32 != 0 || ff % 32 != 0)
        fail(MOE_ERR_INVALID_ARGUMENT,
             "family: gpt-oss's MXFP4 tensors hold blocks of 32 values, but the layer's d_model %lld or d_ff %lld "
             "is not a multiple of 32",
             (long long)d, (long long)ff);
      mxfp4(target(l_.w1), "experts.gate_up_proj", {E, 2 * ff, d / 32, 16}, 0, 2, ff, d);
      mxfp4(target(l_.w3), "experts.gate_up_proj", {E, 2 * ff, d / 32, 16}, 1, 2, ff, d);
      mxfp4(target(l_.w2), "experts.down_proj", {E, d, ff / 32, 16}, 0, 1, d, ff);
    } else {
      fused_transposed(target(l_.w1), key("experts.gate_up_proj"), {E, d, 2 * ff}, 0, 2, ff, d);
      fused_transposed(target(l_.w3), key("experts.gate_up_proj"), {E, d, 2 * ff}, 1, 2, ff, d);
      fused_transposed(target(l_.w2), key("experts.down_proj"), {E, ff, d}, 0, 1, d, ff);
    }
    if (l_.b1) {
      expert_rows(l_.b1, key("experts.gate_up_proj_bias"), 2 * ff, 0, 2, ff);
      expert_rows(l_.b3, key("experts.gate_up_proj_bias"), 2 * ff, 1, 2, ff);
      expert_rows(l_.b2, key("experts.down_proj_bias"), d, 0, 1, d);
    }
    return std::move(out_);
  }

  std::vector<Target> libmoe() {
    whole(l_.router_w, key("router.weight"), {c_.E, c_.d});
    if (l_.noise_w) whole(l_.noise_w, key("router.noise_weight"), {c_.E, c_.d});
    whole(l_.router_bias, key("router.bias"), {c_.E});
    if (l_.logit_bias) whole(l_.logit_bias, key("router.logit_bias"), {c_.E});
    fused(target(l_.w1), key("experts.w1"), {c_.E, c_.ff, c_.d}, 0, c_.ff);
    if (l_.w3) fused(target(l_.w3), key("experts.w3"), {c_.E, c_.ff, c_.d}, 0, c_.ff);
    fused(target(l_.w2), key("experts.w2"), {c_.E, c_.d, c_.ff}, 0, c_.d);
    if (l_.b1) expert_rows(l_.b1, key("experts.b1"), c_.ff, 0, 1, c_.ff);
    if (l_.b3) expert_rows(l_.b3, key("experts.b3"), c_.ff, 0, 1, c_.ff);
    if (l_.b2) expert_rows(l_.b2, key("experts.b2"), c_.d, 0, 1, c_.d);
    if (l_.sw1) whole(l_.sw1, key("shared.w1"), {c_.S, c_.ffs, c_.d});
    if (l_.sw3) whole(l_.sw3, key("shared.w3"), {c_.S, c_.ffs, c_.d});
    if (l_.sw2) whole(l_.sw2, key("shared.w2"), {c_.S, c_.d, c_.ffs});
    if (l_.sgate) whole(l_.sgate, key("shared.gate"), {1, c_.d});
    return std::move(out_);
  }

  std::vector<Target> hf(const Family &f, const KeyLookup &keys) {
    const char *fam = f.name;
    const bool family_glu = f.gate != nullptr;
    if (family_glu != c_.glu)
      fail(MOE_ERR_INVALID_ARGUMENT,
           "family: %s's experts are %s, but the layer's activation (%d) is %s: create the layer with %s", fam,
           family_glu ? "gated (gate and up projections)" : "plain two-layer FFNs", (int)c_.c.activation,
           c_.glu ? "gated (SwiGLU/GeGLU)" : "not gated", family_glu ? "MOE_ACT_SWIGLU" : "MOE_ACT_RELU");
    if (c_.S > 0 && !f.shared)
      fail(MOE_ERR_INVALID_ARGUMENT, "family: %s has no shared experts, but the layer has num_shared_experts %lld",
           fam, (long long)c_.S);
    if (c_.c.shared_gate && !f.shared_gate)
      fail(MOE_ERR_INVALID_ARGUMENT, "family: %s has no shared-expert gate, but the layer has shared_gate on", fam);

    whole(l_.router_w, key(f.router), {c_.E, c_.d});
    // An nn.Linear router with bias (Switch's router_bias=True) gives its bias to router.logit_bias.
    if (l_.logit_bias && f.router_linear_bias && keys.has(key(f.router_linear_bias)))
      whole(l_.logit_bias, key(f.router_linear_bias), {c_.E});
    else
      zero(l_.logit_bias, "the family's router has no bias");
    zero_biases("the family's experts have no biases");
    zero(l_.noise_w, "the family has no noise router");
    if (f.router_bias)
      whole(l_.router_bias, key(f.router_bias), {c_.E});
    else
      zero(l_.router_bias, "the family has no selection bias");

    const std::string gate_up = key("experts.gate_up_proj");
    if (family_glu && keys.has(gate_up)) {
      // transformers 5: gate rows [0, ff), up rows [ff, 2ff) of each expert.
      fused(target(l_.w1), gate_up, {c_.E, 2 * c_.ff, c_.d}, 0, c_.ff);
      fused(target(l_.w3), gate_up, {c_.E, 2 * c_.ff, c_.d}, c_.ff, c_.ff);
      fused(target(l_.w2), key("experts.down_proj"), {c_.E, c_.d, c_.ff}, 0, c_.d);
    } else {
      const std::string dir = std::string("experts.") + f.expert_dir;
      per_expert(target(l_.w1), dir, family_glu ? f.gate : f.up, c_.ff, c_.d);
      if (family_glu) per_expert(target(l_.w3), dir, f.up, c_.ff, c_.d);
      per_expert(target(l_.w2), dir, f.down, c_.d, c_.ff);
    }

    if (c_.S > 0) {
      // One module of width S*ffs in the checkpoint is S experts of width ffs here: the hidden units
      // of a gated FFN are independent, so splitting them changes nothing.
      const int64_t W = c_.S * c_.ffs;
      const std::string sh = std::string(f.shared) + ".";
      Param *in[2] = {l_.sw1, l_.sw3};
      const char *in_names[2] = {f.gate, f.up};
      for (int i = 0; i < 2; ++i) {
        Target &t = target(in[i]);
        for (int64_t s = 0; s < c_.S; ++s) {
          Piece pc;
          pc.key = key(sh + in_names[i] + ".weight");
          pc.shape = {W, c_.d};
          pc.row0 = s * c_.ffs;
          pc.rows = c_.ffs;
          pc.cols = c_.d;
          pc.dst = s * c_.ffs * c_.d;
          pc.dst_ld = c_.d;
          t.pieces.push_back(std::move(pc));
        }
      }
      Target &t = target(l_.sw2);
      for (int64_t s = 0; s < c_.S; ++s) {
        Piece pc;
        pc.key = key(sh + f.down + ".weight");
        pc.shape = {c_.d, W};
        pc.col0 = s * c_.ffs;
        pc.rows = c_.d;
        pc.cols = c_.ffs;
        pc.dst = s * c_.d * c_.ffs;
        pc.dst_ld = c_.ffs;
        t.pieces.push_back(std::move(pc));
      }
      if (l_.sgate) whole(l_.sgate, key(f.shared_gate), {1, c_.d});
    }
    return std::move(out_);
  }

 private:
  const moe_layer &l_;
  const Config &c_;
  std::string family_, prefix_;
  std::vector<Target> out_;
};

}  // namespace

std::vector<Target> map_checkpoint(const moe_layer &layer, const std::string &family, const std::string &prefix,
                                   const KeyLookup &keys) {
  Mapper m(layer, family, prefix);
  if (family.empty() || family == "libmoe") return m.libmoe();
  for (const Family &f : kFamilies)
    if (family == f.name) return m.hf(f, keys);
  if (family == "gpt-oss") return m.gpt_oss(keys);
  fail(MOE_ERR_INVALID_ARGUMENT, "family: unknown family \"%s\" (known: %s)", family.c_str(), kFamilyNames);
}

}  // namespace moe
