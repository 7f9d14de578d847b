"""libmoe.Layer and libmoe.Context: the checked numpy API over the SWIG module libmoe.capi."""

import numbers
import os
import threading
from collections import namedtuple

import numpy as np

from . import capi
from ._config import CONFIG_FIELDS, PRESETS, config_dict, default_config, enum_name, make_config, preset_config
from .errors import ArgumentTypeError, ClosedError, InvalidArgumentError, StateError

__all__ = ["Layer", "Context", "ParamInfo", "CONFIG_FIELDS", "PRESETS", "default_config", "preset_config",
           "to_bfloat16_bits", "from_bfloat16_bits"]

_STATS_FIELDS = ("num_tokens", "num_slots", "dropped_slots", "load_balance_loss", "z_loss", "importance_loss",
                 "load_loss", "aux_loss_total", "load_cv", "max_load_ratio")

ParamInfo = namedtuple("ParamInfo", "name shape trainable")
ParamInfo.__doc__ = "A named parameter: shape in PyTorch nn.Linear layout; trainable is False for router.bias."

_F32, _F16, _U16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16)
# How each libmoe dtype is stored in numpy: numpy has no bfloat16, so its raw bits are uint16.
_STORAGE = {"float32": _F32, "float16": _F16, "bfloat16": _U16}
_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
# The numpy dtypes Layer.forward/backward/route accept for activations, and how they are named.
_ACCEPTED = {"float32": (_F32,), "float16": (_F32, _F16), "bfloat16": (_F32, _U16)}
_ACCEPTED_TEXT = {"float32": "float32", "float16": "float32 or float16",
                  "bfloat16": "float32 or uint16 (bfloat16 bits)"}


def to_bfloat16_bits(a):
    """The bfloat16 nearest to each value of ``a`` (as float32), rounded to nearest even, as uint16
    raw bits (the upper half of the float32 encoding). NaN stays NaN; overflow gives +-inf."""
    a = np.asarray(a, dtype=np.float32, order="C")
    u = a.view(np.uint32)
    bits = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: keep it a quiet NaN
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return bits


def from_bfloat16_bits(bits):
    """float32 values of bfloat16 raw bits (uint16), exact."""
    bits = np.asarray(bits)
    if bits.dtype != _U16:
        raise ArgumentTypeError(f"bfloat16 bits must be uint16, not {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _to_storage(a, dtype):
    """float32 array a converted to the layer's activation dtype ("float16" or "bfloat16")."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(a)
    with np.errstate(over="ignore"):  # beyond +-65504 becomes inf, as the C library rounds
        return a.astype(np.float16)


def _from_storage(a, dtype, out=None):
    """Storage-dtype array a as float32, into out when given."""
    f = from_bfloat16_bits(a) if dtype == "bfloat16" else a.astype(np.float32)
    if out is None:
        return f
    np.copyto(out, f)
    return out


class _HostBuffer:
    """Memory of a layer exposed through the array interface; keeps the layer's handle alive."""

    __slots__ = ("__array_interface__", "_owner")

    def __init__(self, address, shape, typestr, owner, readonly=False):
        self.__array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (address, readonly),
                                    "strides": None, "version": 3}
        self._owner = owner


class _DeviceBuffer:
    """CUDA memory of a layer through __cuda_array_interface__ (torch.as_tensor, CuPy, Numba)."""

    __slots__ = ("__cuda_array_interface__", "_owner")

    def __init__(self, address, shape, typestr, owner):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (address, False),
                                         "strides": None, "version": 2}
        self._owner = owner


class _LayerHandle:
    """Owns one moe_layer*; destroyed when the Layer and every Context/view using it are gone."""

    __slots__ = ("ptr", "lock", "__weakref__")

    def __init__(self, ptr):
        self.ptr = ptr
        self.lock = threading.Lock()  # a layer is used by one thread at a time (moe.h)

    def __del__(self):
        ptr, self.ptr = self.ptr, None
        if ptr is not None and capi is not None:
            capi.moe_layer_destroy(ptr)


class _ContextHandle:
    __slots__ = ("ptr", "layer")

    def __init__(self, ptr, layer_handle):
        self.ptr = ptr
        self.layer = layer_handle  # the layer outlives its contexts

    def __del__(self):
        ptr, self.ptr = self.ptr, None
        if ptr is not None and capi is not None:
            capi.moe_context_destroy(ptr)


def _address(a):
    return a.__array_interface__["data"][0]


class Layer:
    """A Mixture-of-Experts layer (one moe_layer).

    ``Layer(d_model=512, d_ff=1024, num_experts=8, top_k=2, ...)`` takes the moe_config fields as
    keywords (enums as strings, e.g. ``activation="geglu"``, ``device="cuda:0"``); ``preset=``
    (or :meth:`from_preset`) starts from a published recipe. Activations are numpy arrays of shape
    ``[num_tokens, d_model]``, C-contiguous. Parameters and gradients are numpy arrays by name
    (``get_param``/``set_param``/``get_grad`` copy; ``param_view``/``grad_view`` are zero-copy
    views of the layer's own storage).

    Precision (``dtype=``, see moe.h): a "float32" layer takes and returns float32 activations,
    passed to the library without a copy. A "float16" or "bfloat16" layer stores its activations
    and expert weights (``experts.*``, ``shared.w*``) in that dtype; the router (``router.*``,
    ``shared.gate``) stays float32. Its forward/backward/route accept float32 activations, rounded
    to the layer's dtype (nearest even) on the way in, and return float32 (exact conversions of
    what the layer computed); they also take the layer's own format with no copy and return that
    format: numpy.float16 for a float16 layer, numpy.uint16 raw bits for a bfloat16 layer (numpy
    has no bfloat16; see :func:`to_bfloat16_bits`, :func:`from_bfloat16_bits`). Host copies of
    parameters and gradients are float32 whatever the dtype.

    A Layer may be used by one thread at a time; it holds a lock so concurrent calls wait, and the
    GIL is released while the library computes. ``close()`` (or ``with Layer(...) as layer``) frees
    it once no Context or view uses it any more.
    """

    def __init__(self, preset=None, **config):
        cfg = make_config(preset, config)
        ptr = capi.moe_layer_create(cfg)
        self._h = _LayerHandle(ptr)
        self._init_info()

    @classmethod
    def from_preset(cls, name, **config):
        """A layer from preset ``name`` with ``config`` overriding its fields (d_model, d_ff at least)."""
        return cls(preset=name, **config)

    def _init_info(self):
        cfg = capi.moe_config()
        capi.moe_layer_get_config(self._h.ptr, cfg)
        self._config = config_dict(cfg)
        self._d = self._config["d_model"]
        self._params = {}
        self._param_dtypes = {}
        info = capi.moe_param_info()
        for i in range(capi.moe_layer_num_params(self._h.ptr)):
            capi.moe_layer_param_info(self._h.ptr, i, info)
            shape = tuple(int(info.dim(j)) for j in range(info.ndim))
            self._params[info.name] = ParamInfo(info.name, shape, bool(info.trainable))
            dt = capi.moe_layer_param_dtype(self._h.ptr, info.name)
            self._param_dtypes[info.name] = enum_name("dtype", dt)

    # ---- lifetime -------------------------------------------------------------------------------
    def _handle(self):
        h = self.__dict__.get("_h")
        if h is None:
            raise ClosedError("operation on a closed libmoe.Layer")
        return h

    def close(self):
        """Release the layer (its memory goes once no Context or view still uses it). Idempotent."""
        self.__dict__["_h"] = None

    @property
    def closed(self):
        return self.__dict__.get("_h") is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        return (_restore_layer, (self.config, self.state_dict()))

    def __repr__(self):
        if self.closed:
            return "<libmoe.Layer (closed)>"
        c = self._config
        return (f"<libmoe.Layer d_model={c['d_model']} d_ff={c['d_ff']} num_experts={c['num_experts']} "
                f"top_k={c['top_k']} activation={c['activation']} device={self.device}>")

    # ---- configuration ------------------------------------------------------------------------------
    @property
    def config(self):
        """The effective configuration (defaults filled in) as a dict; Layer(**layer.config) rebuilds it."""
        self._handle()
        return dict(self._config)

    d_model = property(lambda self: self._config["d_model"])
    d_ff = property(lambda self: self._config["d_ff"])
    num_experts = property(lambda self: self._config["num_experts"])
    top_k = property(lambda self: self._config["top_k"])

    @property
    def dtype(self):
        """The layer's dtype: "float32", "bfloat16" or "float16" (activations and expert weights)."""
        return self._config["dtype"]

    @property
    def device(self):
        """"cpu" or "cuda:N"."""
        c = self._config
        return "cpu" if c["device"] == "cpu" else f"cuda:{c['device_index']}"

    def set_stream(self, cuda_stream):
        """Issue a CUDA layer's work on cuda_stream (a cudaStream_t as an int; None/0 = default)."""
        h = self._handle()
        with h.lock:
            capi.moe_layer_set_stream(h.ptr, cuda_stream or None)

    # ---- parameters ---------------------------------------------------------------------------------
    @property
    def param_names(self):
        """Names of the layer's parameters, in the library's order."""
        return list(self._params)

    def param_info(self):
        """{name: ParamInfo(name, shape, trainable)}."""
        return dict(self._params)

    def param_dtype(self, name):
        """Storage dtype of parameter ``name`` and of its gradient: the layer's dtype for
        ``experts.*`` and ``shared.w1/w3/w2``, "float32" for ``router.*`` and ``shared.gate``."""
        self._info(name, "param_dtype")
        return self._param_dtypes[name]

    def _info(self, name, call):
        """ParamInfo of ``name``; errors name ``call``, the method the user called."""
        if not isinstance(name, str):
            raise ArgumentTypeError(f"Layer.{call}: name must be a str, not {type(name).__name__}")
        self._handle()
        info = self._params.get(name)
        if info is None:
            raise InvalidArgumentError(f"Layer.{call}: name: this layer has no parameter {name!r} "
                                       f"(it has {', '.join(self._params)})")
        return info

    def get_param(self, name):
        """A float32 copy of parameter ``name`` (exact, whatever its storage dtype)."""
        info = self._info(name, "get_param")
        out = np.empty(info.shape, dtype=np.float32)
        h = self._h
        with h.lock:
            capi.moe_layer_get_param(h.ptr, name, _address(out), out.size)
        return out

    def set_param(self, name, value):
        """Copy ``value`` (float32, the parameter's shape) into parameter ``name``; rounded to nearest
        even when the parameter is stored in bfloat16/float16."""
        info = self._info(name, "set_param")
        a = _check_array(value, f"Layer.set_param: {name}", info.shape, "float32")
        h = self._h
        with h.lock:
            capi.moe_layer_set_param(h.ptr, name, _address(a), a.size)

    def get_grad(self, name):
        """A float32 copy of the accumulated gradient of ``name`` (router.bias has none: ValueError)."""
        info = self._info(name, "get_grad")
        out = np.empty(info.shape, dtype=np.float32)
        h = self._h
        with h.lock:
            capi.moe_layer_get_grad(h.ptr, name, _address(out), out.size)
        return out

    def zero_grad(self):
        h = self._handle()
        with h.lock:
            capi.moe_layer_zero_grad(h.ptr)

    def state_dict(self):
        """{name: float32 copy} of every parameter (router.bias included)."""
        return {name: self.get_param(name) for name in self._params}

    def load_state_dict(self, state, strict=True):
        """Set parameters from {name: array}; strict: the names must match exactly."""
        unknown = [k for k in state if k not in self._params]
        missing = [k for k in self._params if k not in state]
        if strict and (unknown or missing):
            raise InvalidArgumentError(f"load_state_dict: unknown parameters {unknown}, missing parameters {missing}")
        for name, value in state.items():
            if name in self._params:
                self.set_param(name, np.asarray(value))

    # ---- checkpoints ------------------------------------------------------------------------------
    def load(self, path, prefix=None, family=None):
        """Set every parameter from a safetensors checkpoint (moe_layer_load): ``path`` is a
        .safetensors file, a model.safetensors.index.json (sharded) or a directory holding either;
        ``prefix`` names the block (e.g. "model.layers.3.mlp"); ``family`` its naming and layout:
        None/"libmoe" (what :meth:`save` writes), "mixtral", "qwen2-moe", "qwen3-moe", "olmoe",
        "deepseek-v3", "switch", "gpt-oss". The layer's configuration must match the checkpoint; on any error
        (InvalidArgumentError naming the file, the tensor and the fault) nothing is changed."""
        path = self._path(path, "load")
        for what, v in (("prefix", prefix), ("family", family)):
            if v is not None and not isinstance(v, str):
                raise ArgumentTypeError(f"Layer.load: {what} must be a str or None, not {type(v).__name__}")
        h = self._handle()
        with h.lock:
            capi.moe_layer_load(h.ptr, path, prefix, family)

    def save(self, path, prefix=None, family=None):
        """Write every parameter to one safetensors file, each in its storage dtype, atomically;
        ``path`` is the file or a directory (model.safetensors in it). ``family`` None or "libmoe":
        libmoe's names (moe_layer_save); a family :meth:`load` knows: that family's names and layout
        (moe_layer_save_as: transformers 5's fused experts for the gated families, Switch's
        per-expert modules, gpt-oss's plain tensors), refused (InvalidArgumentError) while a
        parameter the family has no tensor for is not zero. :meth:`load` of the file with the same
        ``prefix`` and ``family`` into a layer of the same configuration restores it bit for bit."""
        path = self._path(path, "save")
        for what, v in (("prefix", prefix), ("family", family)):
            if v is not None and not isinstance(v, str):
                raise ArgumentTypeError(f"Layer.save: {what} must be a str or None, not {type(v).__name__}")
        h = self._handle()
        with h.lock:
            if family is None:
                capi.moe_layer_save(h.ptr, path, prefix)
            else:
                capi.moe_layer_save_as(h.ptr, path, prefix, family)

    @classmethod
    def from_checkpoint(cls, path, prefix=None, family=None, preset=None, **config):
        """A layer from ``preset`` and ``config`` (which must describe the checkpoint's block), its
        parameters loaded from ``path`` (see :meth:`load`)."""
        layer = cls(preset=preset, **config)
        layer.load(path, prefix, family)
        return layer

    @staticmethod
    def _path(path, call):
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"Layer.{call}: path must be a str or os.PathLike, not {type(path).__name__}")
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return path

    def buffer_addresses(self, name):
        """(data, grad) addresses of the layer's own storage of ``name`` on its device, in
        param_dtype(name) (grad None for router.bias). For zero-copy bindings; valid while this
        Layer is open."""
        self._info(name, "buffer_addresses")
        h = self._h
        with h.lock:
            return tuple(capi.moe_layer_param_buffers(h.ptr, name))

    def _buffer(self, name, which, bf16_typestr=None, call=None):
        call = call or ("param_view" if which == "data" else "grad_view")
        info = self._info(name, call)
        h = self._h
        with h.lock:
            data, grad = capi.moe_layer_param_buffers(h.ptr, name)
        address = data if which == "data" else grad
        if address is None:
            raise InvalidArgumentError(f"Layer.{call}: {name} is not trainable and has no gradient")
        dtype = self._param_dtypes[name]
        typestr = bf16_typestr if dtype == "bfloat16" and bf16_typestr else _TYPESTR[dtype]
        if self._config["device"] == "cpu":
            return _HostBuffer(address, info.shape, typestr, self._h)
        return _DeviceBuffer(address, info.shape, typestr, self._h)

    def param_view(self, name):
        """The layer's own storage of ``name`` as a writable numpy array (no copy; CPU layers):
        float32, numpy.float16 for a float16 parameter, numpy.uint16 raw bits for a bfloat16 one
        (see param_dtype). Writes go straight into the layer; not between a training forward and
        its backward."""
        return self._host_view(name, "data")

    def grad_view(self, name):
        """The layer's own gradient buffer of ``name`` as a numpy array (no copy; CPU layers), in
        the same dtype as param_view(name)."""
        return self._host_view(name, "grad")

    def _host_view(self, name, which):
        buf = self._buffer(name, which)
        if not isinstance(buf, _HostBuffer):
            raise InvalidArgumentError(f"Layer.{'param_view' if which == 'data' else 'grad_view'}: this layer "
                                       f"lives on {self.device}: its buffers are device memory; use "
                                       f"cuda_array_interface() (torch.as_tensor, CuPy) or libmoe.torch")
        return np.asarray(buf)

    def cuda_array_interface(self, name, which="data"):
        """An object with __cuda_array_interface__ over a CUDA layer's ``name`` (which: "data"/"grad"):
        typestr "<f4", "<f2" for float16, "<u2" raw bits for bfloat16 (the interface has no bfloat16)."""
        buf = self._buffer(name, which, call="cuda_array_interface")
        if not isinstance(buf, _DeviceBuffer):
            raise InvalidArgumentError("Layer.cuda_array_interface: this layer lives on the CPU: use "
                                       "param_view()/grad_view()")
        return buf

    # ---- compute -------------------------------------------------------------------------------------
    def _check_host(self, call):
        if self._config["device"] != "cpu":
            raise InvalidArgumentError(f"Layer.{call}: this layer lives on {self.device}: numpy arrays are host "
                                       f"memory; use libmoe.torch.MoE or pass device addresses to libmoe.capi")

    def _activation(self, a, what, tokens=None):
        """An activation as a [tokens, d_model] array: float32 or the layer's own format, any
        leading shape [..., d_model] (flattened without a copy); a list or tuple is converted to
        float32. Returns (array2d, original shape)."""
        layer_dtype = self._config["dtype"]
        if isinstance(a, (list, tuple)):
            try:
                a = np.asarray(a, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise ArgumentTypeError(f"{what}: a {type(a).__name__} that is not a rectangular sequence of "
                                        f"numbers ({e})") from None
        a = _check_array(a, what, None, _ACCEPTED[layer_dtype], expected=_ACCEPTED_TEXT[layer_dtype])
        if a.ndim < 1 or a.shape[-1] != self._d:
            raise InvalidArgumentError(f"{what} has shape {a.shape}, expected [..., {self._d}] (d_model {self._d})")
        a2 = a.reshape(-1, self._d)
        if tokens is not None and a2.shape[0] != tokens:
            raise InvalidArgumentError(f"{what} has shape {a.shape}: {a2.shape[0]} tokens, but the forward held "
                                       f"by ctx had {tokens}")
        return a2, a.shape

    def _out(self, out, what, shape, dtype, src):
        """The caller's output array: exactly shape and dtype (those of src), writable; returned as
        [tokens, d]."""
        out = _check_array(out, what, shape, (dtype,), writable=True, expected=f"{dtype} (the dtype of {src})")
        return out.reshape(-1, self._d)

    def _native(self, a):
        """a in the layer's activation dtype: a itself if it is already, else a converted copy."""
        dtype = self._config["dtype"]
        return a if a.dtype == _STORAGE[dtype] else _to_storage(a, dtype)

    def context(self):
        """A new Context for training forwards (and route) on this layer."""
        return Context(self)

    def forward(self, x, ctx=None, out=None):
        """y = MoE(x). x: [..., d_model] (any leading shape, C-contiguous), float32 or the layer's
        own format (see the class docstring); a list or tuple is converted to float32; other
        dtypes (float64, ...) raise ArgumentTypeError: convert with x.astype(numpy.float32).
        y has x's shape and dtype. ctx None: inference; a Context: training (noise, statistics and
        activations saved in ctx for backward). out: optional array of x's dtype and shape to write
        y into. Returns y."""
        h = self._handle()
        self._check_host("forward")
        x, shape = self._activation(x, "Layer.forward: x")
        T = x.shape[0]
        o = None if out is None else self._out(out, "Layer.forward: out", shape, x.dtype, "x")
        xs = self._native(x)
        if xs is x:
            ys = np.empty_like(x) if o is None else o
        else:
            ys = np.empty(x.shape, dtype=xs.dtype)
        cptr = self._ctx_ptr(ctx, "forward")
        with h.lock:
            capi.moe_forward(h.ptr, _address(xs), T, _address(ys), cptr)
        if ctx is not None:
            ctx._filled(T, "trained")
        y = ys if xs is x else _from_storage(ys, self._config["dtype"], o)
        return out if out is not None else y.reshape(shape)

    __call__ = forward

    def backward(self, ctx, dy, out=None, need_dx=True):
        """Backward of the training forward in ctx: returns dx (None if need_dx is False) and ADDS
        to every trainable parameter's gradient, aux-loss gradients included. dy: as x in forward
        (the same number of tokens, any leading shape); dx (and out, if given) has dy's shape and
        dtype."""
        h = self._handle()
        self._check_host("backward")
        cptr = self._ctx_ptr(ctx, "backward", required=True)
        if ctx._tokens is None or ctx._kind != "trained":
            how = "it is empty" if ctx._tokens is None else "it was filled by Layer.route"
            raise StateError(f"Layer.backward: ctx holds no training forward ({how}): call Layer.forward(x, ctx) "
                             f"first")
        T = ctx._tokens
        dy, shape = self._activation(dy, "Layer.backward: dy", T)
        o = None
        if need_dx and out is not None:
            o = self._out(out, "Layer.backward: out", shape, dy.dtype, "dy")
        dys = self._native(dy)
        dxs = None
        if need_dx:
            dxs = (np.empty_like(dy) if o is None else o) if dys is dy else np.empty(dy.shape, dtype=dys.dtype)
        with h.lock:
            capi.moe_backward(h.ptr, cptr, _address(dys), None if dxs is None else _address(dxs))
        if dxs is None:
            return None
        dx = dxs if dys is dy else _from_storage(dxs, self._config["dtype"], o)
        return out if out is not None else dx.reshape(shape)

    def route(self, x, ctx=None):
        """Routing only (no expert runs): fills ctx (a new Context if None) and returns it.
        x as in forward."""
        h = self._handle()
        self._check_host("route")
        x, _ = self._activation(x, "Layer.route: x")
        if ctx is None:
            ctx = Context(self)
        cptr = self._ctx_ptr(ctx, "route", required=True)
        xs = self._native(x)
        with h.lock:
            capi.moe_route(h.ptr, _address(xs), x.shape[0], cptr)
        ctx._filled(x.shape[0], "routed")
        return ctx

    def _ctx_ptr(self, ctx, call, required=False):
        if ctx is None:
            if required:
                raise ArgumentTypeError(f"Layer.{call}: ctx must be a libmoe.Context, not None")
            return None
        if not isinstance(ctx, Context):
            raise ArgumentTypeError(f"Layer.{call}: ctx must be a libmoe.Context, not {type(ctx).__name__}")
        ch = ctx._handle()
        if ch.layer is not self._h:
            raise InvalidArgumentError(f"Layer.{call}: ctx belongs to another layer; create it with this layer's "
                                       f"context()")
        return ch.ptr

    # ---- raw pointers (libmoe.torch) -----------------------------------------------------------------
    def _forward_raw(self, x, T, y, ctx):
        h = self._handle()
        with h.lock:
            capi.moe_forward(h.ptr, x, T, y, None if ctx is None else ctx._handle().ptr)
        if ctx is not None:
            ctx._filled(T, "trained")

    def _set_aux_grad_scale(self, ctx, scale):
        with self._handle().lock:
            capi.moe_context_set_aux_grad_scale(ctx._handle().ptr, scale)

    def _backward_raw(self, ctx, dy, dx):
        h = self._handle()
        with h.lock:
            capi.moe_backward(h.ptr, ctx._handle().ptr, dy, dx)


def _restore_layer(config, state):
    layer = Layer(**config)
    layer.load_state_dict(state)
    return layer


class Context:
    """What one training forward keeps for its backward, and the routing it decided.

    Create with ``layer.context()``; reuse it step after step (its memory is reused). Statistics:
    ``stats()`` (a dict), ``expert_counts()``, ``topk()``, ``assignments()``.
    """

    def __init__(self, layer):
        if not isinstance(layer, Layer):
            raise ArgumentTypeError(f"layer must be a libmoe.Layer, not {type(layer).__name__}")
        lh = layer._handle()
        with lh.lock:
            ptr = capi.moe_context_create(lh.ptr)
        self._h = _ContextHandle(ptr, lh)
        self._layer_config = layer._config
        self._tokens = None
        self._kind = None

    def _filled(self, T, kind):
        self._tokens, self._kind = T, kind

    def _handle(self):
        h = self.__dict__.get("_h")
        if h is None:
            raise ClosedError("operation on a closed libmoe.Context")
        return h

    def close(self):
        self.__dict__["_h"] = None

    @property
    def closed(self):
        return self.__dict__.get("_h") is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def num_tokens(self):
        """Tokens of the forward or route this context holds (None if empty)."""
        return self._tokens

    def __repr__(self):
        state = "closed" if self.closed else (self._kind or "empty")
        return f"<libmoe.Context {state} num_tokens={self._tokens}>"

    def stats(self):
        """The routing statistics and auxiliary losses of the held forward, as a dict."""
        h = self._handle()
        s = capi.moe_stats()
        with h.layer.lock:
            capi.moe_context_stats(h.ptr, s)
        return {f: getattr(s, f) for f in _STATS_FIELDS}

    def set_aux_grad_scale(self, scale):
        """Scale the aux-loss gradient that Layer.backward adds for this context (default 1.0,
        kept until changed; 0 leaves the aux losses out of the gradient). The reported loss
        values are not scaled."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ArgumentTypeError(f"Context.set_aux_grad_scale: scale must be a float, not {type(scale).__name__}")
        h = self._handle()
        with h.layer.lock:
            capi.moe_context_set_aux_grad_scale(h.ptr, float(scale))

    @property
    def aux_loss(self):
        """aux_loss_total of the held forward: the coefficient-weighted sum backward differentiates."""
        return self.stats()["aux_loss_total"]

    def expert_counts(self):
        """int64 [num_experts]: slots each expert kept (after capacity)."""
        h = self._handle()
        out = np.empty(self._layer_config["num_experts"], dtype=np.int64)
        with h.layer.lock:
            capi.moe_context_expert_counts(h.ptr, _address(out))
        return out

    def topk(self):
        """(expert_ids int32 [T, k], weights float32 [T, k]); a dropped slot reads -1 and 0."""
        h = self._handle()
        T = self._tokens or 0
        k = self._layer_config["top_k"]
        ids = np.empty((T, k), dtype=np.int32)
        w = np.empty((T, k), dtype=np.float32)
        if self._tokens is None:  # the library reports the state error
            ids = w = None
        with h.layer.lock:
            capi.moe_context_topk(h.ptr, None if ids is None else _address(ids), None if w is None else _address(w))
        return ids, w

    def assignments(self):
        """(token int32, expert int32, weight float32) arrays of every kept assignment, by expert then token."""
        h = self._handle()
        with h.layer.lock:
            n = capi.moe_context_assignments(h.ptr, 0, None, None, None)
            token = np.empty(n, dtype=np.int32)
            expert = np.empty(n, dtype=np.int32)
            weight = np.empty(n, dtype=np.float32)
            if n:
                capi.moe_context_assignments(h.ptr, n, _address(token), _address(expert), _address(weight))
        return token, expert, weight


def _check_array(a, what, shape, dtypes, writable=False, expected=None):
    """a must be a numpy array of one of dtypes (a dtype or a tuple of them), C-contiguous and
    aligned, of shape (None: any shape; None inside: any size there). what names the call and the
    argument in errors ("Layer.forward: x"); expected: how the accepted dtypes are named."""
    if not isinstance(dtypes, tuple):
        dtypes = (dtypes,)
    dtypes = tuple(np.dtype(d) for d in dtypes)
    if expected is None:
        expected = " or ".join(str(d) for d in dtypes)
    if not isinstance(a, np.ndarray):
        raise ArgumentTypeError(f"{what} must be a numpy.ndarray of {expected}, not {type(a).__name__}")
    if a.dtype not in dtypes:
        raise ArgumentTypeError(f"{what} has dtype {a.dtype}, expected {expected} (convert with "
                                f".astype(numpy.{dtypes[0]}))")
    if shape is not None and (a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape))):
        want = tuple("num_tokens" if s is None else s for s in shape)
        raise InvalidArgumentError(f"{what} has shape {a.shape}, expected ({', '.join(map(str, want))}"
                                   f"{',' if len(want) == 1 else ''})")
    if not a.flags.c_contiguous:
        raise InvalidArgumentError(f"{what} is not C-contiguous (use numpy.ascontiguousarray)")
    if not a.flags.aligned:
        raise InvalidArgumentError(f"{what} is not aligned to its dtype")
    if writable and not a.flags.writeable:
        raise InvalidArgumentError(f"{what} is read-only; the result is written into it")
    return a
