"""gilfree: use every core from Python.

- ``gilfree.Pool``: a process pool with a C core (shared-memory rings, zero-copy buffers).
- ``gilfree.gil``: exact GIL accounting; ``python -m gilfree diagnose script.py``.
- ``gilfree.priority``: thread priorities for the GIL on stock CPython.
"""
import importlib

from .errors import TaskTimeout, UnsupportedInterpreter, WorkerCrashed
from .pool import Pool

__all__ = ["Pool", "WorkerCrashed", "TaskTimeout", "UnsupportedInterpreter", "gil", "priority"]
__version__ = "0.1.0"

_LAZY_SUBMODULES = {"gil", "priority"}


def __getattr__(name):
    # Workers import gilfree too: the GIL tools load only when a program asks for them.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
