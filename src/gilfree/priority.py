"""gilfree.priority: David Beazley's thread priorities for the GIL, on stock CPython 3.11-3.13.

``gilfree.priority.set(level)`` gives the calling thread a GIL priority (an int: 0 is the
default, negative is background, positive is urgent - Beazley's ``sys.setpriority``);
``with gilfree.priority.background(): ...`` runs a block of CPU work at -1. Then:

- a thread that waits for the GIL while a lower-priority thread holds it has the holder
  asked to drop it at once, instead of after the switch interval (5 ms);
- a lower-priority thread does not take the GIL back ahead of a waiting higher-priority one
  (for at most 5 ms per wait, so a background thread is slowed, never starved forever);
- between equal priorities CPython's behaviour is unchanged.

Built on the GIL hooks of gilfree.gil (see docs/priority.md). ``uninstall()`` puts every
thread back to 0 and removes the hooks priorities installed.
"""
import contextlib
import operator
import threading
import warnings

from .errors import UnsupportedInterpreter
from .gil import _hook

__all__ = ["set", "get", "background", "uninstall", "UnsupportedInterpreter"]

_lock = threading.Lock()
_installed = False  # whether priorities hold one user of the GIL hooks


def set(level):  # noqa: A001 - the name the issue fixes (Beazley's sys.setpriority)
    """Sets the calling thread's GIL priority (clamped to +-8). Raises UnsupportedInterpreter
    where priorities cannot be had (CPython's default behaviour then stays)."""
    global _installed
    level = operator.index(level)  # an integer: 1.5 or "1" is a mistake, not a level
    hook = _hook()
    with _lock:
        if level != 0 and not _installed:
            hook.acquire(False, 0, False)
            _installed = True
    hook.set_priority(level)


def get():
    """The calling thread's GIL priority (0 where priorities are unavailable)."""
    try:
        return _hook().get_priority()
    except UnsupportedInterpreter:
        return 0


@contextlib.contextmanager
def background(level=-1):
    """Runs the block at a lower GIL priority, then restores the thread's previous one.

    Where priorities are unavailable it warns once and runs the block unchanged.
    """
    previous = get()
    try:
        set(level)
    except UnsupportedInterpreter as exc:
        warnings.warn(f"gilfree.priority unavailable, running with CPython's default GIL: {exc}", RuntimeWarning, stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        set(previous)


def uninstall():
    """Sets every thread's priority back to 0 and removes the GIL hooks priorities installed
    (they stay while a gilfree.gil monitor uses them)."""
    global _installed
    with _lock:
        if not _installed:
            return
        hook = _hook()
        hook.reset_priorities()
        hook.release(False, False)
        _installed = False
