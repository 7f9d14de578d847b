"""A small ctypes wrapper of libmoe's C API (include/moe/moe.h), for the PyTorch-oracle tests.

The library is loaded from $LIBMOE_PATH, or build/libmoe.so relative to the repository root.
Every non-zero moe_status raises MoeError carrying moe_status_name and moe_last_error.
Arrays cross the boundary as float32 / int32 / int64 C-contiguous numpy arrays (CPU layers only).
"""
import ctypes as C
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.abspath(os.path.join(_HERE, "..", ".."))
LIB_PATH = os.environ.get("LIBMOE_PATH") or os.path.join(_REPO, "build", "libmoe.so")

# Enums (values pinned by the header).
MOE_OK = 0
STATUS_NAMES = {}  # filled lazily through moe_status_name

DEVICE_CPU, DEVICE_CUDA = 0, 1
DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
ACT_SWIGLU, ACT_GEGLU, ACT_RELU, ACT_GELU, ACT_SILU = 0, 1, 2, 3, 4
ACTIVATIONS = {"swiglu": ACT_SWIGLU, "geglu": ACT_GEGLU, "relu": ACT_RELU, "gelu": ACT_GELU, "silu": ACT_SILU}
ROUTE_TOKEN_CHOICE, ROUTE_EXPERT_CHOICE = 0, 1
SCORE_SOFTMAX, SCORE_SIGMOID = 0, 1
NOISE_NONE, NOISE_GAUSSIAN, NOISE_JITTER = 0, 1, 2
DROP_POSITION, DROP_PROBS = 0, 1


class moe_config(C.Structure):
    # Field by field as in the moe.h of 0.1 and 0.2 (enums are C ints), written out by hand as an
    # oracle independent of the library's table. It is what a program built against that header
    # passes: moe_config_init and moe_config_preset, the functions (ctypes sees no macro), fill
    # these MOE_CONFIG_SIZE_0_1 bytes, and fields added since take their defaults.
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("d_model", C.c_int64),
        ("d_ff", C.c_int64),
        ("num_experts", C.c_int64),
        ("top_k", C.c_int64),
        ("activation", C.c_int),
        ("routing", C.c_int),
        ("score", C.c_int),
        ("normalize_topk", C.c_int),
        ("routed_scale", C.c_float),
        ("num_groups", C.c_int64),
        ("topk_groups", C.c_int64),
        ("capacity_factor", C.c_float),
        ("drop_policy", C.c_int),
        ("noise", C.c_int),
        ("noise_eps", C.c_float),
        ("aux_loss_coef", C.c_float),
        ("z_loss_coef", C.c_float),
        ("importance_loss_coef", C.c_float),
        ("load_loss_coef", C.c_float),
        ("bias_update_rate", C.c_float),
        ("num_shared_experts", C.c_int64),
        ("d_ff_shared", C.c_int64),
        ("shared_gate", C.c_int),
        ("device", C.c_int),
        ("device_index", C.c_int),
        ("dtype", C.c_int),
        ("allow_tf32", C.c_int),
        ("seed", C.c_uint64),
        ("check_finite", C.c_int),
        ("comm", C.c_void_p),
    ]


class moe_stats(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("num_tokens", C.c_int64),
        ("num_slots", C.c_int64),
        ("dropped_slots", C.c_int64),
        ("load_balance_loss", C.c_float),
        ("z_loss", C.c_float),
        ("importance_loss", C.c_float),
        ("load_loss", C.c_float),
        ("aux_loss_total", C.c_float),
        ("load_cv", C.c_float),
        ("max_load_ratio", C.c_float),
    ]


class moe_param_info(C.Structure):
    _fields_ = [
        ("name", C.c_char_p),
        ("ndim", C.c_int),
        ("shape", C.c_int64 * 3),
        ("trainable", C.c_int),
    ]


_lib = None


def lib():
    """The loaded library with argument and result types declared."""
    global _lib
    if _lib is not None:
        return _lib
    L = C.CDLL(LIB_PATH)
    vp, i64, st = C.c_void_p, C.c_int64, C.c_int
    pp = C.POINTER(C.c_void_p)
    sig = {
        "moe_status_name": ([C.c_int], C.c_char_p),
        "moe_last_error": ([], C.c_char_p),
        "moe_version": ([], C.c_uint32),
        "moe_config_init": ([C.POINTER(moe_config)], None),
        "moe_config_preset": ([C.POINTER(moe_config), C.c_char_p], st),
        "moe_layer_create": ([C.POINTER(moe_config), pp], st),
        "moe_layer_destroy": ([vp], None),
        "moe_layer_get_config": ([vp, C.POINTER(moe_config)], st),
        "moe_layer_num_params": ([vp], C.c_int),
        "moe_layer_param_info": ([vp, C.c_int, C.POINTER(moe_param_info)], st),
        "moe_layer_set_param": ([vp, C.c_char_p, vp, i64], st),
        "moe_layer_get_param": ([vp, C.c_char_p, vp, i64], st),
        "moe_layer_get_grad": ([vp, C.c_char_p, vp, i64], st),
        "moe_layer_zero_grad": ([vp], st),
        "moe_context_create": ([vp, pp], st),
        "moe_context_destroy": ([vp], None),
        "moe_forward": ([vp, vp, i64, vp, vp], st),
        "moe_backward": ([vp, vp, vp, vp], st),
        "moe_route": ([vp, vp, i64, vp], st),
        "moe_context_stats": ([vp, C.POINTER(moe_stats)], st),
        "moe_context_expert_counts": ([vp, vp], st),
        "moe_context_topk": ([vp, vp, vp], st),
        "moe_context_assignments": ([vp, i64, vp, vp, vp, C.POINTER(C.c_int64)], st),
        "moe_layer_load": ([vp, C.c_char_p, C.c_char_p, C.c_char_p], st),
        "moe_layer_save": ([vp, C.c_char_p, C.c_char_p], st),
        "moe_layer_save_as": ([vp, C.c_char_p, C.c_char_p, C.c_char_p], st),
    }
    for name, (args, res) in sig.items():
        fn = getattr(L, name)
        fn.argtypes = args
        fn.restype = res
    _lib = L
    return L


class MoeError(RuntimeError):
    def __init__(self, func, status, status_name, message):
        super().__init__("%s failed: %s (%d): %s" % (func, status_name, status, message))
        self.func = func
        self.status = status
        self.status_name = status_name
        self.message = message


def status_name(s):
    return lib().moe_status_name(s).decode()


def last_error():
    return lib().moe_last_error().decode()


def _check(func, status):
    if status != MOE_OK:
        raise MoeError(func, status, status_name(status), last_error())


def _call(name, *args):
    _check(name, getattr(lib(), name)(*args))


def _ptr(a):
    return None if a is None else a.ctypes.data_as(C.c_void_p)


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def default_config():
    cfg = moe_config()
    lib().moe_config_init(C.byref(cfg))
    assert C.sizeof(moe_config) == cfg.struct_size, (C.sizeof(moe_config), cfg.struct_size)
    return cfg


def make_config(**fields):
    """moe_config_init, then the given fields (activation may be given by name)."""
    cfg = default_config()
    for k, v in fields.items():
        if k == "activation" and isinstance(v, str):
            v = ACTIVATIONS[v.lower()]
        if not hasattr(cfg, k) or k == "struct_size":
            raise AttributeError("moe_config has no field %r" % k)
        setattr(cfg, k, v)
    return cfg


class Layer:
    def __init__(self, cfg=None, **fields):
        if cfg is None:
            cfg = make_config(**fields)
        elif fields:
            raise TypeError("give a moe_config or fields, not both")
        h = C.c_void_p()
        _call("moe_layer_create", C.byref(cfg), C.byref(h))
        self._h = h
        self.cfg = self.get_config()
        self._info = self._param_infos()

    # -- lifetime
    def close(self):
        if self._h is not None and self._h.value is not None:
            lib().moe_layer_destroy(self._h)
        self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    @property
    def handle(self):
        return self._h

    # -- configuration and parameters
    def get_config(self):
        out = moe_config()
        out.struct_size = C.sizeof(moe_config)
        _call("moe_layer_get_config", self._h, C.byref(out))
        return out

    @property
    def d_model(self):
        return self.cfg.d_model

    @property
    def num_experts(self):
        return self.cfg.num_experts

    @property
    def top_k(self):
        return self.cfg.top_k

    def num_params(self):
        n = lib().moe_layer_num_params(self._h)
        if n < 0:
            raise MoeError("moe_layer_num_params", -1, "error", last_error())
        return n

    def _param_infos(self):
        out = {}
        for i in range(self.num_params()):
            pi = moe_param_info()
            _call("moe_layer_param_info", self._h, i, C.byref(pi))
            shape = tuple(int(pi.shape[j]) for j in range(pi.ndim))
            out[pi.name.decode()] = (shape, bool(pi.trainable))
        return out

    def param_info(self):
        """{name: (shape, trainable)} in the library's order."""
        return dict(self._info)

    def param_names(self, trainable_only=False):
        return [n for n, (_, t) in self._info.items() if t or not trainable_only]

    def _shape(self, name):
        if name not in self._info:
            raise KeyError(name)
        return self._info[name][0]

    def get_param(self, name):
        shape = self._shape(name)
        out = np.empty(shape, dtype=np.float32)
        _call("moe_layer_get_param", self._h, name.encode(), _ptr(out), out.size)
        return out

    def set_param(self, name, value):
        shape = self._shape(name)
        a = _f32(value)
        if a.shape != shape:
            a = a.reshape(shape)
        _call("moe_layer_set_param", self._h, name.encode(), _ptr(a), a.size)

    def get_grad(self, name):
        shape = self._shape(name)
        out = np.empty(shape, dtype=np.float32)
        _call("moe_layer_get_grad", self._h, name.encode(), _ptr(out), out.size)
        return out

    def params(self):
        return {n: self.get_param(n) for n in self._info}

    def grads(self):
        return {n: self.get_grad(n) for n in self.param_names(trainable_only=True)}

    def zero_grad(self):
        _call("moe_layer_zero_grad", self._h)

    def load(self, path, prefix=None, family=None):
        """moe_layer_load: parameters from a safetensors checkpoint (file, index or directory)."""
        enc = lambda s: None if s is None else str(s).encode()
        _call("moe_layer_load", self._h, enc(path), enc(prefix), enc(family))

    def save(self, path, prefix=None, family=None):
        """moe_layer_save, or moe_layer_save_as with a family."""
        enc = lambda s: None if s is None else str(s).encode()
        if family is None:
            _call("moe_layer_save", self._h, enc(path), enc(prefix))
        else:
            _call("moe_layer_save_as", self._h, enc(path), enc(prefix), enc(family))

    # -- compute
    def context(self):
        return Context(self)

    def forward(self, x, ctx=None):
        x = _f32(x)
        T = x.shape[0]
        assert x.shape == (T, self.d_model)
        y = np.empty_like(x)
        _call("moe_forward", self._h, _ptr(x), T, _ptr(y), None if ctx is None else ctx.handle)
        return y

    def backward(self, ctx, dy, want_dx=True):
        dy = _f32(dy)
        dx = np.empty_like(dy) if want_dx else None
        _call("moe_backward", self._h, ctx.handle, _ptr(dy), _ptr(dx))
        return dx

    def route(self, x, ctx):
        x = _f32(x)
        _call("moe_route", self._h, _ptr(x), x.shape[0], ctx.handle)


class Context:
    def __init__(self, layer):
        self.layer = layer
        h = C.c_void_p()
        _call("moe_context_create", layer.handle, C.byref(h))
        self._h = h

    @property
    def handle(self):
        return self._h

    def close(self):
        if self._h is not None and self._h.value is not None:
            lib().moe_context_destroy(self._h)
        self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def stats(self):
        s = moe_stats()
        s.struct_size = C.sizeof(moe_stats)
        _call("moe_context_stats", self._h, C.byref(s))
        return {name: getattr(s, name) for name, _ in moe_stats._fields_ if name != "struct_size"}

    def expert_counts(self):
        out = np.empty(self.layer.num_experts, dtype=np.int64)
        _call("moe_context_expert_counts", self._h, _ptr(out))
        return out

    def topk(self):
        T = self.stats()["num_tokens"]
        k = self.layer.top_k
        ids = np.empty((T, k), dtype=np.int32)
        w = np.empty((T, k), dtype=np.float32)
        _call("moe_context_topk", self._h, _ptr(ids), _ptr(w))
        return ids, w

    def assignments(self):
        n = C.c_int64(0)
        _call("moe_context_assignments", self._h, 0, None, None, None, C.byref(n))
        cap = n.value
        tok = np.empty(cap, dtype=np.int32)
        exp = np.empty(cap, dtype=np.int32)
        w = np.empty(cap, dtype=np.float32)
        _call("moe_context_assignments", self._h, cap, _ptr(tok), _ptr(exp), _ptr(w), C.byref(n))
        return tok[: n.value], exp[: n.value], w[: n.value]
