"""Helpers of the routing suite that talk to libmoe (the reference modules never do)."""
import moe_ctypes as M


def preset(name, **over):
    """moe_config_preset(name), then the given fields."""
    cfg = M.default_config()
    M._call("moe_config_preset", M.C.byref(cfg), name.encode())
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def fields(cfg):
    """A moe_config as keyword fields for moe_ctypes.Layer / oracle_util.make_layer."""
    return {n: getattr(cfg, n) for n, _ in M.moe_config._fields_ if n not in ("struct_size", "comm")}


def preset_fields(name, **over):
    return fields(preset(name, **over))
