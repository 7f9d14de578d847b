"""Exceptions raised by libmoe.

Every failed libmoe call raises a subclass of :class:`MoeError` chosen by its ``moe_status``;
each also derives from the built-in exception a Python caller would expect, so existing
``except ValueError`` / ``except MemoryError`` code keeps working::

    MoeError(Exception)                 .status ("MOE_ERR_..."), .code (int), .message
      InvalidArgumentError(ValueError)  MOE_ERR_INVALID_ARGUMENT
      OutOfMemoryError(MemoryError)     MOE_ERR_OUT_OF_MEMORY
      UnsupportedError(NotImplementedError)  MOE_ERR_UNSUPPORTED
      DeviceError(RuntimeError)         MOE_ERR_DEVICE
      CommError(RuntimeError)           MOE_ERR_COMM
      StateError(RuntimeError)          MOE_ERR_STATE
      NonFiniteError(ValueError)        MOE_ERR_NONFINITE
      InternalError(RuntimeError)       MOE_ERR_INTERNAL (a libmoe bug: please report it)

      ArgumentTypeError(InvalidArgumentError, TypeError)
                                        an argument of the wrong type (a list where an array is
                                        expected, float64 where float32 is) found by the binding
      ClosedError(StateError, ValueError)
                                        a closed Layer or Context was used (ValueError, like a
                                        closed file)

Every error the binding raises is a MoeError, including the checks it makes before calling the
library (an array of the wrong dtype or shape, an unknown keyword, a context of another layer):
``except libmoe.MoeError`` catches them all, and each message names the call and the argument.
"""

__all__ = [
    "MoeError", "InvalidArgumentError", "OutOfMemoryError", "UnsupportedError", "DeviceError",
    "CommError", "StateError", "NonFiniteError", "InternalError", "ArgumentTypeError", "ClosedError",
    "from_status",
]


class MoeError(Exception):
    """A libmoe call returned a status other than MOE_OK.

    Attributes: ``status`` the status name (e.g. ``"MOE_ERR_INVALID_ARGUMENT"``), ``code`` its
    integer value, ``message`` the library's moe_last_error() text for the failed call.
    """

    status = "MOE_ERR_UNKNOWN"
    code = -1

    def __init__(self, message="", status=None, code=None):
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(f"{self.status}: {message}" if message else self.status)

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.status, self.code))


def _rebuild(cls, message, status, code):
    return cls(message, status, code)


class InvalidArgumentError(MoeError, ValueError):
    status, code = "MOE_ERR_INVALID_ARGUMENT", 1


class OutOfMemoryError(MoeError, MemoryError):
    status, code = "MOE_ERR_OUT_OF_MEMORY", 2


class UnsupportedError(MoeError, NotImplementedError):
    status, code = "MOE_ERR_UNSUPPORTED", 3


class DeviceError(MoeError, RuntimeError):
    status, code = "MOE_ERR_DEVICE", 4


class CommError(MoeError, RuntimeError):
    status, code = "MOE_ERR_COMM", 5


class StateError(MoeError, RuntimeError):
    status, code = "MOE_ERR_STATE", 6


class NonFiniteError(MoeError, ValueError):
    status, code = "MOE_ERR_NONFINITE", 7


class InternalError(MoeError, RuntimeError):
    status, code = "MOE_ERR_INTERNAL", 8


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type, found by the binding (status MOE_ERR_INVALID_ARGUMENT)."""


class ClosedError(StateError, ValueError):
    """A closed Layer or Context was used (status MOE_ERR_STATE; a ValueError, like a closed file)."""


_BY_CODE = {cls.code: cls for cls in (InvalidArgumentError, OutOfMemoryError, UnsupportedError, DeviceError,
                                      CommError, StateError, NonFiniteError, InternalError)}


def from_status(code, name, message):
    """The exception for status ``code`` (called by the SWIG wrapper on every failed call)."""
    cls = _BY_CODE.get(code, MoeError)
    return cls(message, name, code)
