"""libmoe: a Mixture-of-Experts layer (routing, forward, backward, auxiliary losses) behind a C ABI.

    import numpy as np, libmoe
    layer = libmoe.Layer(d_model=64, d_ff=128, num_experts=8, top_k=2)
    ctx = layer.context()
    y = layer.forward(np.random.randn(16, 64).astype(np.float32), ctx)   # training forward
    dx = layer.backward(ctx, np.ones_like(y))                            # grads += ..., aux included
    ctx.stats()["aux_loss_total"], layer.get_grad("experts.w1")

``dtype="bfloat16"`` or ``"float16"`` layers store activations and expert weights in that dtype
(see libmoe.Layer); numpy callers may keep passing float32.

``libmoe.torch.MoE`` is the PyTorch module (imported on first use of ``libmoe.torch``).
``libmoe.capi`` is the SWIG module: moe.h one to one, addresses for tensors.
Failures raise :class:`libmoe.MoeError` subclasses (see :mod:`libmoe.errors`).
"""

import importlib as _importlib

from . import capi
from .errors import (ArgumentTypeError, ClosedError, CommError, DeviceError, InternalError, InvalidArgumentError,
                     MoeError, NonFiniteError, OutOfMemoryError, StateError, UnsupportedError)
from ._config import ConfigField, config_fields, presets
from ._layer import (CONFIG_FIELDS, PRESETS, Context, Layer, ParamInfo, default_config, from_bfloat16_bits,
                     preset_config, to_bfloat16_bits)

__version__ = f"{capi.MOE_VERSION_MAJOR}.{capi.MOE_VERSION_MINOR}.{capi.MOE_VERSION_PATCH}"

__all__ = ["Layer", "Context", "ParamInfo", "MoeError", "InvalidArgumentError", "OutOfMemoryError",
           "UnsupportedError", "DeviceError", "CommError", "StateError", "NonFiniteError", "InternalError",
           "ArgumentTypeError", "ClosedError",
           "CONFIG_FIELDS", "PRESETS", "ConfigField", "config_fields", "presets", "default_config", "preset_config",
           "to_bfloat16_bits",
           "from_bfloat16_bits", "library_version", "status_name", "last_error", "capi"]


def library_version():
    """Version of the libmoe shared library actually loaded, as "MAJOR.MINOR.PATCH"."""
    v = capi.moe_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def status_name(code):
    """Name of a moe_status code, e.g. status_name(1) == "MOE_ERR_INVALID_ARGUMENT"."""
    return capi.moe_status_name(code)


def last_error():
    """moe_last_error(): this thread's text for its most recent failed libmoe call ("" if none)."""
    return capi.moe_last_error()


# The extension was built against this header version; the loaded library must speak the same ABI
# (same major, and during 0.x the same minor) and be at least as new.
_loaded = capi.moe_version()
if (_loaded // 10000 != capi.MOE_VERSION_MAJOR or (capi.MOE_VERSION_MAJOR == 0 and _loaded // 100 % 100 != capi.MOE_VERSION_MINOR)
        or _loaded < capi.MOE_VERSION_NUMBER):
    raise ImportError(f"libmoe: the loaded library is version {library_version()} but this binding was built "
                      f"for {__version__}")
del _loaded


def __getattr__(name):
    # libmoe.torch is imported on first use, so `import libmoe` does not need PyTorch.
    if name == "torch":
        return _importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'libmoe' has no attribute {name!r}")
