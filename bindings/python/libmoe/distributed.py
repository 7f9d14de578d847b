"""Expert parallelism over a torch.distributed process group.

    import torch.distributed as dist, libmoe.torch
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # torchrun sets the rest
    moe = libmoe.torch.MoE(d_model=512, d_ff=1024, num_experts=8, top_k=2, ep_group=dist.group.WORLD)

Each rank's layer holds num_experts / R experts (rank r the experts [r*E/R, (r+1)*E/R), as moe.h
says) and its tokens travel to the experts' ranks through ``all_to_all_single`` of the group; the
layer's two moe_comm hooks (exchange_counts, exchange_rows) are Python functions that libmoe calls
during moe_forward/moe_backward, on the calling thread. CPU layers on a gloo (or any CPU-capable)
group; CUDA layers are refused for now (UnsupportedError).

Every rank must make the same sequence of forward/backward calls (moe.h: they are collective).
The router's and shared experts' gradients hold each rank's share: sum them over the group
(``dist.all_reduce``, SUM) to get the global batch's, as data parallelism does; the experts'
gradients are complete and must not be reduced. The aux losses and statistics are the global
batch's on every rank.

Checkpoints at any EP size: a module's ``state_dict()`` holds this rank's experts and says which
(``experts._extra_state``: num_experts, experts (first, end), ep_size); ``load_state_dict`` takes a
state dict of any EP size whose experts include this rank's (e.g. the file of the save-time rank
that held them) or of all the experts, and keeps its own rows. ``MoE.full_state_dict()``
(collective) gathers every expert; ``libmoe.torch.merge_expert_shards([sd0, sd1, ...])`` merges
the ranks' files offline. Both load into a module of any EP size, or into one without ep_group.
``MoE.save_block(path)`` (collective) writes one safetensors file of every expert (moe_layer_save
through the first rank); ``load_block`` (moe_layer_load) reads each rank's slice of it at any EP size.

No hangs: an exchange waits as long as the process group's own timeout (``timeout=`` of
init_process_group/new_group), which gloo enforces. When an exchange fails (the timeout passed,
a peer died, the group broke) the forward or backward raises libmoe.CommError naming the exchange,
this rank and torch's reason; the context is left empty and the parameters unchanged. The comm is
then unusable, because the ranks no longer agree on which exchange comes next: every later call
fails at once with the same reason. Make a new group and a new module to carry on.
"""

import ctypes
import weakref

import numpy as np
import torch
import torch.distributed as dist

from . import _layer, capi
from .errors import ArgumentTypeError, InvalidArgumentError, StateError, UnsupportedError

__all__ = ["ProcessGroupComm", "Layer"]

_STATUS = ctypes.c_int  # moe_status, a C enum
_I64P = ctypes.POINTER(ctypes.c_int64)
_COUNTS_FN = ctypes.CFUNCTYPE(_STATUS, ctypes.c_void_p, _I64P, _I64P)
_ROWS_FN = ctypes.CFUNCTYPE(_STATUS, ctypes.c_void_p, ctypes.c_void_p, _I64P, ctypes.c_void_p, _I64P, ctypes.c_size_t,
                            ctypes.c_void_p)
_LAST_ERROR_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)  # const char *: an address we keep alive


class _CComm(ctypes.Structure):
    """struct moe_comm (moe.h), field for field."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("size", ctypes.c_int), ("rank", ctypes.c_int),
                ("user", ctypes.c_void_p), ("exchange_counts", _COUNTS_FN), ("exchange_rows", _ROWS_FN),
                ("last_error", _LAST_ERROR_FN)]


def _host_bytes(address, nbytes):
    """A uint8 tensor over nbytes of host memory at address (no copy)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    a = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
    return torch.from_numpy(a)


def _call(ref, method, *args):
    """A hook's call into its ProcessGroupComm; MOE_ERR_COMM (or NULL text) once it is gone."""
    comm = ref()
    if comm is None:  # libmoe outlived the comm: cannot happen through libmoe.distributed.Layer
        return None if method == "_last_error" else capi.MOE_ERR_COMM
    return getattr(comm, method)(*args)


class ProcessGroupComm:
    """A moe_comm whose hooks run ``all_to_all_single`` on ``group`` (a torch.distributed
    ProcessGroup; None: the default group). ``address`` is the struct's address, for
    moe_config.comm; keep this object alive as long as any layer made with it."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise StateError("ep_group: torch.distributed is not initialised (dist.init_process_group first)")
        group = dist.group.WORLD if group is None else group
        try:
            rank, size = dist.get_rank(group), dist.get_world_size(group)
        except Exception as e:  # noqa: BLE001 - torch says why, in its own exception type
            raise ArgumentTypeError(f"ep_group: not a usable torch.distributed process group ({e})") from e
        if rank < 0:
            raise InvalidArgumentError("ep_group: this process is not a member of the group")
        self.group, self.rank, self.size = group, rank, size
        self._broken = None  # the reason, once an exchange failed
        self._error = ctypes.create_string_buffer(2048)
        # The C function pointers must live as long as the struct: they are kept here. They call
        # this object through a weak reference, so that no cycle keeps the comm (and with it the
        # process group) alive after its layer is gone.
        me = weakref.ref(self)
        self._hooks = (_COUNTS_FN(lambda _u, s, r: _call(me, "_exchange_counts", s, r)),
                       _ROWS_FN(lambda _u, *a: _call(me, "_exchange_rows", *a)),
                       _LAST_ERROR_FN(lambda _u: _call(me, "_last_error")))
        self._c = _CComm(ctypes.sizeof(_CComm), size, rank, None, *self._hooks)

    @property
    def address(self):
        return ctypes.addressof(self._c)

    @property
    def broken(self):
        """None while usable, else why an exchange failed."""
        return self._broken

    def __repr__(self):
        return f"<libmoe.distributed.ProcessGroupComm rank {self.rank} of {self.size}>"

    # ---- the hooks: called by libmoe through ctypes, which holds the GIL for them; nothing may
    # escape them (ctypes would print it and return 0, MOE_OK), so every failure becomes a status.
    def _fail(self, what, e):
        reason = (f"{what} failed on rank {self.rank} of {self.size}: {type(e).__name__}: {e} "
                  "(the wait is bounded by the process group's timeout); this comm is unusable from now on")
        self._broken = reason
        self._set_error(reason)
        return capi.MOE_ERR_COMM

    def _set_error(self, text):
        data = text.encode("utf-8", "replace")[: len(self._error) - 1]
        self._error.value = data

    def _refused(self, what):
        if self._broken is None:
            return None
        self._set_error(f"{what}: not attempted: an earlier exchange failed: {self._broken}")
        return capi.MOE_ERR_COMM

    def _exchange_counts(self, send, recv):
        what = "exchange_counts (all_to_all_single of row counts)"
        try:
            refused = self._refused(what)
            if refused is not None:
                return refused
            n = self.size
            s = torch.from_numpy(np.ctypeslib.as_array(send, (n,)).copy())
            r = torch.from_numpy(np.ctypeslib.as_array(recv, (n,)))
            dist.all_to_all_single(r, s, group=self.group)
            return capi.MOE_OK
        except BaseException as e:  # noqa: BLE001 - see above: nothing crosses back into C
            return self._fail(what, e)

    def _exchange_rows(self, send, send_counts, recv, recv_counts, row_bytes, stream):
        what = "exchange_rows (all_to_all_single of rows)"
        try:
            refused = self._refused(what)
            if refused is not None:
                return refused
            if stream:  # a CUDA layer: refused when the layer is made, so never expected here
                self._set_error(f"{what}: device buffers are not supported by libmoe.distributed yet")
                return capi.MOE_ERR_UNSUPPORTED
            n = self.size
            sc = [int(send_counts[i]) for i in range(n)]
            rc = [int(recv_counts[i]) for i in range(n)]
            s = _host_bytes(send, sum(sc) * row_bytes).view(-1, row_bytes) if row_bytes else None
            r = _host_bytes(recv, sum(rc) * row_bytes).view(-1, row_bytes) if row_bytes else None
            if s is None:
                self._set_error(f"{what}: row_bytes is 0")
                return capi.MOE_ERR_INVALID_ARGUMENT
            dist.all_to_all_single(r, s, output_split_sizes=rc, input_split_sizes=sc, group=self.group)
            return capi.MOE_OK
        except BaseException as e:  # noqa: BLE001
            return self._fail(what, e)

    def _last_error(self):
        return ctypes.addressof(self._error)


class _CommLayerHandle(_layer._LayerHandle):
    """A layer handle that also keeps the layer's comm alive: __del__ destroys the layer first,
    the comm goes with the slots afterwards."""
    __slots__ = ("comm",)


class Layer(_layer.Layer):
    """``libmoe.Layer`` whose experts are spread over the ranks of ``ep_group`` (see the module
    docstring): ``Layer(ep_group, d_model=..., num_experts=..., ...)``. Parameters and gradients
    are this rank's: ``experts.*`` have num_experts / R rows."""

    def __init__(self, ep_group=None, preset=None, **config):
        comm = ProcessGroupComm(ep_group)
        cfg = _layer.make_config(preset, config)
        if cfg.device != capi.MOE_DEVICE_CPU:
            raise UnsupportedError("ep_group: expert parallelism over a torch.distributed group is implemented "
                                   "for CPU layers only (device='cpu'); for CUDA use libmoe_nccl from C")
        cfg.set_comm_address(comm.address)
        handle = _CommLayerHandle(capi.moe_layer_create(cfg))
        handle.comm = comm
        self._h = handle
        self._init_info()

    @property
    def comm(self):
        """The ProcessGroupComm (rank, size, group, broken)."""
        return self._handle().comm

    @property
    def expert_range(self):
        """(first, end): the global experts this rank holds."""
        local = self.num_experts // self.comm.size
        return self.comm.rank * local, (self.comm.rank + 1) * local

    def state_dict(self):
        """This rank's parameters, plus ``experts._extra_state``: which of the global experts they
        are (num_experts, experts (first, end), ep_size), as libmoe.torch.MoE's state dict says."""
        state = super().state_dict()
        state["experts._extra_state"] = dict(num_experts=self.num_experts, experts=self.expert_range,
                                             ep_size=self.comm.size)
        return state

    def load_state_dict(self, state, strict=True):
        """Like libmoe.Layer.load_state_dict, from a state dict of any EP size whose experts include
        this rank's (its ``experts._extra_state`` says which it holds) or of all the experts: this rank
        keeps its own rows. InvalidArgumentError when the experts it needs are not there."""
        state = dict(state)
        meta = state.pop("experts._extra_state", None)
        first, end = self.expert_range
        E = self.num_experts
        for name in [k for k in state if k.startswith("experts.")]:
            value = np.asarray(state[name])
            rows = value.shape[0] if value.ndim else 0
            if isinstance(meta, dict) and "experts" in meta:
                if meta.get("num_experts") != E:
                    raise InvalidArgumentError(f"load_state_dict: a state dict of {meta.get('num_experts')} experts, "
                                               f"this layer has {E}")
                lo, hi = (int(v) for v in meta["experts"])
            elif rows == E:
                lo, hi = 0, E
            elif rows == end - first:
                lo, hi = first, end  # no range recorded: taken to be this rank's own
            else:
                raise InvalidArgumentError(f"load_state_dict: {name} has {rows} experts and no experts._extra_state; "
                                           f"this rank holds experts [{first}, {end}) of {E}")
            if rows != hi - lo or not (lo <= first and end <= hi):
                raise InvalidArgumentError(f"load_state_dict: {name} holds experts [{lo}, {hi}) of {E} ({rows} rows), "
                                           f"this rank needs [{first}, {end})")
            state[name] = value[first - lo:end - lo]
        super().load_state_dict(state, strict)

    def __reduce__(self):
        raise TypeError("an expert-parallel libmoe Layer cannot be pickled or copied: it holds this rank's "
                        "experts and a process group; save state_dict() instead")
