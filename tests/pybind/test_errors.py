"""Every class of bad input raises a clear exception, and the layer stays usable afterwards."""

import pickle

import numpy as np
import pytest

import libmoe
from libmoe import capi
from conftest import SMALL, randn


# ---- the exception hierarchy -----------------------------------------------------------------
@pytest.mark.parametrize("cls, base, code", [
    (libmoe.InvalidArgumentError, ValueError, 1), (libmoe.OutOfMemoryError, MemoryError, 2),
    (libmoe.UnsupportedError, NotImplementedError, 3), (libmoe.DeviceError, RuntimeError, 4),
    (libmoe.CommError, RuntimeError, 5), (libmoe.StateError, RuntimeError, 6),
    (libmoe.NonFiniteError, ValueError, 7), (libmoe.InternalError, RuntimeError, 8)])
def test_hierarchy(cls, base, code):
    assert issubclass(cls, libmoe.MoeError) and issubclass(cls, base)
    e = libmoe.errors.from_status(code, libmoe.status_name(code), "text")
    assert type(e) is cls and e.code == code and e.status == libmoe.status_name(code)
    assert str(e) == f"{e.status}: text"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is cls and again.status == e.status and again.message == "text"


def test_exception_carries_status_and_last_error():
    with pytest.raises(libmoe.InvalidArgumentError) as info:
        libmoe.Layer(d_model=8, d_ff=16, num_experts=4, top_k=5)
    e = info.value
    assert e.status == "MOE_ERR_INVALID_ARGUMENT" and e.code == 1
    assert "top_k is 5" in e.message and e.message == libmoe.last_error()
    assert str(e).startswith("MOE_ERR_INVALID_ARGUMENT: moe_layer_create: cfg->top_k")


# ---- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(d_modle=8), TypeError, "unknown config field 'd_modle'"),
    (dict(d_model="8"), TypeError, "d_model must be an int"),
    (dict(d_model=8.0), TypeError, "d_model must be an int"),
    (dict(d_model=True), TypeError, "d_model must be an int"),
    (dict(d_model=2**63), ValueError, "out of range"),
    (dict(seed=-1), ValueError, "seed=-1 is out of range"),
    (dict(aux_loss_coef="0.1"), TypeError, "aux_loss_coef must be a float"),
    (dict(normalize_topk="yes"), TypeError, "normalize_topk must be a bool"),
    (dict(activation="swish"), ValueError, "activation='swish' is not one of"),
    (dict(activation=1.5), TypeError, "activation must be a str"),
    (dict(device="tpu"), ValueError, "device='tpu'"),
    (dict(device="cuda:x"), ValueError, "cuda:N"),
    (dict(comm=object()), TypeError, "comm"),
    (dict(preset=3), TypeError, "preset must be a str"),
])
def test_config_python_checks(kwargs, exc, match):
    base = dict(d_model=8, d_ff=16)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        libmoe.Layer(**base)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=0), "d_model is 0"),
    (dict(d_ff=-3), "d_ff is -3"),
    (dict(num_experts=0), "num_experts is 0"),
    (dict(top_k=9), "top_k is 9"),
    (dict(activation=17), "activation is 17"),
    (dict(num_groups=3), "num_groups is 3"),
    (dict(num_groups=4, topk_groups=5), "topk_groups is 5"),
    (dict(routed_scale=float("nan")), "routed_scale is nan"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(shared_gate=True), "shared_gate"),
    (dict(routing="expert_choice"), "capacity"),
    (dict(d_model=2**40, d_ff=2**40), "overflow|too large|num_experts \\* d_ff"),
    (dict(preset="gpt5"), 'unknown preset "gpt5"'),
])
def test_config_library_checks(kwargs, match):
    base = dict(d_model=8, d_ff=16)
    base.update(kwargs)
    with pytest.raises(libmoe.InvalidArgumentError, match=match):
        libmoe.Layer(**base)


def test_unsupported_features():
    for dtype in ("bfloat16", "float16"):  # supported on the CPU
        assert libmoe.Layer(d_model=8, d_ff=16, dtype=dtype).dtype == dtype
    with pytest.raises(ValueError, match="dtype='float8' is not one of"):
        libmoe.Layer(d_model=8, d_ff=16, dtype="float8")
    with pytest.raises(libmoe.InvalidArgumentError, match="dtype is 7"):
        libmoe.Layer(d_model=8, d_ff=16, dtype=7)
    try:  # without libmoe_cuda.so.0 (or without a GPU) a CUDA layer is refused with a reason
        libmoe.Layer(d_model=8, d_ff=16, device="cuda")
    except (libmoe.UnsupportedError, libmoe.DeviceError) as e:
        assert "cuda" in e.message.lower()
    else:  # a CUDA build on a GPU machine: numpy arrays are refused for it
        lay = libmoe.Layer(d_model=8, d_ff=16, device="cuda")
        with pytest.raises(ValueError, match="host memory"):
            lay.forward(np.zeros((2, 8), np.float32))


# ---- activations -------------------------------------------------------------------------------
@pytest.fixture
def layer_x(rng):
    layer = libmoe.Layer(**SMALL)
    x = randn(rng, 10, 16)
    return layer, x, layer.forward(x)


@pytest.mark.parametrize("make, exc, match", [
    (lambda x: [[1.0, "a"]], TypeError, "x: a list that is not a rectangular sequence of numbers"),
    (lambda x: {"x": x}, TypeError, "x must be a numpy.ndarray of float32, not dict"),
    (lambda x: x.astype(np.float64), TypeError, "x has dtype float64, expected float32"),
    (lambda x: x.astype(np.float16), TypeError, "dtype float16"),
    (lambda x: x.astype(np.int32), TypeError, "dtype int32"),
    (lambda x: x.astype(">f4"), TypeError, "dtype >f4"),
    (lambda x: x[:, 0].copy(), ValueError, r"shape \(10,\), expected \[\.\.\., 16\]"),
    (lambda x: x[:, :8].copy(), ValueError, r"shape \(10, 8\), expected \[\.\.\., 16\]"),
    (lambda x: np.float32(3.0), TypeError, "not float32"),
    (lambda x: np.repeat(x, 2, axis=1)[:, ::2], ValueError, "not C-contiguous"),
    (lambda x: np.asfortranarray(x), ValueError, "not C-contiguous"),
    (lambda x: np.frombuffer(b"\0" + x.tobytes(), np.float32, offset=1).reshape(10, 16), ValueError, "not aligned"),
])
def test_bad_x(layer_x, make, exc, match):
    layer, x, y = layer_x
    with pytest.raises(exc, match="Layer.forward: .*" + match) as info:
        layer.forward(make(x))
    assert isinstance(info.value, libmoe.MoeError) and info.value.status == "MOE_ERR_INVALID_ARGUMENT"
    with pytest.raises(exc, match="Layer.route: .*" + match):
        layer.route(make(x))
    np.testing.assert_array_equal(layer.forward(x), y)


def test_leading_dimensions_and_sequences(layer_x):
    """x is [..., d_model] like the torch module's; a list or tuple is converted to float32."""
    layer, x, y = layer_x
    np.testing.assert_array_equal(layer.forward(x.reshape(2, 5, 16)), y.reshape(2, 5, 16))
    # one token, shape (16,): a GEMM of one row, so equal to rounding only
    np.testing.assert_allclose(layer.forward(x[3]), y[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.forward(x.tolist()), y)
    np.testing.assert_array_equal(layer.forward(tuple(map(tuple, x.tolist()))), y)
    out = np.empty((2, 5, 16), np.float32)
    assert layer.forward(x.reshape(2, 5, 16), out=out) is out
    np.testing.assert_array_equal(out.reshape(10, 16), y)
    ctx = layer.context()
    y3 = layer.forward(x.reshape(5, 2, 16), ctx)
    dx = layer.backward(ctx, np.ones((10, 16), np.float32))  # any leading shape with the same tokens
    assert y3.shape == (5, 2, 16) and dx.shape == (10, 16)
    dx2 = layer.backward(ctx, np.ones((2, 5, 16), np.float32))
    np.testing.assert_array_equal(dx2.reshape(10, 16), dx)
    assert layer.route(x.reshape(2, 5, 16)).num_tokens == 10


def test_every_error_is_a_moe_error(layer_x):
    layer, x, _ = layer_x
    other = libmoe.Layer(**SMALL)
    attempts = [
        (lambda: layer.forward(x, other.context()), libmoe.InvalidArgumentError, ValueError),
        (lambda: layer.forward(x.astype(np.float64)), libmoe.ArgumentTypeError, TypeError),
        (lambda: layer.forward(x, 3), libmoe.ArgumentTypeError, TypeError),
        (lambda: layer.get_grad("experts.w9"), libmoe.InvalidArgumentError, ValueError),
        (lambda: libmoe.Layer(d_model=8, d_ff=8, activation="swish"), libmoe.InvalidArgumentError, ValueError),
        (lambda: libmoe.Layer(d_model="8", d_ff=8), libmoe.ArgumentTypeError, TypeError),
    ]
    closed = libmoe.Layer(**SMALL)
    closed.close()
    attempts.append((lambda: closed.forward(x), libmoe.ClosedError, ValueError))
    for call, cls, builtin in attempts:
        with pytest.raises(libmoe.MoeError) as info:
            call()
        assert isinstance(info.value, cls) and isinstance(info.value, builtin), repr(info.value)
    with pytest.raises(libmoe.InvalidArgumentError, match=r"Layer\.get_grad: .*'experts\.w9'") as info:
        layer.get_grad("experts.w9")
    assert "moe_layer_param_buffers" not in str(info.value)
    assert issubclass(libmoe.ClosedError, libmoe.StateError)


def test_bad_out(layer_x):
    layer, x, y = layer_x
    with pytest.raises(ValueError, match=r"out has shape \(9, 16\), expected \(10, 16\)"):
        layer.forward(x, out=np.empty((9, 16), np.float32))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        layer.forward(x, out=ro)
    with pytest.raises(TypeError, match="out has dtype float64"):
        layer.forward(x, out=np.empty((10, 16)))
    with pytest.raises(libmoe.InvalidArgumentError, match="overlap"):  # the library's own check
        layer.forward(x, out=x)
    np.testing.assert_array_equal(layer.forward(x), y)


def test_bad_contexts(layer_x, rng):
    layer, x, y = layer_x
    other = libmoe.Layer(**SMALL)
    with pytest.raises(ValueError, match="another layer"):
        layer.forward(x, other.context())
    with pytest.raises(TypeError, match="ctx must be a libmoe.Context, not int"):
        layer.forward(x, 3)
    with pytest.raises(TypeError, match="not None"):
        layer.backward(None, y)
    with pytest.raises(TypeError, match="layer must be a libmoe.Layer"):
        libmoe.Context("layer")
    ctx = layer.context()
    with pytest.raises(libmoe.StateError, match="empty") as info:
        layer.backward(ctx, y)
    assert info.value.status == "MOE_ERR_STATE"
    with pytest.raises(libmoe.StateError, match="no forward"):
        ctx.stats()
    with pytest.raises(libmoe.StateError):
        ctx.expert_counts()
    with pytest.raises(libmoe.StateError):
        ctx.topk()
    with pytest.raises(libmoe.StateError):
        ctx.assignments()
    layer.forward(x, ctx)
    with pytest.raises(ValueError, match=r"Layer.backward: dy has shape \(9, 16\): 9 tokens, but the forward held by ctx had 10"):
        layer.backward(ctx, y[:9].copy())
    with pytest.raises(TypeError, match="dy has dtype float64"):
        layer.backward(ctx, y.astype(np.float64))
    ctx.close()
    with pytest.raises(ValueError, match="closed libmoe.Context"):
        layer.forward(x, ctx)
    np.testing.assert_array_equal(layer.forward(x), y)


def test_expert_choice_has_no_topk(rng):
    layer = libmoe.Layer(d_model=8, d_ff=8, routing="expert_choice", capacity_factor=1.0)
    ctx = layer.route(randn(rng, 16, 8))
    with pytest.raises(libmoe.UnsupportedError, match="moe_context_assignments"):
        ctx.topk()
    assert len(ctx.assignments()[0]) == ctx.expert_counts().sum()


# ---- parameters -------------------------------------------------------------------------------
def test_bad_params(layer_x, rng):
    layer, x, y = layer_x
    with pytest.raises(libmoe.InvalidArgumentError, match="Layer.get_param: name: this layer has no parameter 'experts.w4'.*experts.w1"):
        layer.get_param("experts.w4")
    with pytest.raises(TypeError, match="name must be a str"):
        layer.get_param(0)
    with pytest.raises(ValueError, match=r"shape \(4, 32\), expected \(4, 32, 16\)"):
        layer.set_param("experts.w1", randn(rng, 4, 32))
    with pytest.raises(TypeError, match="dtype float64"):
        layer.set_param("experts.w1", np.zeros((4, 32, 16)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        layer.set_param("experts.w1", [[0.0]])
    with pytest.raises(libmoe.InvalidArgumentError, match="not trainable"):
        layer.get_grad("router.bias")
    with pytest.raises(ValueError, match="unknown parameters"):
        layer.load_state_dict({"nope": np.zeros(1, np.float32)})
    strict = libmoe.Layer(**SMALL, check_finite=True)
    bad = strict.get_param("router.weight")
    bad[1, 2] = np.inf
    with pytest.raises(libmoe.NonFiniteError, match="router.weight"):
        strict.set_param("router.weight", bad)
    np.testing.assert_array_equal(layer.forward(x), y)


# ---- the low-level module -------------------------------------------------------------------------
def test_capi_bad_arguments(rng):
    x = randn(rng, 2, 16)
    with pytest.raises(TypeError, match="x must be a memory address"):
        capi.moe_forward(None, "x", 2, None, None)
    with pytest.raises(ValueError, match="not a valid memory address"):
        capi.moe_forward(None, -1, 2, None, None)
    with pytest.raises(libmoe.InvalidArgumentError, match="layer is NULL"):
        capi.moe_forward(None, x.ctypes.data, 2, x.ctypes.data, None)
    with pytest.raises(libmoe.InvalidArgumentError, match="layer is NULL"):
        capi.moe_layer_num_params(None)
    with pytest.raises(libmoe.InvalidArgumentError, match="cfg is NULL"):
        capi.moe_layer_create(None)
    with pytest.raises(TypeError):
        capi.moe_layer_create("config")
    cfg = capi.moe_config()
    cfg.d_model, cfg.d_ff = 16, 8
    ptr = capi.moe_layer_create(cfg)
    try:
        with pytest.raises(libmoe.InvalidArgumentError, match="num_tokens is -1"):
            capi.moe_forward(ptr, x.ctypes.data, -1, x.ctypes.data, None)
        with pytest.raises(libmoe.InvalidArgumentError, match="y is NULL"):
            capi.moe_forward(ptr, x.ctypes.data, 2, None, None)
        with pytest.raises(libmoe.InvalidArgumentError, match="stream"):
            capi.moe_layer_set_stream(ptr, 1234)
        with pytest.raises(libmoe.InvalidArgumentError, match="index is 99"):
            capi.moe_layer_param_info(ptr, 99, capi.moe_param_info())
        with pytest.raises(libmoe.InvalidArgumentError, match="count is 3"):
            capi.moe_layer_get_param(ptr, "router.weight", x.ctypes.data, 3)
    finally:
        capi.moe_layer_destroy(ptr)
    capi.moe_layer_destroy(None)  # NULL-safe
