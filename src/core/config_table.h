// The one description of moe_config: a row per field (name, type, place, default, allowed values,
// description) and a row per preset. moe_config_init, moe_config_preset, the validation of
// moe_layer_create's enums and floats, and moe_config_field/_set/_get all read these tables.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

#include "moe/moe.h"

namespace moe {

struct EnumAlias {
  const char *alias;  // another spelling that moe_config_set reads
  int value;
};

struct EnumNames {
  const char *c_type;              // "moe_activation", for messages
  const char *const *names;        // names[v]: the canonical name of C value v
  int count;
  const EnumAlias *aliases;        // may be NULL
  int num_aliases;
};

struct FieldRow {
  const char *name;
  moe_config_type type;
  size_t offset, size;
  const char *default_value;  // canonical text
  const EnumNames *values;    // MOE_CONFIG_ENUM only
  const char *description;
};

struct PresetRow {
  const char *name;
  const char *description;
  const char *settings;  // "name=value name=value ...", applied over the defaults
};

int num_fields();
const FieldRow &field_row(int index);
// NULL when moe_config has no field of that (exact) name.
const FieldRow *find_field(std::string_view name);

int num_presets();
const PresetRow &preset_row(int index);

// Parses text into row's field of *cfg; on failure throws moe::Error (MOE_ERR_INVALID_ARGUMENT)
// naming the field, the text and what is allowed, and leaves *cfg unchanged. Does not check
// cfg->struct_size (the API layer does).
void set_field(moe_config *cfg, const FieldRow &row, std::string_view text);

// The canonical text of row's field of *cfg.
std::string get_field(const moe_config *cfg, const FieldRow &row);

// Writes every field's default over *cfg (the rest of *cfg is left as it is).
void apply_field_defaults(moe_config *cfg);

// "name" or "name (a, b, c)": every field name, for messages.
std::string field_names();

}  // namespace moe
