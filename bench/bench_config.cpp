#include "bench_config.h"

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include "bench_device.h"

namespace moe_bench {
namespace {

// Flags of moe-bench before its flags came from the table, kept working.
struct OldFlag {
  const char *flag, *field;
};
constexpr OldFlag kOldFlags[] = {
    {"--experts", "num_experts"},        {"--normalize", "normalize_topk"}, {"--groups", "num_groups"},
    {"--capacity", "capacity_factor"},   {"--aux", "aux_loss_coef"},       {"--z-loss", "z_loss_coef"},
    {"--importance", "importance_loss_coef"}, {"--load-loss", "load_loss_coef"},
    {"--bias-update", "bias_update_rate"}, {"--shared", "num_shared_experts"}, {"--tf32", "allow_tf32"},
};

std::vector<moe_config_field_info> fields() {
  std::vector<moe_config_field_info> out;
  for (int i = 0; i < moe_config_num_fields(); ++i) {
    moe_config_field_info f{};
    f.struct_size = sizeof f;
    check(moe_config_field(i, &f), "moe_config_field");
    if (f.type != MOE_CONFIG_POINTER) out.push_back(f);
  }
  return out;
}

std::string flag_of(const char *field) {
  std::string flag = std::string("--") + field;
  std::replace(flag.begin(), flag.end(), '_', '-');
  return flag;
}

std::string trim(const std::string &s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::string get(const moe_config &cfg, const char *field) {
  char buf[MOE_CONFIG_VALUE_MAX];
  check(moe_config_get(&cfg, field, buf, sizeof buf), "moe_config_get");
  return buf;
}

}  // namespace

std::string field_of_flag(const std::string &flag) {
  for (const OldFlag &o : kOldFlags)
    if (flag == o.flag) return o.field;
  for (const moe_config_field_info &f : fields())
    if (flag == flag_of(f.name) || flag == std::string("--") + f.name) return f.name;
  return "";
}

void set_field(moe_config &cfg, const std::string &field, const std::string &value, const std::string &where) {
  if (moe_config_set(&cfg, field.c_str(), value.c_str()) != MOE_OK)
    die("%s: %s", where.c_str(), moe_last_error());
}

void read_config_file(moe_config &cfg, const std::string &path) {
  std::ifstream in(path);
  if (!in) die("--config %s: cannot open the file", path.c_str());
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const std::string where = path + ":" + std::to_string(number);
    line = trim(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) die("%s: expected 'name = value', got '%s'", where.c_str(), line.c_str());
    set_field(cfg, trim(line.substr(0, eq)), trim(line.substr(eq + 1)), where);
  }
  if (in.bad()) die("--config %s: read error", path.c_str());
}

void print_field_help(FILE *out) {
  for (const moe_config_field_info &f : fields()) {
    std::string value = "N";
    if (f.type == MOE_CONFIG_FLOAT) value = "F";
    if (f.type == MOE_CONFIG_BOOL) value = "true|false";
    if (f.type == MOE_CONFIG_ENUM) {
      value.clear();
      for (int v = 0; v < f.num_values; ++v) {
        if (v) value += '|';
        value += f.value_names[v];
      }
    }
    const std::string flag = flag_of(f.name) + " " + value;
    std::fprintf(out, "  %-34s %s (default %s)\n", flag.c_str(), f.description, f.default_value);
  }
  std::fprintf(out, "  older spellings:");
  for (const OldFlag &o : kOldFlags) std::fprintf(out, " %s (%s)", o.flag, flag_of(o.field).c_str());
  std::fprintf(out, "\npresets (--preset NAME):\n");
  for (int i = 0; i < moe_config_num_presets(); ++i)
    std::fprintf(out, "  %-15s %s\n", moe_config_preset_name(i), moe_config_preset_description(i));
}

std::string fields_json(const moe_config &cfg) {
  std::string out = "{";
  for (const moe_config_field_info &f : fields()) {
    const std::string v = get(cfg, f.name);
    const bool number = f.type != MOE_CONFIG_ENUM;  // numbers and true/false are JSON as they are
    out += (out.size() > 1 ? ", \"" : "\"") + std::string(f.name) + "\": " + (number ? v : "\"" + v + "\"");
  }
  return out + "}";
}

}  // namespace moe_bench
