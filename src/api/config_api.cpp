// extern "C" entry points for configurations: defaults, presets, and fields by name (all read
// src/core/config_table.cpp). Nothing is changed before every check has passed.
#include <algorithm>
#include <cstring>
#include <string>

#include "api/guard.h"
#include "core/config.h"
#include "core/config_table.h"

using moe::fail;
using moe::require;

namespace {

// The row of field name, refusing a cfg whose struct_size does not reach it.
const moe::FieldRow &checked_field(const moe_config *cfg, const char *name) {
  require(cfg != nullptr, "cfg is NULL");
  require(name != nullptr, "name is NULL");
  if (cfg->struct_size < sizeof(size_t) || cfg->struct_size > 4096)
    fail(MOE_ERR_INVALID_ARGUMENT, "cfg->struct_size is %zu, expected %zu (call moe_config_init first)",
         cfg->struct_size, sizeof(moe_config));
  const moe::FieldRow *row = moe::find_field(name);
  if (!row)
    fail(MOE_ERR_INVALID_ARGUMENT, "name: moe_config has no field '%s' (the fields are: %s)", name,
         moe::field_names().c_str());
  if (row->offset + row->size > cfg->struct_size)
    fail(MOE_ERR_INVALID_ARGUMENT,
         "name: field %s lies past cfg->struct_size %zu (a moe_config from an older moe.h, which lacks it)", name,
         cfg->struct_size);
  return *row;
}

const moe::PresetRow &checked_preset(int index) {
  if (index < 0 || index >= moe::num_presets())
    fail(MOE_ERR_INVALID_ARGUMENT, "index is %d, must be in [0, %d)", index, moe::num_presets());
  return moe::preset_row(index);
}

}  // namespace

extern "C" {

// The parentheses keep moe.h's macros of the same names from expanding: these two are the
// entry points of programs built against 0.1 and 0.2, whose struct is MOE_CONFIG_SIZE_0_1 bytes.
MOE_API void(moe_config_init)(moe_config *cfg) { moe_config_init_size(cfg, MOE_CONFIG_SIZE_0_1); }

MOE_API void moe_config_init_size(moe_config *cfg, size_t size) {
  if (!cfg || size < MOE_CONFIG_SIZE_0_1) return;
  try {
    moe_config c;
    moe::config_defaults(&c);
    c.struct_size = std::min(size, sizeof c);
    std::memcpy(cfg, &c, c.struct_size);
  } catch (...) {  // the defaults are tested to parse; never let a bug unwind into C
    moe::report(MOE_ERR_INTERNAL, "moe_config_init", "internal error: a default did not parse");
  }
}

MOE_API moe_status(moe_config_preset)(moe_config *cfg, const char *name) {
  return moe_config_preset_size(cfg, MOE_CONFIG_SIZE_0_1, name);
}

MOE_API moe_status moe_config_preset_size(moe_config *cfg, size_t size, const char *name) {
  return moe::call("moe_config_preset", [&] {
    require(cfg != nullptr, "cfg is NULL");
    require(name != nullptr, "name is NULL");
    if (size < MOE_CONFIG_SIZE_0_1)
      fail(MOE_ERR_INVALID_ARGUMENT, "size is %zu, less than sizeof(moe_config) of any release (%zu)", size,
           static_cast<size_t>(MOE_CONFIG_SIZE_0_1));
    moe::config_preset(cfg, size, name);
  });
}

MOE_API int moe_config_num_fields(void) { return moe::num_fields(); }

MOE_API moe_status moe_config_field(int index, moe_config_field_info *out) {
  return moe::call("moe_config_field", [&] {
    require(out != nullptr, "out is NULL");
    if (out->struct_size < sizeof(size_t) || out->struct_size > 4096)
      fail(MOE_ERR_INVALID_ARGUMENT, "out->struct_size is %zu, expected %zu", out->struct_size,
           sizeof(moe_config_field_info));
    if (index < 0 || index >= moe::num_fields())
      fail(MOE_ERR_INVALID_ARGUMENT, "index is %d, must be in [0, %d)", index, moe::num_fields());
    const moe::FieldRow &row = moe::field_row(index);
    moe_config_field_info info{};
    info.struct_size = std::min(out->struct_size, sizeof info);
    info.name = row.name;
    info.type = row.type;
    info.offset = row.offset;
    info.size = row.size;
    info.default_value = row.default_value;
    info.num_values = row.values ? row.values->count : 0;
    info.value_names = row.values ? row.values->names : nullptr;
    info.description = row.description;
    std::memcpy(out, &info, info.struct_size);
  });
}

MOE_API moe_status moe_config_set(moe_config *cfg, const char *name, const char *value) {
  return moe::call("moe_config_set", [&] {
    const moe::FieldRow &row = checked_field(cfg, name);
    require(value != nullptr, "value is NULL");
    moe::set_field(cfg, row, value);  // parses fully before it stores
  });
}

MOE_API moe_status moe_config_get(const moe_config *cfg, const char *name, char *buf, size_t size) {
  return moe::call("moe_config_get", [&] {
    const moe::FieldRow &row = checked_field(cfg, name);
    require(buf != nullptr, "buf is NULL");
    const std::string text = moe::get_field(cfg, row);
    if (text.size() + 1 > size)
      fail(MOE_ERR_INVALID_ARGUMENT, "size is %zu, but %s='%s' needs %zu bytes", size, name, text.c_str(),
           text.size() + 1);
    std::memcpy(buf, text.c_str(), text.size() + 1);
  });
}

MOE_API int moe_config_num_presets(void) { return moe::num_presets(); }

MOE_API const char *moe_config_preset_name(int index) {
  const char *name = nullptr;
  moe::call("moe_config_preset_name", [&] { name = checked_preset(index).name; });
  return name;
}

MOE_API const char *moe_config_preset_description(int index) {
  const char *description = nullptr;
  moe::call("moe_config_preset_description", [&] { description = checked_preset(index).description; });
  return description;
}

}  // extern "C"
