// extern "C" entry points for checkpoints: moe_layer_load, moe_layer_save and moe_layer_save_as.
#include "api/guard.h"
#include "core/checkpoint.h"

using moe::require;

extern "C" {

MOE_API moe_status moe_layer_load(moe_layer *layer, const char *path, const char *prefix, const char *family) {
  return moe::call("moe_layer_load", [&] {
    require(layer != nullptr, "layer is NULL");
    require(path != nullptr, "path is NULL");
    moe::load_checkpoint(*layer, path, prefix ? prefix : "", family ? family : "");
  });
}

MOE_API moe_status moe_layer_save(const moe_layer *layer, const char *path, const char *prefix) {
  return moe::call("moe_layer_save", [&] {
    require(layer != nullptr, "layer is NULL");
    require(path != nullptr, "path is NULL");
    moe::save_checkpoint(*layer, path, prefix ? prefix : "");
  });
}

MOE_API moe_status moe_layer_save_as(const moe_layer *layer, const char *path, const char *prefix,
                                     const char *family) {
  return moe::call("moe_layer_save_as", [&] {
    require(layer != nullptr, "layer is NULL");
    require(path != nullptr, "path is NULL");
    moe::save_checkpoint(*layer, path, prefix ? prefix : "", family ? family : "");
  });
}

}  // extern "C"
