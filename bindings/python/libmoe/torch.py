"""libmoe.torch.MoE: a libmoe layer as a torch.nn.Module.

    moe = libmoe.torch.MoE(d_model=512, d_ff=1024, num_experts=8, top_k=2)   # or preset="mixtral"
    y = moe(x)                      # x [..., d_model]; y has x's shape
    loss = criterion(y, ...)        # the aux-loss gradient is added in backward (Megatron-style)
    loss.backward(); opt.step()     # opt = any torch optimizer over moe.parameters()
    moe.aux_loss, moe.last_stats    # for logging

Zero copy, both ways:
  - Parameters. The libmoe layer owns the storage; every nn.Parameter (``router.weight``,
    ``experts.w1``, ...) and the buffer ``router.bias`` is a torch tensor over that storage
    (torch.from_numpy over the layer's memory on the CPU, __cuda_array_interface__ on CUDA), so an
    optimizer step or load_state_dict writes straight into the layer. state_dict() keys are the
    libmoe parameter names. With dtype=torch.bfloat16 or torch.float16 the expert weights
    (``experts.*``, ``shared.w1/w3/w2``) are tensors of that dtype and the router (``router.*``,
    ``shared.gate``) stays float32, as libmoe stores them; each gradient has its parameter's dtype.
  - Activations. The autograd Function hands x.data_ptr(), y.data_ptr(), dy.data_ptr() and
    dx.data_ptr() to moe_forward/moe_backward; only a non-contiguous x is made contiguous first.

Gradients are COPIED into .grad (through autograd): backward zeroes the layer's own gradient
buffers, calls moe_backward (which adds this call's gradients there), and returns a fresh tensor
per parameter, which autograd accumulates into .grad as for any other module. Aliasing .grad to
the layer's buffer would save that parameter-sized copy, but breaks as soon as torch replaces or
resets .grad (zero_grad(set_to_none=True), the default since torch 2.0), under gradient
accumulation across several forwards, when the module is called twice in one graph, and with
torch.autograd.grad, hooks and DDP; the copy is one pass over the parameters per backward,
small next to the expert GEMMs it follows.

Auxiliary losses, like Megatron-Core's MoEAuxLossAutoScaler:
  aux_loss="add" (default): forward returns y; backward adds the aux-loss gradient scaled by
      the module's aux_loss_scale (1.0; set it with moe.set_aux_loss_scale(s) when the main loss
      is scaled, e.g. 1/num_microbatches; each module has its own). The value is in
      ``moe.aux_loss`` (a detached tensor) for logging.
  aux_loss="return": forward returns (y, aux_loss); its gradient is whatever the loss gives it
      (loss = task + aux_loss adds it once, scaling the loss scales it, not using it drops it).
"""

import threading

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._layer import Layer
from .errors import ArgumentTypeError, InvalidArgumentError, StateError

__all__ = ["MoE"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_POOL_MAX = 4  # contexts kept for reuse per module (each holds one forward's activations)


class _Saved:
    """A libmoe Context held by one autograd graph; back to the pool when the graph is freed."""

    __slots__ = ("ctx", "pool")

    def __init__(self, ctx, pool):
        self.ctx, self.pool = ctx, pool

    def __del__(self):
        ctx, self.ctx = self.ctx, None
        if ctx is not None and len(self.pool) < _POOL_MAX:
            self.pool.append(ctx)


class _Engine:
    """What the autograd Function needs: the layer, its tensors, a context pool. Not a Module."""

    def __init__(self, layer, device):
        self.layer = layer
        self.device = device
        self.pool = []
        self.grads = {}
        self.lock = threading.RLock()
        self.last_stats = None
        self.aux_loss_scale = 1.0  # the owning module's, read by backward
        self._stream = None

    def acquire(self):
        try:
            return self.pool.pop()
        except IndexError:
            return self.layer.context()

    def release(self, ctx):
        if len(self.pool) < _POOL_MAX:
            self.pool.append(ctx)

    def bind_stream(self):
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            if stream != self._stream:
                self.layer.set_stream(stream)
                self._stream = stream


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, engine, aux_mode, need_ctx, need_grad, *params):
        layer = engine.layer
        T = x.shape[0]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        with engine.lock:
            engine.bind_stream()
            mctx = engine.acquire() if need_ctx else None
            layer._forward_raw(x.data_ptr(), T, y.data_ptr(), mctx)
            stats = mctx.stats() if mctx is not None else None
        engine.last_stats = stats
        aux = torch.tensor(stats["aux_loss_total"] if stats else 0.0, dtype=torch.float32, device=x.device)
        ctx.engine, ctx.aux_mode = engine, aux_mode
        if need_grad:
            ctx.saved = _Saved(mctx, engine.pool)
            # Saved so that autograd enforces its rules on them: a parameter changed in place
            # before backward (version counters) and a second backward without retain_graph both
            # raise, as for any other op, instead of giving wrong or doubled gradients.
            ctx.save_for_backward(*params)
        else:
            ctx.saved = None
            if mctx is not None:
                engine.release(mctx)
        if aux_mode != "return":
            ctx.mark_non_differentiable(aux)
        return y, aux

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, daux):
        engine = ctx.engine
        saved = ctx.saved
        if saved is None or saved.ctx is None:
            raise StateError("libmoe.torch.MoE: backward without a saved training forward")
        ctx.saved_tensors  # noqa: B018 - raises if a parameter changed in place or the graph was freed
        mctx = saved.ctx
        layer = engine.layer
        need = ctx.needs_input_grad
        need_x, need_params = need[0], need[5:]
        names = engine.trainable
        if dy is None:
            raise StateError("libmoe.torch.MoE: no gradient for the output")
        dy = dy.contiguous()
        if ctx.aux_mode == "return":
            scale = float(daux) if daux is not None else 0.0
        else:
            scale = float(engine.aux_loss_scale)

        with engine.lock:
            engine.bind_stream()
            # The library scales the aux-loss gradient it adds (moe_context_set_aux_grad_scale):
            # one backward whatever the scale, 0 included.
            layer._set_aux_grad_scale(mctx, scale)
            dx = torch.empty_like(dy) if need_x else None
            layer.zero_grad()
            layer._backward_raw(mctx, dy.data_ptr(), None if dx is None else dx.data_ptr())
            grads = [engine.grads[n].clone() if w else None for n, w in zip(names, need_params)]
        return (dx, None, None, None, None, *grads)


class _ParamGroup(nn.Module):
    """Holds the parameters of one prefix ("router", "experts", "shared") of the libmoe layer."""

    def _apply(self, fn, *args, **kwargs):
        raise RuntimeError("move or convert the libmoe.torch.MoE that owns these parameters, not its group: "
                           "their storage belongs to the libmoe layer")

    def forward(self, *args):
        raise RuntimeError("a libmoe parameter group is not callable; call the MoE module")


def _torch_device(device):
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device {device}: libmoe runs on 'cpu' or 'cuda'")
    return device


class MoE(nn.Module):
    """A Mixture-of-Experts block (routing, experts, aux losses) computed by libmoe.

    Args: d_model, d_ff, num_experts, top_k, and any libmoe config field as a keyword
    (activation="swiglu", capacity_factor=1.25, num_shared_experts=1, seed=..., see
    libmoe.CONFIG_FIELDS); preset: start from a libmoe preset ("mixtral", ...); device: torch
    device ("cpu", "cuda:0"); dtype: torch.float32 (default), torch.bfloat16 or torch.float16, on
    either device: the dtype of activations and of the expert weights; aux_loss: "add" or
    "return" (see the module docstring).

    Input [..., d_model] in dtype on device; output the same shape and dtype. Expert weights
    (``experts.*``, ``shared.w1/w3/w2``) are parameters of dtype; the router's (``router.*``,
    ``shared.gate``) are float32 whatever dtype is (libmoe accumulates in float32 and routes in
    float32). The aux loss is a float32 scalar.
    Whenever autograd needs gradients, or the module is in training mode, the layer runs a training
    forward (router noise, bias update, stats in ``last_stats``); in eval mode under no_grad it
    runs inference. Up to 4 libmoe contexts are pooled per module and reused between steps.
    .to(device) rebuilds the layer on the new device (parameter objects are kept). Converting to
    another floating dtype (.double(), .half() on a float32 module) is refused; converting to the
    module's own dtype (.bfloat16() on a bfloat16 module, as model.to(dtype) does) changes nothing.
    """

    @property
    def aux_loss_scale(self):
        """Scale of this module's aux-loss gradient with aux_loss="add" (default 1.0)."""
        return self.__dict__.get("_aux_scale", 1.0)

    def set_aux_loss_scale(self, scale):
        """Scale this module's aux-loss gradient (aux_loss="add"), e.g. by 1/num_microbatches when
        the main loss is scaled so (Megatron's MoEAuxLossAutoScaler.set_loss_scale, per module).
        Kept across .to(), pickling and deepcopy."""
        if isinstance(scale, torch.Tensor):
            scale = scale.item()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ArgumentTypeError(f"MoE.set_aux_loss_scale: scale must be a float, not {type(scale).__name__}")
        scale = float(scale)
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise InvalidArgumentError(f"MoE.set_aux_loss_scale: scale is {scale}, must be finite")
        self._aux_scale = scale
        self._engine.aux_loss_scale = scale

    def __init__(self, d_model=None, d_ff=None, num_experts=None, top_k=None, *, preset=None, device=None,
                 dtype=None, aux_loss="add", **config):
        super().__init__()
        if aux_loss not in ("add", "return"):
            raise InvalidArgumentError(f"aux_loss={aux_loss!r}: expected 'add' or 'return'")
        for key, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("top_k", top_k)):
            if value is not None:
                config[key] = value
        if "device_index" in config or "device" in config:
            raise ArgumentTypeError("pass the device as device=torch.device(...) (or 'cuda:1'), not device/device_index fields")
        dtype = torch.float32 if dtype is None else dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, dtype)
        if dtype not in _DTYPES:
            raise ArgumentTypeError(f"dtype {dtype}: libmoe activations are torch.float32, torch.bfloat16 or torch.float16")
        dev = _torch_device(device)
        config["dtype"] = _DTYPES[dtype]
        config["device"] = dev.type
        if dev.type == "cuda":
            config["device_index"] = dev.index
        self.aux_loss_mode = aux_loss
        self._dtype = dtype
        self._layer = Layer(preset=preset, **config)
        self._bind()
        self.aux_loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.last_stats = None

    # ---- the layer's storage as torch tensors -----------------------------------------------------
    def _tensor(self, name, which):
        layer = self._layer
        bf16 = layer.param_dtype(name) == "bfloat16"
        if self._device.type == "cpu":
            view = layer.param_view(name) if which == "data" else layer.grad_view(name)
            if bf16:  # numpy has no bfloat16: the layer's uint16 bits, as int16 (which torch.from_numpy takes)
                return torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(view)
        # The array interface has no bfloat16 either: the same memory as int16, reinterpreted.
        buf = layer._buffer(name, which, bf16_typestr="<i2")
        t = torch.as_tensor(buf, device=self._device)
        return t.view(torch.bfloat16) if bf16 else t

    def _bind(self):
        """(Re)point every parameter and buffer at the layer's storage."""
        layer = self._layer
        self._device = torch.device(layer.device)
        engine = _Engine(layer, self._device)
        engine.aux_loss_scale = self.__dict__.get("_aux_scale", 1.0)
        trainable = []
        for name, info in layer.param_info().items():
            group, attr = name.split(".", 1)
            if group not in self._modules:
                self.add_module(group, _ParamGroup())
            mod = self._modules[group]
            data = self._tensor(name, "data")
            if info.trainable:
                p = mod._parameters.get(attr)
                if p is None:
                    mod.register_parameter(attr, nn.Parameter(data))
                else:
                    with torch.no_grad():
                        p.data = data
                    if p.grad is not None and p.grad.device != data.device:
                        p.grad = p.grad.to(data.device)
                engine.grads[name] = self._tensor(name, "grad")
                trainable.append(name)
            else:
                mod.register_buffer(attr, data)
        engine.trainable = trainable
        self._engine = engine
        self._params = [self._modules[n.split(".", 1)[0]]._parameters[n.split(".", 1)[1]] for n in trainable]

    @classmethod
    def from_pretrained_block(cls, path, prefix=None, family=None, **kwargs):
        """The MoE block of a checkpoint: ``cls(**kwargs)`` (widths, preset, device, dtype: they must
        describe the checkpoint's block), then its parameters loaded from ``path`` (a .safetensors
        file, a model.safetensors.index.json or a directory) by ``family``'s names under ``prefix``,
        e.g. ``MoE.from_pretrained_block("Mixtral-8x7B", "model.layers.0.block_sparse_moe",
        "mixtral", preset="mixtral", d_model=4096, d_ff=14336, dtype=torch.bfloat16)``.
        See libmoe.Layer.load."""
        module = cls(**kwargs)
        module.load_block(path, prefix, family)
        return module

    def load_block(self, path, prefix=None, family=None):
        """Load this module's parameters from a checkpoint in place (libmoe.Layer.load); the
        module's parameter tensors share the layer's storage, so they see the new values."""
        self._layer.load(path, prefix, family)

    def save_block(self, path, prefix=None):
        """Save this module's parameters in libmoe's names (libmoe.Layer.save)."""
        self._layer.save(path, prefix)

    @property
    def layer(self):
        """The underlying libmoe.Layer (config, stats; shares storage with this module)."""
        return self._layer

    @property
    def device(self):
        return self._device

    def _apply(self, fn, *args, **kwargs):
        probe = fn(torch.zeros(1, dtype=torch.float32, device=self._device))
        if not isinstance(probe, torch.Tensor):
            return self
        keeps = probe.dtype in (torch.float32, self._dtype)
        if keeps and self._dtype != torch.float32:  # e.g. .float() would turn the bf16 experts into float32
            keeps = fn(torch.zeros(1, dtype=self._dtype, device=self._device)).dtype == self._dtype
        if not keeps:
            kept = ("float32 parameters" if self._dtype == torch.float32 else
                    f"{_DTYPES[self._dtype]} expert parameters and float32 router parameters")
            raise ArgumentTypeError(f"libmoe.torch.MoE keeps {kept} (asked for {probe.dtype}); the dtype is chosen at "
                            f"construction with dtype=")
        if probe.device != self._device:
            cfg = self._layer.config
            dev = _torch_device(probe.device)
            cfg["device"] = dev.type
            cfg["device_index"] = dev.index if dev.type == "cuda" else 0
            new = Layer(**cfg)
            new.load_state_dict(self._layer.state_dict())
            self._layer = new
            self._bind()
            self.aux_loss = self.aux_loss.to(dev)
        return self

    # ---- pickling / deepcopy: the Layer pickles itself (config + parameters), then rebind ----------
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_engine", None)
        state.pop("_params", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._bind()

    # ---- compute -----------------------------------------------------------------------------------
    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
        d = self._layer.d_model
        if x.dim() < 1 or x.shape[-1] != d:
            raise InvalidArgumentError(f"x has shape {tuple(x.shape)}, expected [..., {d}] (d_model {d})")
        if x.dtype != self._dtype:
            raise ArgumentTypeError(f"x has dtype {x.dtype}, this MoE computes in {self._dtype}")
        if x.device != self._device:
            raise InvalidArgumentError(f"x is on {x.device}, this MoE's layer is on {self._device}")
        shape = x.shape
        x2 = x.reshape(-1, d)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        params = self._params
        need_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        need_ctx = need_grad or self.training
        y, aux = _MoEFunction.apply(x2, self._engine, self.aux_loss_mode, need_ctx, need_grad, *params)
        self.aux_loss = aux.detach()
        self.last_stats = self._engine.last_stats
        y = y.view(shape)
        return (y, aux) if self.aux_loss_mode == "return" else y

    def extra_repr(self):
        c = self._layer.config
        return (f"d_model={c['d_model']}, d_ff={c['d_ff']}, num_experts={c['num_experts']}, top_k={c['top_k']}, "
                f"activation={c['activation']}, device={self._device}, dtype={self._dtype}, "
                f"aux_loss={self.aux_loss_mode!r}")
