"""The configuration comes from libmoe's table of moe_config: every field the C table reports is
settable by name, keeps its type in the dicts, and reads back exactly."""

import numpy as np
import pytest

import libmoe
from libmoe import capi
from libmoe._config import config_dict, make_config


def _other_value(f):
    """A valid value of field f other than its default, of the Python type Layer(**config) takes."""
    if f.type == "enum":
        return f.values[-1] if f.default != f.values[-1] else f.values[0]
    if f.type == "bool":
        return not f.default
    if f.type == "float":
        return f.default + 0.375
    return f.default + 3  # int64, int, uint64


def test_the_fields_are_the_c_tables():
    fields = libmoe.config_fields()
    n = capi.moe_config_num_fields()
    assert len(fields) == n and n > 20
    info = capi.moe_config_field_info()
    for i, (name, f) in enumerate(fields.items()):
        capi.moe_config_field(i, info)
        assert name == f.name == info.name
        assert f.description and "\n" not in f.description
        assert (f.type == "enum") == bool(f.values)
    assert libmoe.CONFIG_FIELDS == tuple(name for name, f in fields.items() if f.type != "pointer")
    assert "comm" in fields and "comm" not in libmoe.CONFIG_FIELDS
    assert fields["dtype"].values == ("float32", "bfloat16", "float16")
    assert fields["activation"].values == ("swiglu", "geglu", "relu", "gelu", "silu", "swiglu_clamped")
    assert {f.type for f in fields.values()} == {"int64", "int", "bool", "float", "uint64", "enum", "pointer"}


def test_defaults_are_the_tables():
    defaults = libmoe.default_config()
    fields = libmoe.config_fields()
    for name in libmoe.CONFIG_FIELDS:
        assert defaults[name] == fields[name].default, name
        assert type(defaults[name]) is type(fields[name].default), name


@pytest.mark.parametrize("name", libmoe.CONFIG_FIELDS)
def test_every_field_is_settable_by_name(name):
    f = libmoe.config_fields()[name]
    value = _other_value(f)
    got = config_dict(make_config(None, {name: value}))
    assert got[name] == value and type(got[name]) is type(value)
    others = {k: v for k, v in got.items() if k != name and not (name == "device" and k == "device_index")}
    assert others == {k: v for k, v in libmoe.default_config().items() if k in others}, "only that field changed"


def test_a_layer_takes_the_fields_by_keyword():
    """Fields that can change together on a CPU layer, all at once, through Layer(**config)."""
    config = dict(d_model=8, d_ff=16, num_experts=4, top_k=2, activation="gelu", routing="token_choice",
                  score="sigmoid", normalize_topk=False, routed_scale=1.5, num_groups=2, topk_groups=2,
                  capacity_factor=2.0, drop_policy="probs", noise="gaussian", noise_eps=0.25, aux_loss_coef=0.125,
                  z_loss_coef=0.001, importance_loss_coef=0.01, load_loss_coef=0.01, bias_update_rate=0.001,
                  num_shared_experts=1, d_ff_shared=8, shared_gate=True, device="cpu", device_index=0,
                  dtype="bfloat16", allow_tf32=True, seed=2**64 - 1, check_finite=True)
    assert set(config) <= set(libmoe.CONFIG_FIELDS)
    layer = libmoe.Layer(**config)
    got = layer.config
    assert {k: got[k] for k in config} == config
    assert libmoe.Layer(**got).config == got


def test_enum_spellings_and_aliases():
    for given, want in (("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp32", "float32"), ("f32", "float32"),
                        ("half", "float16"), ("fp16", "float16"), ("f16", "float16")):
        assert libmoe.Layer(d_model=8, d_ff=16, dtype=given).dtype == want
    assert libmoe.Layer(d_model=8, d_ff=16, routing="expert-choice", capacity_factor=1.0).config["routing"] == \
        "expert_choice"
    assert libmoe.Layer(d_model=8, d_ff=16, activation=" SiLU ").config["activation"] == "silu"
    assert libmoe.Layer(d_model=8, d_ff=16, device="cpu:0").device == "cpu"


def test_floats_read_back_as_the_shortest_float32_text():
    rng = np.random.default_rng(5)
    for v in list(rng.standard_normal(200)) + [0.01, 1e-5, 0.1, 2.5, 1e-38, 3.0e38]:
        got = config_dict(make_config(None, {"routed_scale": float(v)}))["routed_scale"]
        assert got == float(str(np.float32(v))), v  # numpy 1 and 2 both print the shortest text in str()
        assert np.float32(got) == np.float32(v)
    assert libmoe.preset_config("switch")["z_loss_coef"] == 0.001
    assert libmoe.preset_config("deepseek-v3")["aux_loss_coef"] == 0.0001


def test_presets_are_the_tables():
    presets = libmoe.presets()
    assert tuple(presets) == libmoe.PRESETS == tuple(capi.moe_config_preset_name(i)
                                                     for i in range(capi.moe_config_num_presets()))
    assert all(len(d) > 20 for d in presets.values())
    assert {"mixtral", "switch", "deepseek-v3"} <= set(presets)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(aux_loss_coef=1e300), libmoe.InvalidArgumentError, "aux_loss_coef=1e\\+300 is out of the float32 range"),
    (dict(dtype="f64"), libmoe.InvalidArgumentError, "dtype='f64' is not one of 'float32', 'bfloat16', 'float16'"),
    (dict(routing="sideways"), libmoe.InvalidArgumentError, "'token_choice', 'expert_choice'"),
    (dict(device_index=2**31), libmoe.InvalidArgumentError, "device_index=2147483648 is out of range"),
    (dict(seed=2**64), libmoe.InvalidArgumentError, "seed=18446744073709551616 is out of range"),
])
def test_bad_values_name_the_field_and_what_it_takes(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        libmoe.Layer(d_model=8, d_ff=16, **kwargs)


def test_capi_set_and_get_by_name():
    cfg = capi.moe_config()
    capi.moe_config_set(cfg, "dtype", "bf16")
    assert capi.moe_config_get(cfg, "dtype") == "bfloat16" and cfg.dtype == capi.MOE_DTYPE_BF16
    capi.moe_config_set(cfg, "aux_loss_coef", "0.02")
    assert capi.moe_config_get(cfg, "aux_loss_coef") == "0.02"
    before = capi.moe_config_get(cfg, "top_k")
    with pytest.raises(libmoe.InvalidArgumentError, match="top_k='x' is not a decimal integer"):
        capi.moe_config_set(cfg, "top_k", "x")
    assert capi.moe_config_get(cfg, "top_k") == before
    with pytest.raises(libmoe.InvalidArgumentError, match="no field 'topk'"):
        capi.moe_config_get(cfg, "topk")
