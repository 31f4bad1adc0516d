"""gilfree.priority: David Beazley's thread priorities for the GIL, on stock CPython 3.11-3.13.

``gilfree.priority.set(level)`` gives the calling thread a GIL priority (an int: 0 is the
default, negative is background, positive is urgent - Beazley's ``sys.setpriority``);
``with gilfree.priority.background(): ...`` runs a block of CPU work at -1. Then:

- a thread that waits for the GIL while a lower-priority thread holds it has the holder
  asked to drop it at once, instead of after the switch interval (5 ms);
- a lower-priority thread does not take the GIL back ahead of a waiting higher-priority one
  (for at most 5 ms per wait, so a background thread is slowed, never starved forever);
- between equal priorities CPython's behaviour is unchanged.

A level belongs to an OS thread, as the GIL sees threads: every asyncio task of an event loop
runs at its thread's level, so a task's ``background()`` block lowers the whole loop until the
last block open on that thread ends (see docs/priority.md).

Built on the GIL hooks of gilfree.gil (see docs/priority.md). ``uninstall()`` puts every
thread it gave a level back to 0 and removes the hooks priorities installed.
"""
import contextlib
import inspect
import operator
import os
import threading
import warnings
import weakref

from .errors import UnsupportedInterpreter
from .gil import _available_cores, _hook

__all__ = ["set", "get", "background", "uninstall", "UnsupportedInterpreter"]

# Serializes every change of a level, uninstall() and the blocks' ends (which may run in
# another thread: a generator finished elsewhere). Reentrant: a signal handler or a garbage
# collection (a generator paused in a block, closed by the collector) can run Python code that
# ends or begins a block while this thread holds it; every change then re-applies the thread's
# level from its state, so the last one to finish leaves the hooks right.
_lock = threading.RLock()
_installed = False  # whether priorities hold one user of the GIL hooks
_epoch = 0  # uninstall() and a fork's child start a new one: blocks begun before are void
_local = threading.local()
_leveled = weakref.WeakSet()  # the _Threads given a nonzero level: uninstall() resets them
_warned = False  # background() warns once per process where priorities are unavailable


class _Thread:
    """One OS thread's levels: `base` outside background() blocks, and its open blocks in the
    order they began. The last one still open sets the level, whatever order they end in."""

    __slots__ = ("epoch", "base", "blocks", "record", "__weakref__")

    def __init__(self):
        self.epoch, self.base, self.blocks = _epoch, 0, []
        self.record = 0  # its hook record's id, once it has one

    def level(self):
        return self.blocks[-1].level if self.blocks else self.base


class _Block:
    __slots__ = ("owner", "level")

    def __init__(self, level):
        self.owner, self.level = None, level  # owner: its thread's _Thread, once begun


def _checked(level):
    """The level as an int. A bool or a non-integer is a mistake, not a level."""
    if not isinstance(level, bool):
        try:
            return operator.index(level)
        except TypeError:
            pass
    raise TypeError(f"a gilfree.priority level is an int, not {type(level).__name__}")


def _mine():
    """The calling thread's _Thread of this epoch (under _lock)."""
    me = getattr(_local, "thread", None)
    if me is None or me.epoch != _epoch:
        me = _local.thread = _Thread()
    return me


def _cgroup_cpu_quota(proc="/proc/self"):
    """The CPUs this process's cgroups let it use (CFS quota over period, the smallest along its
    cgroup and their ancestors, cgroup v1 or v2), or None: no quota, or none readable."""
    try:
        with open(f"{proc}/mountinfo") as f:
            mounts = [line.split() for line in f]
        with open(f"{proc}/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    quotas = []
    for fields in mounts:
        rest = fields[fields.index("-") + 1:] if "-" in fields else []
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, mountpoint = fields[3], fields[4].replace("\\040", " ")
        if rest[0] == "cgroup2":
            paths = [g[2] for g in groups if len(g) == 3 and g[0] == "0"]
        elif rest[0] == "cgroup" and "cpu" in rest[2].split(","):
            paths = [g[2] for g in groups if len(g) == 3 and "cpu" in g[1].split(",")]
        else:
            continue
        for path in paths:
            inside = os.path.relpath(path, root)
            if inside.startswith(".."):
                continue  # a cgroup outside what this mount shows
            directory = os.path.normpath(os.path.join(mountpoint, inside))
            while True:
                quota = _cpu_quota_in(directory, rest[0] == "cgroup2")
                if quota is not None:
                    quotas.append(quota)
                if directory == os.path.normpath(mountpoint) or directory == "/":
                    break
                directory = os.path.dirname(directory)
    return min(quotas, default=None)


def _cpu_quota_in(directory, v2):
    """One cgroup's CPU quota in CPUs, or None (no quota, no such file)."""
    try:
        if v2:
            with open(f"{directory}/cpu.max") as f:
                quota, period = f.read().split()[:2]
        else:
            with open(f"{directory}/cpu.cfs_quota_us") as f:
                quota = f.read().strip()
            with open(f"{directory}/cpu.cfs_period_us") as f:
                period = f.read().strip()
        if quota == "max" or int(quota) < 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cpus_allowed():
    """How many CPUs this process may keep busy at once: its affinity, less where its cgroups'
    quota is lower."""
    cpus = _available_cores()
    quota = _cgroup_cpu_quota()
    return cpus if quota is None else min(cpus, quota)


def _install(hook, level):
    """Installs the hooks for a nonzero level (under _lock), before any state changes: where
    priorities cannot be had it raises UnsupportedInterpreter, changing nothing. Any level set
    since the last uninstall() implies the hooks are in, so a block that ends never installs them."""
    global _installed
    if level != 0 and not _installed:
        _installed = True  # first: a reentrant call (see _lock) must not acquire a second time
        try:
            hook.acquire(False, 0, False)
        except BaseException:
            _installed = False
            raise
        # A waiter watching the GIL keeps a CPU busy beside the holder: where the process may
        # not keep two busy, that CPU is the holder's (docs/priority.md).
        hook.set_watch(_cpus_allowed() >= 2)


def _apply(hook, owner):
    """Gives owner's thread the level its state says in the hooks (under _lock)."""
    level = owner.level()
    if owner is getattr(_local, "thread", None):
        hook.set_priority(level)
        owner.record = hook.record_id()
    elif owner.record:  # a block begun in that thread ended in this one
        hook.set_priority(level, owner.record)
    if level:
        _leveled.add(owner)
    else:
        _leveled.discard(owner)


def set(level):  # noqa: A001 - the name the issue fixes (Beazley's sys.setpriority)
    """Sets the calling thread's GIL priority (clamped to +-8); inside a background() block,
    until that block ends. Raises UnsupportedInterpreter where priorities cannot be had
    (CPython's default behaviour then stays)."""
    level = _checked(level)
    hook = _hook()
    with _lock:
        _install(hook, level)
        me = _mine()
        if me.blocks:
            me.blocks[-1].level = level
        else:
            me.base = level
        _apply(hook, me)


def get():
    """The calling thread's GIL priority (0 where priorities are unavailable)."""
    try:
        return _hook().get_priority()
    except UnsupportedInterpreter:
        return 0


def background(level=-1):
    """Runs the block at a lower GIL priority. The level is the calling OS thread's: other
    code running on that thread meanwhile (the other asyncio tasks of its event loop) runs at
    it too. When the last block open on the thread ends, in whatever order they end, the thread
    is back at its own level (set()'s, 0 by default).

    Where priorities are unavailable it warns once per process (RuntimeWarning) and runs the
    block unchanged. A level of 0 or above is a ValueError: the block would not be background
    (set() raises a thread).
    """
    level = _checked(level)
    if level >= 0:
        raise ValueError(f"a background() level is negative, not {level}; set() gives a thread a level of 0 or above")
    return _Background(level)


class _Background(contextlib.ContextDecorator):
    """One background() block. It ends at __exit__, or when the object goes (an exception such
    as Ctrl-C's KeyboardInterrupt raised as __exit__ begins skips its body), so such an
    interrupt does not leave its thread in the background (see docs/priority.md). Only an open
    block is an _OpenBackground, with a __del__: Python code run as a closed block goes would
    swallow a Ctrl-C landing in it ("Exception ignored in ... __del__")."""

    _block = None  # class defaults: __del__ may see an object whose __init__ was interrupted
    _entered = False

    def __init__(self, level):
        self._level, self._block, self._entered = level, None, False

    def _recreate_cm(self):
        return _Background(self._level)  # as a decorator: a block per call

    def __call__(self, func):
        if inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(f"background() decorates plain functions only: {func.__qualname__} would be at the "
                            "level only until its first await or yield; use 'with background():' in its body")
        return super().__call__(func)

    def __enter__(self):
        if self._entered:
            raise RuntimeError("a background() block is entered once: call gilfree.priority.background() for each block")
        self._entered = True
        block = _Block(self._level)
        self.__class__ = _OpenBackground
        try:
            _begin(block)
        except UnsupportedInterpreter as exc:  # raised before _begin changed anything
            _warn_unavailable(exc)
            return None
        except BaseException:
            _end(block)  # an interrupt in _begin: undo what it did
            raise
        self._block = block
        return None

    def __exit__(self, *exc_info):
        self._close()
        return False

    def _close(self):
        # Forgotten only once ended: an interrupt as _end begins leaves it for __del__ to end.
        if self._block is not None:
            _end(self._block)
            self._block = None
        self.__class__ = _Background


class _OpenBackground(_Background):
    def __del__(self):
        self._close()


def _warn_unavailable(exc):
    global _warned
    with _lock:
        first, _warned = not _warned, True
    if first:
        warnings.warn(f"gilfree.priority unavailable, running with CPython's default GIL: {exc}", RuntimeWarning, stacklevel=3)


def _begin(block):
    """Opens block on the calling thread (raises UnsupportedInterpreter before changing anything)."""
    hook = _hook()
    with _lock:
        _install(hook, block.level)
        me = block.owner = _mine()
        me.blocks.append(block)
        _apply(hook, me)


def _end(block):
    """Closes block wherever it is, if it is still open, and applies its thread's level: again
    if an interrupt stopped the last call between the two."""
    with _lock:
        owner = block.owner
        if owner is None or owner.epoch != _epoch:
            return  # never begun, or uninstall() (or a fork) reset its thread
        try:
            if block in owner.blocks:
                owner.blocks.remove(block)
        finally:
            _apply(_hook(), owner)


def uninstall():
    """Sets every thread given a level here back to 0 and removes the GIL hooks priorities
    installed (they stay while a gilfree.gil monitor uses them). Blocks open meanwhile end
    without changing their threads' levels."""
    global _installed, _epoch
    with _lock:
        _epoch += 1
        if not _installed:
            return
        hook = _hook()
        for owner in list(_leveled):
            hook.set_priority(0, owner.record)
        _leveled.clear()
        hook.release(False, False)
        _installed = False


def _after_fork_in_child():
    """A forked child is a new process: its one thread starts at 0 (the hooks reset its
    record's level), and the blocks it copied end without effect."""
    global _lock, _epoch
    _lock = threading.RLock()  # another thread of the parent may have held it
    _epoch += 1
    _leveled.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
