// moe-bench's layer flags, their --help lines and --config files, all from libmoe's own table of
// moe_config (moe_config_field, moe_config_set): a field added to moe.h is a flag here with no
// change to the bench.
#pragma once
#include <cstdio>
#include <string>

#include <moe/moe.h>

namespace moe_bench {

// The moe_config field that flag sets: "--top-k" or "--top_k" for top_k, or one of the older
// spellings ("--experts", "--capacity", "--aux", ...); "" when the flag is not a field's.
std::string field_of_flag(const std::string &flag);

// Sets field of cfg from its text; on a bad value exits with where ("--dtype", "small.cfg:3")
// and libmoe's message, which names the field and what it accepts.
void set_field(moe_config &cfg, const std::string &field, const std::string &value, const std::string &where);

// Applies a configuration file: one "name = value" per line (name a moe_config field), '#' starts
// a comment, blank lines are skipped. Exits naming the file and line of the first bad one.
void read_config_file(moe_config &cfg, const std::string &path);

// The --help lines of every field (flag, values, description, default) and of every preset.
void print_field_help(FILE *f);

// {"name": "text", ...}: every field of cfg in its canonical text, as JSON.
std::string fields_json(const moe_config &cfg);

}  // namespace moe_bench
