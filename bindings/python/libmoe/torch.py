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
  - Activations. The forward and backward hand x.data_ptr(), y.data_ptr(), dy.data_ptr() and
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

How the layer is reached from autograd (one module, chosen by the torch version):
  torch >= 2.4: two custom operators registered with torch.library.custom_op,
      ``torch.ops.libmoe.moe_forward`` and ``torch.ops.libmoe.moe_backward``, the second
      registered as the first's gradient (torch.library.register_autograd). Each has a fake
      implementation (output shapes and dtypes only, no data touched), so torch.compile traces
      through the module without a graph break (fullgraph=True works) and torch.export keeps the
      call as one node. Everything the operators take is a tensor, a list of tensors, an int or a
      bool: the module is named by an int id (a per-process table maps it to the module's layer
      while the module lives; it is a constant of a compiled or exported graph, which therefore
      runs in the process that holds the module), and the libmoe context that one forward fills
      for its backward (a C object) crosses from the forward operator to the backward one as an
      int64 scalar tensor, an output of the forward saved for backward like any activation,
      holding the index of that context in the module's table of live contexts. The tensor's
      storage owns the entry: when autograd (eager, compiled or retain_graph'ed) frees the graph,
      the storage goes and the context returns to the module's pool, exactly when the
      activations it stands for would be freed. The operators check that the parameter tensors
      they are given are the layer's own storage (the only weights libmoe computes with), so
      torch.func.functional_call or any other parameter substitution raises instead of silently
      computing with the module's weights. The router-bias update of a training forward
      (bias_update_rate > 0) is a side effect on the layer's storage, invisible to the graph.
  torch < 2.4 (Debian's 1.13): a torch.autograd.Function with the same rules, holding the
      context on its autograd node.
  Either way a parameter changed in place between forward and backward, and a second backward
  without retain_graph, raise as they do for any PyTorch op (the parameters are saved for
  backward), before any gradient is written.
"""

import itertools
import threading
import typing
import weakref

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._layer import Layer
from .errors import ArgumentTypeError, InvalidArgumentError, StateError, UnsupportedError

__all__ = ["MoE", "CUSTOM_OPS", "merge_expert_shards"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_POOL_MAX = 4  # contexts kept for reuse per module (each holds one forward's activations)


def _torch_version():
    parts = []
    for p in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, p))
        parts.append(int(digits or 0))
    return tuple(parts)


# True when the module runs through the torch.library custom operators (torch >= 2.4).
CUSTOM_OPS = _torch_version() >= (2, 4) and hasattr(torch.library, "custom_op") and hasattr(torch.library,
                                                                                            "register_autograd")

# Module id -> its _Engine, while the module lives (an entry goes with its engine).
_ENGINES = weakref.WeakValueDictionary()
_ids = itertools.count(1)
# Context slots, unique in the process: a handle saved before a module was rebuilt (.to()) never
# names a context of the rebuilt one.
_slots = itertools.count()


class _Engine:
    """What the compute path needs: the layer, its tensors, the contexts. Not a Module."""

    def __init__(self, layer, device):
        self.layer = layer
        self.device = device
        self.pool = []  # idle contexts, reused by later forwards
        self.live = {}  # slot -> context held by an autograd graph (custom-op path)
        self.grads = {}
        self.trainable = []
        self.addresses = []  # data pointers of the trainable parameters, in trainable order
        self.lock = threading.RLock()
        self.last_stats = None
        self.last_aux = 0.0
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

    def check_params(self, params, call):
        if len(params) != len(self.addresses) or any(p.data_ptr() != a for p, a in zip(params, self.addresses)):
            raise InvalidArgumentError(
                f"{call}: the parameter tensors given are not this module's ({', '.join(self.trainable)} over the "
                f"libmoe layer's storage); libmoe computes with its own weights, so parameters cannot be "
                f"substituted (torch.func.functional_call, a copied state) - load them into the module instead")

    def forward(self, x, need_ctx, need_grad):
        """y, the aux-loss value and the context kept for backward (None unless need_grad)."""
        T = x.shape[0]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        with self.lock:
            self.bind_stream()
            mctx = self.acquire() if need_ctx else None
            self.layer._forward_raw(x.data_ptr(), T, y.data_ptr(), mctx)
            stats = mctx.stats() if mctx is not None else None
        self.last_stats = stats
        self.last_aux = stats["aux_loss_total"] if stats else 0.0
        if mctx is not None and not need_grad:
            self.release(mctx)
            mctx = None
        return y, self.last_aux, mctx

    def backward(self, mctx, dy, scale, need_dx, need_params):
        """dx (None unless need_dx) and one gradient per trainable parameter (None where not needed)."""
        dy = dy.contiguous()
        with self.lock:
            self.bind_stream()
            # The library scales the aux-loss gradient it adds (moe_context_set_aux_grad_scale):
            # one backward whatever the scale, 0 included.
            self.layer._set_aux_grad_scale(mctx, scale)
            dx = torch.empty_like(dy) if need_dx else None
            self.layer.zero_grad()
            self.layer._backward_raw(mctx, dy.data_ptr(), None if dx is None else dx.data_ptr())
            grads = [self.grads[n].clone() if w else None for n, w in zip(self.trainable, need_params)]
        return dx, grads

    # ---- contexts held by a graph (custom-op path) ---------------------------------------------------
    def hold(self, mctx):
        """An int64 scalar tensor naming mctx; mctx goes back to the pool when its storage is freed."""
        slot = next(_slots)
        self.live[slot] = mctx
        cell = np.array(slot, dtype=np.int64)
        weakref.finalize(cell, self._drop, slot)  # the tensor's storage keeps cell alive
        return torch.from_numpy(cell)

    def _drop(self, slot):
        mctx = self.live.pop(slot, None)
        if mctx is not None:
            self.release(mctx)

    def held(self, handle):
        slot = int(handle)
        mctx = self.live.get(slot) if slot >= 0 else None
        if mctx is None:
            raise StateError("libmoe.torch.MoE: backward without a saved training forward")
        return mctx


def _engine(moe_id):
    engine = _ENGINES.get(moe_id)
    if engine is None:
        raise StateError(f"libmoe.torch.MoE: module {moe_id} no longer exists (a compiled or exported graph "
                         f"outlived the libmoe.torch.MoE it was made from)")
    return engine


def _aux_scale(engine, aux_return, daux):
    if aux_return:
        return float(daux) if daux is not None else 0.0
    return float(engine.aux_loss_scale)


# ---- torch < 2.4: an autograd.Function -------------------------------------------------------------------
class _Saved:
    """A libmoe Context held by one autograd graph; back to the pool when the graph is freed."""

    __slots__ = ("ctx", "engine")

    def __init__(self, ctx, engine):
        self.ctx, self.engine = ctx, engine

    def __del__(self):
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            self.engine.release(ctx)


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, engine, aux_return, need_ctx, need_grad, *params):
        engine.check_params(params, "libmoe.torch.MoE")
        y, aux_value, mctx = engine.forward(x, need_ctx, need_grad)
        aux = torch.tensor(aux_value, dtype=torch.float32, device=x.device)
        ctx.engine, ctx.aux_return = engine, aux_return
        ctx.saved = _Saved(mctx, engine) if mctx is not None else None
        if need_grad:
            # Saved so that autograd enforces its rules on them: a parameter changed in place
            # before backward (version counters) and a second backward without retain_graph both
            # raise, as for any other op, instead of giving wrong or doubled gradients.
            ctx.save_for_backward(*params)
        if not aux_return:
            ctx.mark_non_differentiable(aux)
        return y, aux

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, daux):
        saved = ctx.saved
        if saved is None or saved.ctx is None:
            raise StateError("libmoe.torch.MoE: backward without a saved training forward")
        ctx.saved_tensors  # noqa: B018 - raises if a parameter changed in place or the graph was freed
        if dy is None:
            raise StateError("libmoe.torch.MoE: no gradient for the output")
        engine = ctx.engine
        need = ctx.needs_input_grad
        dx, grads = engine.backward(saved.ctx, dy, _aux_scale(engine, ctx.aux_return, daux), need[0], need[5:])
        return (dx, None, None, None, None, *grads)


# ---- torch >= 2.4: custom operators ---------------------------------------------------------------------
if CUSTOM_OPS:
    _Tensors = typing.List[torch.Tensor]

    @torch.library.custom_op("libmoe::moe_forward", mutates_args=())
    def _forward_op(x: torch.Tensor, params: _Tensors, moe_id: int, aux_return: bool, need_ctx: bool,
                    need_grad: bool) -> typing.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y = MoE(x) [T, d], the aux-loss total (float32 scalar) and the handle of the context kept
        for backward (int64 scalar; -1 when need_grad is False)."""
        engine = _engine(moe_id)
        engine.check_params(params, "libmoe::moe_forward")
        y, aux_value, mctx = engine.forward(x, need_ctx, need_grad)
        aux = torch.tensor(aux_value, dtype=torch.float32, device=x.device)
        handle = engine.hold(mctx) if mctx is not None else torch.tensor(-1, dtype=torch.int64)
        return y, aux, handle

    @_forward_op.register_fake
    def _forward_fake(x, params, moe_id, aux_return, need_ctx, need_grad):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                x.new_empty((), dtype=torch.float32), torch.empty((), dtype=torch.int64, device="cpu"))

    @torch.library.custom_op("libmoe::moe_backward", mutates_args=())
    def _backward_op(dy: torch.Tensor, daux: torch.Tensor, handle: torch.Tensor, params: _Tensors, moe_id: int,
                     aux_return: bool, need_dx: bool,
                     need_params: typing.List[bool]) -> typing.Tuple[torch.Tensor, _Tensors]:
        """dx (empty [0] unless need_dx) and one gradient per parameter (empty [0] where need_params
        is False) of the forward whose context ``handle`` names."""
        engine = _engine(moe_id)
        engine.check_params(params, "libmoe::moe_backward")
        mctx = engine.held(handle)
        dx, grads = engine.backward(mctx, dy, _aux_scale(engine, aux_return, daux), need_dx, need_params)
        empty = dy.new_empty((0,))
        return (empty if dx is None else dx,
                [p.new_empty((0,)) if g is None else g for p, g in zip(params, grads)])

    @_backward_op.register_fake
    def _backward_fake(dy, daux, handle, params, moe_id, aux_return, need_dx, need_params):
        return (torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else dy.new_empty((0,)),
                [torch.empty_like(p) if w else p.new_empty((0,)) for p, w in zip(params, need_params)])

    def _setup_context(ctx, inputs, output):
        x, params, moe_id, aux_return, need_ctx, need_grad = inputs
        ctx.moe_id, ctx.aux_return = moe_id, aux_return
        # As for the Function path: autograd checks the version counters of saved tensors, so
        # an in-place change of a parameter, or a second backward after the graph was freed,
        # raises before any gradient is written.
        ctx.save_for_backward(output[2], *params)

    def _backward_formula(ctx, dy, daux, dhandle):
        handle, *params = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])
        need_params = [bool(p.requires_grad) for p in params]
        dx, grads = torch.ops.libmoe.moe_backward(dy, daux, handle, params, ctx.moe_id, ctx.aux_return, need_dx,
                                                  need_params)
        return (dx if need_dx else None, [g if w else None for g, w in zip(grads, need_params)], None, None, None,
                None)

    torch.library.register_autograd("libmoe::moe_forward", _backward_formula, setup_context=_setup_context)


class _ParamGroup(nn.Module):
    """Holds the parameters of one prefix ("router", "experts", "shared") of the libmoe layer."""

    def _apply(self, fn, *args, **kwargs):
        raise RuntimeError("move or convert the libmoe.torch.MoE that owns these parameters, not its group: "
                           "their storage belongs to the libmoe layer")

    def forward(self, *args):
        raise RuntimeError("a libmoe parameter group is not callable; call the MoE module")


_EXTRA = "experts._extra_state"  # the expert range of an expert-parallel module's state_dict


class _ExpertGroup(_ParamGroup):
    """The ``experts`` group of an expert-parallel module: its state_dict carries which of the
    global experts it holds (``experts._extra_state``: num_experts, experts [first, end), ep_size),
    so that a state dict written at one EP size can be loaded at another (see MoE.load_state_dict)."""

    def __init__(self, num_experts, first, end, ep_size):
        super().__init__()
        self._range = dict(num_experts=num_experts, experts=(first, end), ep_size=ep_size)

    def get_extra_state(self):
        return dict(self._range)

    def set_extra_state(self, state):
        # MoE's load pre-hook has already sliced the tensors to this rank's range and put this
        # rank's range here; anything else is a state dict that did not pass through it.
        if not isinstance(state, dict) or tuple(state.get("experts", ())) != tuple(self._range["experts"]):
            raise InvalidArgumentError(f"experts._extra_state {state!r}: this module holds experts "
                                       f"{self._range['experts']} of {self._range['num_experts']}")


def _expert_range(state, prefix, num_experts, rows):
    """(first, end) of the global experts a state dict's expert tensors hold: its extra state when
    present, else all of them when they have num_experts rows, else None."""
    meta = state.get(prefix + _EXTRA)
    if isinstance(meta, dict) and "experts" in meta:
        if meta.get("num_experts") != num_experts:
            raise InvalidArgumentError(f"{prefix}{_EXTRA}: a state dict of {meta.get('num_experts')} experts, this module "
                                       f"has {num_experts}")
        first, end = (int(v) for v in meta["experts"])
        return first, end
    return (0, num_experts) if rows == num_experts else None


def merge_expert_shards(state_dicts):
    """One state dict with every expert from the state dicts of the ranks of an expert-parallel
    module (each with its ``experts._extra_state``, e.g. the files each rank saved), in any order:
    expert tensors concatenated in expert order, everything else from the first (the replicated
    parameters are the same on every rank when their gradients are summed over the ranks). Loads
    into a module of any EP size, or none. Raises InvalidArgumentError when the shards do not cover
    every expert exactly once."""
    shards = list(state_dicts)
    if not shards:
        raise InvalidArgumentError("merge_expert_shards: no state dicts")
    ranges = []
    for i, sd in enumerate(shards):
        meta = sd.get(_EXTRA)
        if not isinstance(meta, dict) or "experts" not in meta or "num_experts" not in meta:
            raise InvalidArgumentError(f"merge_expert_shards: state dict {i} has no {_EXTRA} (not from an expert-parallel "
                                       "libmoe.torch.MoE)")
        ranges.append((tuple(int(v) for v in meta["experts"]), int(meta["num_experts"]), i))
    ranges.sort()
    num_experts = ranges[0][1]
    expect = 0
    for (first, end), e, i in ranges:
        if e != num_experts or first != expect:
            got = ", ".join(f"{r} of {n}" for r, n, _ in ranges)
            raise InvalidArgumentError(f"merge_expert_shards: the shards hold experts {got}: they must cover "
                                       f"[0, {num_experts}) once, in pieces")
        expect = end
    if expect != num_experts:
        raise InvalidArgumentError(f"merge_expert_shards: the shards end at expert {expect} of {num_experts}")
    order = [i for _, _, i in ranges]
    merged = {}
    for key, value in shards[0].items():
        if key == _EXTRA:
            continue
        if key.startswith("experts."):
            value = torch.cat([shards[i][key] for i in order], dim=0)
        merged[key] = value
    return merged


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
    "return" (see the module docstring); ep_group: a torch.distributed process group over whose
    ranks the experts are spread (expert parallelism, CPU; see libmoe.distributed).

    Input [..., d_model] in dtype on device; output the same shape and dtype. Expert weights
    (``experts.*``, ``shared.w1/w3/w2``) are parameters of dtype; the router's (``router.*``,
    ``shared.gate``) are float32 whatever dtype is (libmoe accumulates in float32 and routes in
    float32). The aux loss is a float32 scalar.
    Whenever autograd needs gradients, or the module is in training mode, the layer runs a training
    forward (router noise, bias update, stats in ``last_stats``); in eval mode under no_grad it
    runs inference. Up to 4 libmoe contexts are pooled per module and reused between steps.
    torch.compile and torch.export see the module as one custom operator (torch >= 2.4, see the
    module docstring); ``aux_loss`` and ``last_stats`` are those of the latest forward that ran,
    compiled or not.
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

    @property
    def aux_loss(self):
        """The coefficient-weighted aux-loss total of the latest forward, a detached float32 scalar
        tensor on the module's device (0 after an inference forward)."""
        return torch.tensor(self._engine.last_aux, dtype=torch.float32, device=self._device)

    @property
    def last_stats(self):
        """Routing statistics of the latest training forward (a dict, see libmoe.Context.stats);
        None after an inference forward."""
        return self._engine.last_stats

    def __init__(self, d_model=None, d_ff=None, num_experts=None, top_k=None, *, preset=None, device=None,
                 dtype=None, aux_loss="add", ep_group=None, **config):
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
        self._ep_group = ep_group
        if ep_group is None:
            self._layer = Layer(preset=preset, **config)
        else:
            from . import distributed
            self._layer = distributed.Layer(ep_group, preset=preset, **config)
        self._moe_id = next(_ids)
        self._bind()

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
                if group == "experts" and self.__dict__.get("_ep_group") is not None:
                    comm = layer.comm
                    local = layer.num_experts // comm.size
                    self.add_module(group, _ExpertGroup(layer.num_experts, comm.rank * local, (comm.rank + 1) * local,
                                                        comm.size))
                else:
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
        self._param_keys = [tuple(n.split(".", 1)) for n in trainable]
        engine.addresses = [p.data_ptr() for p in self._current_params()]
        old = self.__dict__.get("_engine")
        if old is not None:  # a rebind (.to()) keeps the statistics of the latest forward
            engine.last_stats, engine.last_aux = old.last_stats, old.last_aux
        self._engine = engine
        self._d_model = layer.d_model
        _ENGINES[self._moe_id] = engine

    def _current_params(self):
        # Read at every call, not cached: a parameter substituted from outside
        # (torch.func.functional_call) is then seen, and refused by the compute path.
        return [self._modules[group]._parameters[attr] for group, attr in self._param_keys]

    # ---- state dicts across expert-parallel sizes ---------------------------------------------------
    @property
    def expert_range(self):
        """(first, end): the global experts this module holds, (0, num_experts) without ep_group."""
        comm = getattr(self._layer, "comm", None)
        if self.__dict__.get("_ep_group") is None or comm is None:
            return 0, self._layer.num_experts
        local = self._layer.num_experts // comm.size
        return comm.rank * local, (comm.rank + 1) * local

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Runs before the parameter groups load theirs, from the same dict (a hook would work too,
        # but a bound method in the module's hook table is a reference cycle that keeps the module,
        # and with it a process group, alive until the interpreter's teardown).
        self._take_expert_slice(state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _take_expert_slice(self, state_dict, prefix, error_msgs):
        """A state dict of any expert-parallel size (its experts._extra_state says which experts it
        holds) or of all the experts loads into this module, which takes its own experts' rows; one
        that lacks some of them is an error naming both ranges."""
        num_experts = self._layer.num_experts
        first, end = self.expert_range
        rows = None
        for key, value in state_dict.items():
            if key.startswith(prefix + "experts.") and key != prefix + _EXTRA and isinstance(value, torch.Tensor):
                rows = value.shape[0] if value.dim() else None
                break
        try:
            held = None if rows is None else _expert_range(state_dict, prefix, num_experts, rows)
        except InvalidArgumentError as e:
            error_msgs.append(str(e))
            return
        if rows is not None and held is None:
            if rows == end - first:  # no range recorded (an older state dict): taken to be this rank's own
                held = (first, end)
            else:
                error_msgs.append(f"{prefix}experts.*: {rows} experts and no {_EXTRA} to say which; this module holds "
                                  f"experts [{first}, {end}) of {num_experts}")
                return
        state_dict.pop(prefix + _EXTRA, None)
        if held is not None and held != (first, end):
            lo, hi = held
            if not (lo <= first and end <= hi):
                error_msgs.append(f"{prefix}experts.*: the state dict holds experts [{lo}, {hi}) of {num_experts}, this "
                                  f"module needs [{first}, {end}): load the state dict of a rank that has them, or one "
                                  "with every expert (MoE.full_state_dict, libmoe.torch.merge_expert_shards)")
                return
            for key in list(state_dict):
                value = state_dict[key]
                if key.startswith(prefix + "experts.") and isinstance(value, torch.Tensor):
                    if value.dim() == 0 or value.shape[0] != hi - lo:
                        error_msgs.append(f"{key}: {tuple(value.shape)} rows, expected {hi - lo} (experts [{lo}, {hi}))")
                        return
                    state_dict[key] = value[first - lo:end - lo]
        if isinstance(self._modules.get("experts"), _ExpertGroup):
            state_dict[prefix + _EXTRA] = self._modules["experts"].get_extra_state()

    def full_state_dict(self):
        """The state dict with every expert (as a module without ep_group holds them): collective
        over ep_group, each rank's experts gathered with all_gather; without ep_group, a copy of
        state_dict(). Loads into a module of any EP size."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if k != _EXTRA}
        if self.__dict__.get("_ep_group") is None:
            return state
        import torch.distributed as dist
        group = self._layer.comm.group
        size = dist.get_world_size(group)
        for key, value in state.items():
            if key.startswith("experts."):
                # float32 through the collective (gloo may lack 16-bit types); exact for bf16/f16.
                local = value.float().contiguous()
                parts = [torch.empty_like(local) for _ in range(size)]
                dist.all_gather(parts, local, group=group)
                state[key] = torch.cat(parts, dim=0).to(value.dtype)
        return state

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

    def save_block(self, path, prefix=None, family=None):
        """Save this module's parameters in libmoe's names, or in ``family``'s (libmoe.Layer.save). With ep_group it is
        collective: every expert is gathered (full_state_dict) and the group's first rank writes the
        file through a layer holding all of them, so that load_block (moe_layer_load, which reads each
        rank's slice) loads it at any EP size; every rank raises if the write failed."""
        if self.__dict__.get("_ep_group") is None:
            self._layer.save(path, prefix, family)
            return
        import torch.distributed as dist
        full = self.full_state_dict()
        group = self._layer.comm.group
        error = None
        if dist.get_rank(group) == 0:
            try:
                one = Layer(**self._layer.config)  # the same config without the comm: every expert
                one.load_state_dict({k: np.ascontiguousarray(v.float().numpy()) for k, v in full.items()})
                one.save(path, prefix, family)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others hear of it
                error = e
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(failed, group=group)
        if error is not None:
            raise error
        if int(failed.item()):
            raise StateError(f"save_block({path!r}): the ep_group's first rank failed to write the file")

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
            if self.__dict__.get("_ep_group") is not None:
                raise UnsupportedError(f"an expert-parallel libmoe.torch.MoE stays on {self._device}")
            cfg = self._layer.config
            dev = _torch_device(probe.device)
            cfg["device"] = dev.type
            cfg["device_index"] = dev.index if dev.type == "cuda" else 0
            new = Layer(**cfg)
            new.load_state_dict(self._layer.state_dict())
            self._layer = new
            self._bind()
        return self

    # ---- pickling / deepcopy: the Layer pickles itself (config + parameters), then rebind ----------
    def __getstate__(self):
        if self.__dict__.get("_ep_group") is not None:
            raise TypeError("an expert-parallel libmoe.torch.MoE cannot be pickled or deep-copied: it holds this "
                            "rank's experts and a process group; save its state_dict() instead")
        state = self.__dict__.copy()
        for key in ("_engine", "_param_keys", "_moe_id"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        for key in ("aux_loss", "last_stats"):  # plain attributes in earlier versions, properties now
            state.pop(key, None)
        super().__setstate__(state)
        self._moe_id = next(_ids)  # a copy is another module: its own id and contexts
        self._bind()

    # ---- compute -----------------------------------------------------------------------------------
    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
        d = self._d_model
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
        params = self._current_params()
        need_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        need_ctx = need_grad or self.training
        aux_return = self.aux_loss_mode == "return"
        if CUSTOM_OPS:
            y, aux, _ = _forward_op(x2, params, self._moe_id, aux_return, need_ctx, need_grad)
        else:
            y, aux = _MoEFunction.apply(x2, self._engine, aux_return, need_ctx, need_grad, *params)
        y = y.view(shape)
        return (y, aux) if aux_return else y

    def extra_repr(self):
        c = self._layer.config
        return (f"d_model={c['d_model']}, d_ff={c['d_ff']}, num_experts={c['num_experts']}, top_k={c['top_k']}, "
                f"activation={c['activation']}, device={self._device}, dtype={self._dtype}, "
                f"aux_loss={self.aux_loss_mode!r}")
