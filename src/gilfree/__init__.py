"""gilfree: use every core from Python.

- ``gilfree.Pool``: a process pool with a C core (shared-memory rings, zero-copy buffers).
- ``gilfree.gil``: exact GIL accounting; ``python -m gilfree diagnose script.py``.
- ``gilfree.priority``: thread priorities for the GIL on stock CPython.
"""
import importlib
import threading  # noqa: F401 - the exit then runs threading's shutdown, after which a Pool refuses to start (see pool.py)

__all__ = ["Pool", "WorkerCrashed", "TaskTimeout", "UnsupportedInterpreter", "gil", "priority"]
__version__ = "0.1.0"

# Everything loads on first use: workers import this package too, and pool start-up time is
# mostly the template process importing things.
_LAZY = {
    "Pool": "pool",
    "WorkerCrashed": "errors",
    "TaskTimeout": "errors",
    "UnsupportedInterpreter": "errors",
    "gil": None,
    "priority": None,
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
