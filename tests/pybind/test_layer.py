"""libmoe.Layer / Context / capi: the numpy API (no torch needed)."""

import pickle

import numpy as np
import pytest

import libmoe
from libmoe import capi
from conftest import SMALL, randn


def test_versions_and_names():
    assert libmoe.library_version() == libmoe.__version__
    assert libmoe.status_name(1) == "MOE_ERR_INVALID_ARGUMENT"
    assert libmoe.status_name(99) == "MOE_ERR_UNKNOWN"
    assert capi.MOE_OK == 0 and capi.MOE_ACT_SILU == 4 and capi.MOE_DTYPE_F16 == 2  # pinned values


def test_default_config_matches_header():
    c = libmoe.default_config()
    assert c["num_experts"] == 8 and c["top_k"] == 2 and c["activation"] == "swiglu"
    assert c["normalize_topk"] is True and c["capacity_factor"] == 0.0 and c["aux_loss_coef"] == 0.01
    assert c["device"] == "cpu" and c["dtype"] == "float32" and c["d_model"] == 0
    assert set(c) == set(libmoe.CONFIG_FIELDS)


@pytest.mark.parametrize("name", libmoe.PRESETS)
def test_presets(name):
    cfg = libmoe.preset_config(name)
    assert cfg["d_model"] == 0 and cfg["d_ff"] == 0
    layer = libmoe.Layer.from_preset(name, d_model=8, d_ff=16)
    got = layer.config
    for field in ("num_experts", "top_k", "activation", "routing", "score", "noise", "aux_loss_coef"):
        assert got[field] == cfg[field], field
    assert libmoe.Layer(preset=name, d_model=8, d_ff=16, top_k=1).top_k == 1  # fields override the preset
    x = randn(np.random.default_rng(0), 12, 8)
    ctx = layer.context()
    y = layer.forward(x, ctx)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert np.isfinite(layer.backward(ctx, np.ones_like(y))).all()


def test_config_roundtrip_and_enums():
    layer = libmoe.Layer(d_model=8, d_ff=16, activation="GeGLU", score="sigmoid", drop_policy="probs",
                         capacity_factor=1.5, dtype="f32", device="cpu", check_finite=True, seed=2**64 - 1)
    c = layer.config
    assert (c["activation"], c["score"], c["drop_policy"], c["dtype"]) == ("geglu", "sigmoid", "probs", "float32")
    assert c["check_finite"] is True and c["seed"] == 2**64 - 1 and c["capacity_factor"] == 1.5
    twin = libmoe.Layer(**c)
    for name in layer.param_names:
        np.testing.assert_array_equal(twin.get_param(name), layer.get_param(name))
    assert libmoe.Layer(d_model=8, d_ff=16, activation=capi.MOE_ACT_RELU).config["activation"] == "relu"


def test_params_layout(layer):
    info = layer.param_info()
    E, d, ff = SMALL["num_experts"], SMALL["d_model"], SMALL["d_ff"]
    assert info["router.weight"].shape == (E, d) and info["router.bias"].shape == (E,)
    assert info["experts.w1"].shape == (E, ff, d) and info["experts.w2"].shape == (E, d, ff)
    assert not info["router.bias"].trainable and info["experts.w3"].trainable
    w = layer.get_param("router.weight")
    bound = 1 / np.sqrt(d)
    assert w.dtype == np.float32 and np.abs(w).max() <= bound and np.abs(w).max() > bound / 2
    assert not layer.get_param("router.bias").any()


def test_forward_deterministic_and_training_equals_inference(layer, rng):
    x = randn(rng, 33, 16)
    y1, y2 = layer.forward(x), layer(x)
    np.testing.assert_array_equal(y1, y2)
    ctx = layer.context()
    np.testing.assert_array_equal(layer.forward(x, ctx), y1)  # no noise: training == inference
    out = np.full_like(x, 7.0)
    assert layer.forward(x, out=out) is out
    np.testing.assert_array_equal(out, y1)


def test_zero_tokens(layer):
    y = layer.forward(np.empty((0, 16), np.float32))
    assert y.shape == (0, 16)
    ctx = layer.context()
    layer.forward(np.empty((0, 16), np.float32), ctx)
    assert ctx.stats()["num_tokens"] == 0
    assert layer.backward(ctx, np.empty((0, 16), np.float32)).shape == (0, 16)


def test_backward_accumulates_and_zero_grad(layer, rng):
    x, dy = randn(rng, 20, 16), randn(rng, 20, 16)
    ctx = layer.context()
    layer.forward(x, ctx)
    dx1 = layer.backward(ctx, dy)
    g1 = {n: layer.get_grad(n) for n in layer.param_names if n != "router.bias"}
    dx2 = layer.backward(ctx, dy)  # allowed again: gradients accumulate again
    np.testing.assert_array_equal(dx1, dx2)
    for n, g in g1.items():
        np.testing.assert_allclose(layer.get_grad(n), 2 * g, rtol=1e-6, atol=1e-7)
    assert layer.backward(ctx, dy, need_dx=False) is None
    layer.zero_grad()
    for n in g1:
        assert not layer.get_grad(n).any()


def test_stats_counts_topk_assignments(rng):
    layer = libmoe.Layer(d_model=16, d_ff=8, num_experts=4, top_k=2, capacity_factor=0.5, seed=1)
    T = 64
    ctx = layer.context()
    layer.forward(randn(rng, T, 16), ctx)
    s = ctx.stats()
    assert set(s) == {"num_tokens", "num_slots", "dropped_slots", "load_balance_loss", "z_loss", "importance_loss",
                      "load_loss", "aux_loss_total", "load_cv", "max_load_ratio"}
    assert s["num_tokens"] == T and s["num_slots"] == T * 2
    counts = ctx.expert_counts()
    assert counts.dtype == np.int64 and counts.shape == (4,)
    assert counts.sum() == T * 2 - s["dropped_slots"] and counts.max() <= 16  # C = ceil(0.5*64*2/4)
    assert s["dropped_slots"] > 0
    assert ctx.aux_loss == pytest.approx(0.01 * s["load_balance_loss"], rel=1e-6)
    ids, w = ctx.topk()
    assert ids.shape == (T, 2) and w.shape == (T, 2) and ids.dtype == np.int32
    assert ((ids == -1) == (w == 0)).all() and (ids >= -1).all() and (ids < 4).all()
    assert (ids == -1).sum() == s["dropped_slots"]
    token, expert, weight = ctx.assignments()
    assert len(token) == counts.sum() and np.array_equal(np.bincount(expert, minlength=4), counts)
    assert np.all(np.diff(expert) >= 0)  # ordered by expert
    kept = {(int(t), int(e)): float(v) for t, e, v in zip(token, expert, weight)}
    for t in range(T):
        for j in range(2):
            if ids[t, j] >= 0:
                assert kept[(t, int(ids[t, j]))] == pytest.approx(float(w[t, j]))


def test_route_matches_forward_and_cannot_backward(layer, rng):
    x = randn(rng, 30, 16)
    routed = layer.route(x)
    trained = layer.context()
    layer.forward(x, trained)
    assert routed.stats() == trained.stats()
    np.testing.assert_array_equal(routed.topk()[0], trained.topk()[0])
    with pytest.raises(libmoe.StateError, match="Layer.route"):
        layer.backward(routed, np.zeros_like(x))
    assert layer.route(x, routed) is routed  # reuse


def test_context_reuse_and_repr(layer, rng):
    ctx = layer.context()
    assert ctx.num_tokens is None and "empty" in repr(ctx)
    for T in (5, 50, 7):
        layer.forward(randn(rng, T, 16), ctx)
        assert ctx.num_tokens == T and ctx.stats()["num_tokens"] == T
        assert layer.backward(ctx, randn(rng, T, 16)).shape == (T, 16)
    assert "Layer d_model=16" in repr(layer)


def test_set_get_param_and_state_dict(layer, rng):
    x = randn(rng, 10, 16)
    y0 = layer.forward(x)
    state = layer.state_dict()
    assert list(state) == layer.param_names
    w2 = randn(rng, 4, 16, 32)
    layer.set_param("experts.w2", w2)
    np.testing.assert_array_equal(layer.get_param("experts.w2"), w2)
    assert not np.array_equal(layer.forward(x), y0)
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.forward(x), y0)


def test_zero_copy_views(rng):
    layer = libmoe.Layer(**SMALL)
    v = layer.param_view("experts.w1")
    addr = layer.buffer_addresses("experts.w1")[0]
    assert v.__array_interface__["data"][0] == addr and not v.flags.owndata and v.flags.writeable
    v[0, 0, 0] = 42.0
    assert layer.get_param("experts.w1")[0, 0, 0] == 42.0
    g = layer.grad_view("experts.w1")
    ctx = layer.context()
    layer.forward(randn(rng, 9, 16), ctx)
    layer.backward(ctx, randn(rng, 9, 16))
    np.testing.assert_array_equal(g, layer.get_grad("experts.w1"))
    with pytest.raises(ValueError, match="not trainable"):
        layer.grad_view("router.bias")
    del ctx
    layer.close()  # the view keeps the storage alive
    assert v[0, 0, 0] == 42.0 and np.isfinite(g).all()


def test_close_lifetime(rng):
    layer = libmoe.Layer(**SMALL)
    ctx = layer.context()
    x = randn(rng, 4, 16)
    layer.forward(x, ctx)
    layer.close()
    layer.close()  # idempotent
    assert layer.closed and "closed" in repr(layer)
    with pytest.raises(ValueError, match="closed"):
        layer.forward(x)
    assert ctx.stats()["num_tokens"] == 4  # the context still holds the layer
    ctx.close()
    with pytest.raises(ValueError, match="closed"):
        ctx.stats()
    with libmoe.Layer(**SMALL) as lay2:
        with lay2.context() as c2:
            lay2.forward(x, c2)
        assert c2.closed
    assert lay2.closed


def test_pickle_roundtrip(layer, rng):
    x = randn(rng, 8, 16)
    layer.set_param("router.bias", randn(rng, 4))
    twin = pickle.loads(pickle.dumps(layer))
    assert twin.config == layer.config
    np.testing.assert_array_equal(twin.forward(x), layer.forward(x))
    np.testing.assert_array_equal(twin.get_param("router.bias"), layer.get_param("router.bias"))


def test_bias_update_rule(rng):
    u = 0.125
    layer = libmoe.Layer(d_model=16, d_ff=8, num_experts=4, top_k=1, bias_update_rate=u, seed=3)
    ctx = layer.context()
    layer.forward(randn(rng, 40, 16), ctx)
    counts = ctx.expert_counts()  # dropless: kept == routed
    expected = u * np.sign(counts.mean() - counts)
    np.testing.assert_allclose(layer.get_param("router.bias"), expected.astype(np.float32))
    before = layer.get_param("router.bias")
    layer.forward(randn(rng, 40, 16))  # inference: no update
    np.testing.assert_array_equal(layer.get_param("router.bias"), before)


def test_check_finite_leaves_layer_usable(rng):
    layer = libmoe.Layer(**SMALL, check_finite=True)
    x = randn(rng, 6, 16)
    y = layer.forward(x)
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(libmoe.NonFiniteError, match=r"x\[3\]\[5\]") as info:
        layer.forward(bad)
    assert isinstance(info.value, ValueError) and info.value.status == "MOE_ERR_NONFINITE"
    np.testing.assert_array_equal(layer.forward(x), y)


def test_capi_is_the_c_api(rng):
    cfg = capi.moe_config()
    assert cfg.struct_size > 0 and cfg.num_experts == 8  # initialised by moe_config_init
    cfg.d_model, cfg.d_ff = 16, 32
    ptr = capi.moe_layer_create(cfg)
    try:
        assert capi.moe_layer_num_params(ptr) == 5
        data, grad = capi.moe_layer_param_buffers(ptr, "router.bias")
        assert isinstance(data, int) and grad is None
        x = randn(rng, 3, 16)
        y = np.empty_like(x)
        assert capi.moe_forward(ptr, x.ctypes.data, 3, y.ctypes.data, None) is None  # MOE_OK -> None
        ctx = capi.moe_context_create(ptr)
        capi.moe_route(ptr, x.ctypes.data, 3, ctx)
        assert capi.moe_context_assignments(ctx, 0, None, None, None) == 6
        st = capi.moe_stats()
        capi.moe_context_stats(ctx, st)
        assert st.num_tokens == 3
        capi.moe_context_destroy(ctx)
        info = capi.moe_param_info()
        capi.moe_layer_param_info(ptr, 2, info)
        assert info.name == "experts.w1" and [info.dim(i) for i in range(3)] == [8, 32, 16]
        assert libmoe.Layer(d_model=16, d_ff=32).forward(x).tobytes() == y.tobytes()
    finally:
        capi.moe_layer_destroy(ptr)
