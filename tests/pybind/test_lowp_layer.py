"""libmoe.Layer with dtype="bfloat16" / "float16" (numpy, no torch): the bfloat16 conversions,
parameter dtypes and zero-copy views, float32 and native activations, copies and serialisation."""

import pickle

import numpy as np
import pytest

import libmoe
from conftest import randn

LOWP = ("bfloat16", "float16")
CFG = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, seed=5, num_shared_experts=1, shared_gate=True)
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def make(dtype, **kw):
    cfg = dict(CFG, dtype=dtype)
    cfg.update(kw)
    return libmoe.Layer(**cfg)


def native(a, dtype):
    """float32 a in the layer's own activation format."""
    return libmoe.to_bfloat16_bits(a) if dtype == "bfloat16" else a.astype(np.float16)


def as_f32(a):
    return libmoe.from_bfloat16_bits(a) if a.dtype == np.uint16 else a.astype(np.float32)


def rounded(a, dtype):
    return as_f32(native(a, dtype))


# ---- bfloat16 conversions -------------------------------------------------------------------------
def test_bfloat16_bits_known_values():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # bfloat16 spacing at 1
    cases = [
        (1.0, 0x3F80), (-2.0, 0xC000), (0.0, 0x0000), (-0.0, 0x8000),
        (one + ulp / 2, 0x3F80),                 # a tie goes to the even neighbour (down) ...
        (one + 3 * ulp / 2, 0x3F82),             # ... or up
        (one + ulp / 2 + np.float32(2.0 ** -20), 0x3F81),  # just above a tie: up
        (one + ulp / 2 - np.float32(2.0 ** -20), 0x3F80),  # just below: down
        (np.inf, 0x7F80), (-np.inf, 0xFF80),
        (np.finfo(np.float32).max, 0x7F80),      # above the largest bfloat16 + half a step: inf
        (3.3895314e38, 0x7F7F),                  # the largest bfloat16 stays finite
        (1e-40, 0x0001),                         # subnormal float32 -> subnormal bfloat16 (nearest)
    ]
    x = np.array([c[0] for c in cases], dtype=np.float32)
    got = libmoe.to_bfloat16_bits(x)
    assert got.dtype == np.uint16 and got.shape == x.shape
    assert [hex(v) for v in got] == [hex(c[1]) for c in cases]
    nan = libmoe.to_bfloat16_bits(np.array([np.nan, -np.nan, np.float32(np.nan) * -1], np.float32))
    assert np.isnan(libmoe.from_bfloat16_bits(nan)).all()
    # a NaN whose payload would round into the exponent stays NaN
    payload = np.array([0x7FFFFFFF, 0x7F80FFFF, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.isnan(libmoe.from_bfloat16_bits(libmoe.to_bfloat16_bits(payload))).all()
    assert libmoe.to_bfloat16_bits(np.float32(1.5)).shape == ()  # shapes are kept, 0-d included


def test_bfloat16_bits_round_to_nearest_even_at_random():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32)
    bits &= np.uint32(0xBFFFFFFF)  # exponent below 128: no overflow in this check
    x = bits.view(np.float32)
    got = libmoe.to_bfloat16_bits(x)
    # The two bfloat16 neighbours of |x| (truncation, and one step up), compared exactly in float64.
    lo = (bits >> 16).astype(np.uint16)
    hi = lo + np.uint16(1)
    xd = np.abs(x.astype(np.float64))
    dlo = xd - np.abs(libmoe.from_bfloat16_bits(lo).astype(np.float64))
    dhi = np.abs(libmoe.from_bfloat16_bits(hi).astype(np.float64)) - xd
    want = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo & 1, hi, lo)))
    assert np.array_equal(got, want)
    # exact round trip of every bfloat16 value
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = libmoe.from_bfloat16_bits(every)
    finite = ~np.isnan(f)
    assert np.array_equal(libmoe.to_bfloat16_bits(f)[finite], every[finite])
    with pytest.raises(TypeError, match="uint16"):
        libmoe.from_bfloat16_bits(np.zeros(3, np.int32))


# ---- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
def test_param_dtypes_and_views(dtype, rng):
    layer = make(dtype)
    assert layer.dtype == dtype and layer.config["dtype"] == dtype
    expected = {n: dtype if n.startswith("experts.") or n in ("shared.w1", "shared.w3", "shared.w2") else "float32"
                for n in layer.param_names}
    assert {n: layer.param_dtype(n) for n in layer.param_names} == expected
    assert expected["router.weight"] == "float32" and expected["shared.gate"] == "float32"
    ctx = layer.context()
    layer.forward(randn(rng, 11, 16), ctx)
    layer.backward(ctx, randn(rng, 11, 16))
    for name, info in layer.param_info().items():
        v = layer.param_view(name)
        assert v.dtype == STORAGE[expected[name]] and v.shape == info.shape, name
        assert v.__array_interface__["data"][0] == layer.buffer_addresses(name)[0]
        np.testing.assert_array_equal(as_f32(v), layer.get_param(name), err_msg=name)
        if info.trainable:
            g = layer.grad_view(name)
            assert g.dtype == v.dtype and g.__array_interface__["data"][0] == layer.buffer_addresses(name)[1]
            assert np.abs(as_f32(g)).max() > 0, name
            np.testing.assert_array_equal(as_f32(g), layer.get_grad(name), err_msg=name)
    # writing through a view writes the layer's storage
    v = layer.param_view("experts.w2")
    v[1, 2, 3] = native(np.float32(0.375), dtype)
    assert layer.get_param("experts.w2")[1, 2, 3] == 0.375
    with pytest.raises(libmoe.InvalidArgumentError, match="no_such"):
        layer.param_dtype("no_such")


@pytest.mark.parametrize("dtype", LOWP)
def test_set_param_rounds_to_nearest_even(dtype, rng):
    layer = make(dtype)
    w = randn(rng, 4, 32, 16)
    layer.set_param("experts.w1", w)
    got = layer.get_param("experts.w1")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rounded(w, dtype))
    assert not np.array_equal(got, w)  # really rounded
    r = randn(rng, 4, 16)
    layer.set_param("router.weight", r)  # float32 storage: exact
    np.testing.assert_array_equal(layer.get_param("router.weight"), r)


# ---- activations -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
def test_float32_and_native_activations_agree(dtype, rng):
    layer = make(dtype)
    T = 13
    x, dy = randn(rng, T, 16), randn(rng, T, 16)
    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    assert y.dtype == np.float32 and dx.dtype == np.float32 and y.shape == dx.shape == (T, 16)
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    # y and dx are values of the layer's dtype, converted exactly
    np.testing.assert_array_equal(rounded(y, dtype), y)
    np.testing.assert_array_equal(rounded(dx, dtype), dx)
    g = layer.get_grad("experts.w1")

    # the native format: no conversion, the same bits (the library is deterministic)
    layer.zero_grad()
    xn, dyn = native(x, dtype), native(dy, dtype)
    ctx2 = layer.context()
    yn = layer.forward(xn, ctx2)
    dxn = layer.backward(ctx2, dyn)
    assert yn.dtype == xn.dtype == STORAGE[dtype] and dxn.dtype == xn.dtype
    np.testing.assert_array_equal(as_f32(yn), y)
    np.testing.assert_array_equal(as_f32(dxn), dx)
    np.testing.assert_array_equal(layer.get_grad("experts.w1"), g)
    # float32 x that already holds dtype values gives the same as the rounded x
    np.testing.assert_array_equal(layer.forward(rounded(x, dtype)), y)

    # route: the same decisions from either format
    ids, w = layer.route(x).topk()
    ids_n, w_n = layer.route(xn).topk()
    np.testing.assert_array_equal(ids, ids_n)
    np.testing.assert_array_equal(w, w_n)

    # out= takes the dtype of x (resp. dy)
    out = np.full((T, 16), np.nan, np.float32)
    assert layer.forward(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    out_n = np.zeros_like(xn)
    assert layer.forward(xn, out=out_n) is out_n
    np.testing.assert_array_equal(out_n, yn)
    with pytest.raises(TypeError, match=f"out has dtype {xn.dtype}, expected float32 \\(the dtype of x\\)"):
        layer.forward(x, out=np.zeros_like(xn))
    ctx3 = layer.context()
    layer.forward(x, ctx3)
    out = np.zeros((T, 16), np.float32)
    assert layer.backward(ctx3, dy, out=out) is out
    np.testing.assert_array_equal(out, dx)
    with pytest.raises(TypeError, match="the dtype of dy"):
        layer.backward(ctx3, dyn, out=np.zeros((T, 16), np.float32))
    assert layer.backward(ctx3, dyn, need_dx=False) is None
    assert layer.forward(np.zeros((0, 16), np.float32)).shape == (0, 16)


@pytest.mark.parametrize("dtype, wrong, match", [
    ("bfloat16", np.float16, "x has dtype float16, expected float32 or uint16 \\(bfloat16 bits\\)"),
    ("bfloat16", np.float64, "x has dtype float64, expected float32 or uint16"),
    ("bfloat16", np.int16, "x has dtype int16"),
    ("float16", np.uint16, "x has dtype uint16, expected float32 or float16"),
    ("float16", ">f2", "x has dtype >f2"),
])
def test_wrong_activation_dtype(dtype, wrong, match, rng):
    layer = make(dtype)
    x = randn(rng, 5, 16)
    with pytest.raises(TypeError, match=match):
        layer.forward(x.astype(wrong))
    with pytest.raises(TypeError, match=match):
        layer.route(x.astype(wrong))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray of float32 or"):
        layer.forward({"x": x})
    np.testing.assert_array_equal(layer.forward(x.tolist()), layer.forward(x))  # lists become float32
    ctx = layer.context()
    layer.forward(x, ctx)
    with pytest.raises(TypeError, match=match.replace("x has", "dy has")):
        layer.backward(ctx, x.astype(wrong))
    assert np.isfinite(layer.backward(ctx, x)).all()  # still usable


def test_float16_overflow_is_refused_by_check_finite(rng):
    layer = make("float16", check_finite=True)
    x = randn(rng, 4, 16)
    y = layer.forward(x)
    big = x.copy()
    big[2, 7] = 1e6  # not a float16: becomes inf on the way in
    with pytest.raises(libmoe.NonFiniteError, match=r"x\[2\]\[7\]"):
        layer.forward(big)
    np.testing.assert_array_equal(layer.forward(x), y)


# ---- copies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
def test_state_dict_and_pickle(dtype, rng):
    layer = make(dtype)
    layer.set_param("router.bias", randn(rng, 4))
    x = randn(rng, 9, 16)
    y = layer.forward(x)
    state = layer.state_dict()
    assert all(v.dtype == np.float32 for v in state.values())
    other = make(dtype, seed=77)
    assert not np.array_equal(other.forward(x), y)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.forward(x), y)
    twin = pickle.loads(pickle.dumps(layer))
    assert twin.dtype == dtype and twin.config == layer.config
    for name in layer.param_names:
        np.testing.assert_array_equal(twin.param_view(name), layer.param_view(name))
    np.testing.assert_array_equal(twin.forward(x), y)


@pytest.mark.parametrize("dtype", LOWP)
def test_device_interface_typestr(dtype, monkeypatch):
    # What a CUDA layer would hand to torch/CuPy: the same descriptor over the same addresses.
    layer = make(dtype)
    monkeypatch.setitem(layer._config, "device", "cuda")
    want = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
    for name, info in layer.param_info().items():
        cai = layer.cuda_array_interface(name).__cuda_array_interface__
        assert cai["typestr"] == want[layer.param_dtype(name)] and cai["shape"] == info.shape, name
        assert cai["data"] == (layer.buffer_addresses(name)[0], False)
        if info.trainable:
            g = layer.cuda_array_interface(name, "grad").__cuda_array_interface__
            assert g["typestr"] == cai["typestr"] and g["data"][0] == layer.buffer_addresses(name)[1]
    with pytest.raises(ValueError, match="device memory"):
        layer.param_view("experts.w1")
