// Loading a layer's parameters from safetensors checkpoints (libmoe's names or a model family's)
// and saving them in either (src/core/checkpoint.cpp, checkpoint_save.cpp, checkpoint_map.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/layer.h"

namespace moe {

// One block of a checkpoint tensor that fills part of a parameter. The tensor, viewed as
// [A, R, C] (a 1-D tensor as [1, 1, n], 2-D as [1, R, C]), gives rows [row0, row0+rows) and
// columns [col0, col0+cols) of slice `outer`; they land at element dst of the parameter, rows
// dst_ld elements apart.
struct Piece {
  std::string key;
  std::vector<int64_t> shape;  // the shape the tensor must have
  int64_t outer = 0, row0 = 0, col0 = 0, rows = 0, cols = 0;
  int64_t dst = 0, dst_ld = 0;
  bool read = true;  // false: another rank's expert, known to the checkpoint but not read here
  // Strided and transposed views (gpt-oss's interleaved gate/up columns, its [in, out] layout):
  // destination element (r, c) reads source row row0 + i*row_step, column col0 + j*col_step,
  // with (i, j) = (r, c), or (c, r) when transpose is set.
  int64_t row_step = 1, col_step = 1;
  bool transpose = false;
  // MXFP4 (gpt-oss's published checkpoints): key is a U8 "*_blocks" tensor [A, R, G, 16] of 4-bit
  // e2m1 values, two per byte (the low nibble first), and scales_key a U8 "*_scales" tensor
  // [A, R, G] of e8m0 exponents, one per block of 32; the piece reads the dequantised [A, R, G*32].
  std::string scales_key;
};

// What fills one parameter: pieces, or zeros when the family has no such tensor.
struct Target {
  Param *param = nullptr;
  std::vector<Piece> pieces;
  const char *zero_reason = nullptr;  // non-NULL: no pieces, the parameter becomes zero
};

// Answers whether the checkpoint holds a key (the mapping picks a family's layout by it).
struct KeyLookup {
  virtual ~KeyLookup() = default;
  virtual bool has(const std::string &key) const = 0;
};

// The families moe_layer_load knows, for messages.
extern const char *const kFamilyNames;

// Where each of the layer's parameters comes from in a checkpoint of `family` whose block is
// named `prefix`. Throws moe::Error for an unknown family or a layer the family cannot describe.
// A save reverses it: every piece is written back where the load would read it.
std::vector<Target> map_checkpoint(const moe_layer &layer, const std::string &family, const std::string &prefix,
                                   const KeyLookup &keys);

// moe_layer_load, and moe_layer_save / moe_layer_save_as (family "" or "libmoe": libmoe's names).
void load_checkpoint(moe_layer &layer, const std::string &path, const std::string &prefix, const std::string &family);
void save_checkpoint(const moe_layer &layer, const std::string &path, const std::string &prefix,
                     const std::string &family = "");

}  // namespace moe
