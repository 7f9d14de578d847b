"""libmoe.Layer.save / load / from_checkpoint (numpy only): round trips, family layouts, errors."""
import os
import sys

import numpy as np
import pytest

import libmoe
from conftest import randn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import safetensors_np as ST  # noqa: E402  (numpy writer of safetensors files, shared with tests/python)

CFG = dict(d_model=16, d_ff=24, num_experts=4, top_k=2, num_shared_experts=1, shared_gate=1)


def _randomize(layer, seed):
    rng = np.random.default_rng(seed)
    for name, info in layer.param_info().items():
        layer.set_param(name, randn(rng, *info.shape) * 0.3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_save_load_round_trip(tmp_path, dtype):
    a = libmoe.Layer(dtype=dtype, seed=1, **CFG)
    _randomize(a, 3)
    a.save(tmp_path / "m.safetensors", prefix="model.layers.0.mlp")  # os.PathLike accepted
    b = libmoe.Layer(dtype=dtype, seed=2, **CFG)
    assert not np.array_equal(a.get_param("experts.w1"), b.get_param("experts.w1"))
    b.load(str(tmp_path / "m.safetensors"), "model.layers.0.mlp")
    for name in a.param_names:
        np.testing.assert_array_equal(b.get_param(name), a.get_param(name), err_msg=name)
    x = randn(np.random.default_rng(0), 7, 16)
    np.testing.assert_array_equal(b.forward(x), a.forward(x))
    # A directory path saves and loads model.safetensors.
    a.save(tmp_path)
    c = libmoe.Layer.from_checkpoint(tmp_path, dtype=dtype, seed=3, **CFG)
    np.testing.assert_array_equal(c.forward(x), a.forward(x))


def test_family_checkpoint_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    E, d, ff = 4, 16, 24
    gate = randn(rng, E, d)
    w1, w3, w2 = randn(rng, E, ff, d), randn(rng, E, ff, d), randn(rng, E, d, ff)
    t = {"model.layers.2.mlp.gate.weight": ("F32", gate),
         "model.layers.2.mlp.experts.gate_up_proj": ("F32", np.concatenate([w1, w3], axis=1)),
         "model.layers.2.mlp.experts.down_proj": ("F32", w2)}
    ST.write(str(tmp_path / "model.safetensors"), t)
    layer = libmoe.Layer.from_checkpoint(tmp_path, "model.layers.2.mlp", "qwen3-moe", d_model=d, d_ff=ff,
                                         num_experts=E, top_k=2)
    np.testing.assert_array_equal(layer.get_param("experts.w3"), w3)
    np.testing.assert_array_equal(layer.get_param("router.weight"), gate)

    before = layer.state_dict()
    with pytest.raises(libmoe.InvalidArgumentError, match="model.layers.3.mlp.gate.weight"):
        layer.load(tmp_path, "model.layers.3.mlp", "qwen3-moe")
    with pytest.raises(libmoe.InvalidArgumentError, match="switch"):  # plain experts into a gated layer
        layer.load(tmp_path, "model.layers.2.mlp", "switch")
    with pytest.raises(libmoe.InvalidArgumentError, match="unknown family"):
        layer.load(tmp_path, "model.layers.2.mlp", "gpt-5")
    with pytest.raises(libmoe.InvalidArgumentError, match="swiglu_clamped|SWIGLU_CLAMPED"):  # a plain SwiGLU layer
        layer.load(tmp_path, "model.layers.2.mlp", "gpt-oss")
    (tmp_path / "bad.safetensors").write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{\"a\":\"\xff\"}")
    with pytest.raises(libmoe.InvalidArgumentError, match="bad.safetensors") as e:  # not UTF-8: escaped
        layer.load(tmp_path / "bad.safetensors")
    assert "UTF-8" in str(e.value)
    with pytest.raises(libmoe.ArgumentTypeError):
        layer.load(3)
    with pytest.raises(libmoe.ArgumentTypeError):
        layer.load(tmp_path, prefix=5)
    for name, v in before.items():
        np.testing.assert_array_equal(layer.get_param(name), v, err_msg=name)


def test_save_in_a_familys_names(tmp_path):
    """Layer.save(path, prefix, family): the family's names and fused layout, loaded back bit for
    bit; a selection bias mixtral cannot hold is refused and nothing is written."""
    cfg = dict(d_model=16, d_ff=24, num_experts=4, top_k=2)
    a = libmoe.Layer(seed=1, **cfg)
    _randomize(a, 4)
    a.set_param("router.bias", np.zeros(4, np.float32))
    path = tmp_path / "mixtral.safetensors"
    a.save(path, "model.layers.0.mlp", family="mixtral")
    tensors, meta = ST.read(str(path))
    assert meta["producer"] == "libmoe"
    assert {k: v.shape for k, (_, v) in tensors.items()} == {
        "model.layers.0.mlp.gate.weight": (4, 16), "model.layers.0.mlp.experts.gate_up_proj": (4, 48, 16),
        "model.layers.0.mlp.experts.down_proj": (4, 16, 24)}
    np.testing.assert_array_equal(tensors["model.layers.0.mlp.experts.gate_up_proj"][1][:, 24:],
                                  a.get_param("experts.w3"))
    b = libmoe.Layer(seed=2, **cfg)
    b.load(path, "model.layers.0.mlp", "mixtral")
    for name in a.param_names:
        np.testing.assert_array_equal(b.get_param(name), a.get_param(name), err_msg=name)

    before = path.read_bytes()
    a.set_param("router.bias", np.array([0, 0, 0.5, 0], np.float32))
    with pytest.raises(libmoe.InvalidArgumentError, match=r"mixtral.*router\.bias"):
        a.save(path, "model.layers.0.mlp", "mixtral")
    assert path.read_bytes() == before
    with pytest.raises(libmoe.ArgumentTypeError):
        a.save(path, family=3)
    a.save(path, family="libmoe")  # libmoe's names hold it
    b.load(path)
    np.testing.assert_array_equal(b.get_param("router.bias"), a.get_param("router.bias"))
