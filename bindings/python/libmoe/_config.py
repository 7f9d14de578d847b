"""The layer configuration as Python keywords and dicts, read from libmoe's own table of moe_config
(moe_config_num_fields / moe_config_field / moe_config_set / moe_config_get): the names, types,
enum names and presets are the library's, so a field added to moe.h needs nothing here."""

import numbers
from collections import namedtuple

from . import capi
from .errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["ConfigField", "CONFIG_FIELDS", "PRESETS", "config_fields", "presets", "default_config",
           "preset_config"]

ConfigField = namedtuple("ConfigField", "name type default values description")
ConfigField.__doc__ = ("One moe_config field as the library describes it: type is one of 'int64', 'int', 'bool', "
                       "'float', 'uint64', 'enum', 'pointer'; default its value; values the enum names (else ()).")

_TYPES = {capi.MOE_CONFIG_INT64: "int64", capi.MOE_CONFIG_INT: "int", capi.MOE_CONFIG_BOOL: "bool",
          capi.MOE_CONFIG_FLOAT: "float", capi.MOE_CONFIG_UINT64: "uint64", capi.MOE_CONFIG_ENUM: "enum",
          capi.MOE_CONFIG_POINTER: "pointer"}
_RANGES = {"int64": (-(1 << 63), (1 << 63) - 1), "int": (-(1 << 31), (1 << 31) - 1), "uint64": (0, (1 << 64) - 1)}


def _from_text(type_, text):
    """A field's canonical text as the Python value the dicts hold."""
    if type_ == "bool":
        return text == "true"
    if type_ == "float":
        return float(text)  # the shortest text of the float32: 0.01, not 0.009999999776482582
    if type_ in _RANGES or (type_ == "enum" and text.lstrip("-").isdigit()):  # an enum value without a name
        return int(text)
    return text


def _read_table():
    info = capi.moe_config_field_info()
    fields = {}
    for i in range(capi.moe_config_num_fields()):
        capi.moe_config_field(i, info)
        type_ = _TYPES.get(info.type, "unknown")
        values = tuple(info.value_name(v) for v in range(info.num_values))
        default = info.default_value if type_ == "pointer" else _from_text(type_, info.default_value)
        fields[info.name] = ConfigField(info.name, type_, default, values, info.description)
    return fields


_FIELDS = _read_table()

# The fields a Python caller sets, in header order (struct_size and the comm pointer are not among them).
CONFIG_FIELDS = tuple(name for name, f in _FIELDS.items() if f.type != "pointer")
PRESETS = tuple(capi.moe_config_preset_name(i) for i in range(capi.moe_config_num_presets()))


def config_fields():
    """{name: ConfigField} for every field of moe_config the library describes (comm included)."""
    return dict(_FIELDS)


def presets():
    """{name: one-line description} of every preset the library knows."""
    return {capi.moe_config_preset_name(i): capi.moe_config_preset_description(i)
            for i in range(capi.moe_config_num_presets())}


def enum_name(field, value):
    """The name of C value ``value`` of enum field ``field`` (the value itself when it has none)."""
    names = _FIELDS[field].values
    return names[value] if 0 <= value < len(names) else value


def _set_device(cfg, value):
    """device also takes a torch.device and "cuda:N" (which sets device_index too)."""
    if not isinstance(value, (str, numbers.Integral)) and hasattr(value, "type"):
        value = str(value)  # a torch.device
    if isinstance(value, str) and ":" in value:
        kind, index = value.split(":", 1)
        if not index.isdigit():
            raise InvalidArgumentError(f"device={value!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        _set_field(cfg, "device", kind, special=False)
        cfg.device_index = int(index)
        return
    _set_field(cfg, "device", value, special=False)


def _set_field(cfg, field, value, special=True):
    f = _FIELDS.get(field)
    if f is None:
        raise ArgumentTypeError(f"unknown config field {field!r}; the fields are: {', '.join(CONFIG_FIELDS)}")
    if field == "device" and special:
        return _set_device(cfg, value)
    t = f.type
    if t == "enum":
        if isinstance(value, str):
            capi.moe_config_set(cfg, field, value)  # any case, '-' for '_', the aliases; errors name the values
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            setattr(cfg, field, int(value))  # the pinned C value; moe_layer_create checks the range
        else:
            raise ArgumentTypeError(f"{field} must be a str ({', '.join(repr(k) for k in f.values)}) or an int, "
                                    f"not {type(value).__name__}")
    elif t in _RANGES:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ArgumentTypeError(f"{field} must be an int, not {type(value).__name__}")
        lo, hi = _RANGES[t]
        if not lo <= int(value) <= hi:
            raise InvalidArgumentError(f"{field}={int(value)} is out of range [{lo}, {hi}]")
        setattr(cfg, field, int(value))
    elif t == "float":
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ArgumentTypeError(f"{field} must be a float, not {type(value).__name__}")
        try:
            setattr(cfg, field, float(value))  # rounded to float32 once, as C's (float) does
        except OverflowError:
            raise InvalidArgumentError(f"{field}={float(value)!r} is out of the float32 range") from None
    elif t == "bool":
        if not isinstance(value, (bool, numbers.Integral)):
            raise ArgumentTypeError(f"{field} must be a bool, not {type(value).__name__}")
        setattr(cfg, field, 1 if value else 0)
    else:
        raise ArgumentTypeError(f"{field}: a {t} field, not settable from Python (expert-parallel communicators "
                                f"are not available from Python)")


def make_config(preset, fields):
    """A capi.moe_config: the defaults (or preset), then ``fields`` by name."""
    cfg = capi.moe_config()  # moe_config_init defaults
    if preset is not None:
        if not isinstance(preset, str):
            raise ArgumentTypeError(f"preset must be a str, not {type(preset).__name__}")
        capi.moe_config_preset(cfg, preset)
    for field, value in fields.items():
        _set_field(cfg, field, value)
    return cfg


def config_dict(cfg):
    """Every settable field of a capi.moe_config, read through its canonical text."""
    return {field: _from_text(_FIELDS[field].type, capi.moe_config_get(cfg, field)) for field in CONFIG_FIELDS}


def default_config():
    """The library's defaults (moe_config_init) as a dict; d_model and d_ff are 0 (required)."""
    return config_dict(capi.moe_config())


def preset_config(name):
    """The fields of preset ``name`` (see PRESETS) as a dict; widths are left 0 for the caller."""
    return config_dict(make_config(name, {}))
