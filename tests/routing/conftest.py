"""The routing suite reuses the oracle suite's ctypes wrapper and helpers (tests/python)."""
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
if _PY not in sys.path:
    sys.path.insert(0, os.path.abspath(_PY))
