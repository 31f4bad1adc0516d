"""Exact GIL accounting for a running program.

``with gilfree.gil.monitor() as m: ...`` then ``m.report()``: per thread, how long it held the
GIL, how long and how often it waited for it, how long it ran without it, how often it was
asked to drop it; a verdict; ``m.write_trace(path)`` (Chrome trace JSON, opens in Perfetto) and
``m.write_svg(path)``. ``counters()`` gives cheap cumulative numbers for a metrics endpoint.

The measurements come from ``gilfree._gilhook``: hooks on the pthread calls of CPython's own
take_gil/drop_gil, recorded without the GIL (see docs/gil.md).
"""
import os
import re
import resource
import site
import struct
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field

# Few imports here: `diagnose` imports this module before the program, whose own modules named
# like standard ones (json.py, queue.py) must be the ones it gets. Reports import what they need.

__all__ = ["monitor", "counters", "stop", "Monitor", "Report", "ThreadReport", "UnsupportedInterpreter"]

_SLICE = struct.Struct("=IIQQQQII")  # _gilhook.slices()
_TRACE_BUDGET = 256 << 20
MAX_TRACE_SLICES = 200_000
TOP_THREADS = 20  # rows of the report's table and picture, by held + wait time
# Rows of _gilhook.threads(). _ID identifies a thread's record: the kernel reuses native ids
# (_TID) once a thread has ended, so every per-thread table is keyed by _ID.
_ID, _TID, _FIRST, _EXIT, _HELD, _WAIT, _ACQ, _WAITS, _SWITCHES, _FORCED, _REQUESTS, _TIMEOUTS, _STATE, _PRIO, _LOST, _CPU, _NAME = range(17)


# Also the binding's reason, where it loads in a subinterpreter and refuses it.
_SUBINTERPRETER = "GIL priorities and accounting are unavailable in subinterpreters (gilfree hooks the main interpreter's GIL only)"


def __getattr__(name):
    # gilfree.errors imports concurrent.futures (multiprocessing, socket, queue, ...): on first use.
    if name == "UnsupportedInterpreter":
        from .errors import UnsupportedInterpreter

        return UnsupportedInterpreter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _in_subinterpreter():
    try:
        import _interpreters as interpreters  # 3.13
    except ImportError:
        try:
            import _xxsubinterpreters as interpreters
        except ImportError:
            return False
    return interpreters.get_current() != interpreters.get_main()


def _hook():
    """The binding module; raises UnsupportedInterpreter if it cannot load here."""
    try:
        from . import _gilhook
    except ImportError as exc:
        from .errors import UnsupportedInterpreter

        if _in_subinterpreter():  # an isolated one refuses the module: not a build problem
            raise UnsupportedInterpreter(_SUBINTERPRETER) from exc
        raise UnsupportedInterpreter(f"gilfree._gilhook is not built for this interpreter: {exc}") from exc
    return _gilhook


@dataclass
class ThreadReport:
    name: str
    tid: int
    held_s: float
    wait_s: float
    waits: int
    wait_p50_s: float
    wait_p99_s: float
    wait_max_s: float
    free_s: float
    acquisitions: int = 0
    forced: int = 0
    drop_requests: int = 0
    timeouts: int = 0
    alive_s: float = 0.0
    lost_after_s: float = None  # its timeline's events were lost (budget) from then on
    cpu_s: float = 0.0  # CPU time in the window

    @property
    def wanted_s(self):
        return self.held_s + self.wait_s

    @property
    def parallel_s(self):
        """CPU time without the GIL (C code that released it): work that ran in parallel."""
        return max(0.0, self.cpu_s - self.held_s)

    @property
    def busy_s(self):
        """Holding the GIL, waiting for it or running without it: not blocked (I/O, sleep, a
        lock, join) or idle."""
        return self.held_s + self.wait_s + self.parallel_s


def _allowed_cpus():
    """The CPUs this process may run on (its affinity), None where unknown."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _available_cores():
    """The cores this process may run on (its affinity), not the machine's."""
    allowed = _allowed_cpus()
    return len(allowed) if allowed else os.cpu_count() or 1


@dataclass
class Report:
    wall_s: float
    held_fraction: float
    switches: int
    forced_switches: int
    threads: list
    interval_s: float = 0.005
    dropped_events: int = 0
    top_functions: list = field(default_factory=list)
    samples: int = 0
    notes: list = field(default_factory=list)
    verdict: str = ""
    lost_after_s: float = None  # the earliest time a thread's timeline events were lost from
    process_cpu_s: float = None  # the process's CPU time in the window (None: the threads' sum)
    cores: int = field(default_factory=_available_cores)
    other_load_cores: float = None  # busy cores beyond this process and its children, of those it may use
    children_cpu_s: float = 0.0  # CPU time of child processes (and theirs) in the window
    sampler_held_s: float = 0.0  # gilfree's own sampler thread held the GIL this long
    loop_samples: int = 0  # samples that found the holder running its own code in an event loop
    loop_thread: str = None  # the thread whose event loop most of those samples were in
    loop_where: str = None  # where most of them were
    loop_submit_samples: int = 0  # samples that found an event loop pickling a gilfree.Pool task's arguments
    waiting_s: float = None  # wall time in which one thread or more waited for the GIL (None: no timeline)

    @property
    def cpu_s(self):
        return sum(t.cpu_s for t in self.threads) if self.process_cpu_s is None else self.process_cpu_s

    @property
    def max_speedup(self):
        """At most how much faster processes (no GIL) could run the window on this machine: the
        CPU time of the process and of its children (cores they already keep busy) spread over
        all the cores the process may use (at most as many times faster as it may use cores)."""
        cores = max(1, self.cores)
        return max(1.0, min(cores, cores * (self.wall_s or 1e-9) / max(self.cpu_s + self.children_cpu_s, 1e-9)))

    def _contention(self, wait_s):
        """wait_s, less what may have been waiting for gilfree's sampler, as a share of the wall
        time. Under one switch interval in all it is a hand-over (a short run's start), not
        contention. With at most one thread holding the GIL there was nobody else to wait for:
        its waits were for the sampler, and then for a CPU on a busy machine."""
        if sum(1 for t in self.threads if t.held_s > 0) <= 1:
            return 0.0
        wait_s -= self.sampler_held_s
        return wait_s / (self.wall_s or 1e-9) if wait_s >= self.interval_s else 0.0

    @property
    def longest_wait_share(self):
        """The longest time one thread waited for the GIL, as a share of the wall time."""
        return self._contention(max((t.wait_s for t in self.threads), default=0.0))

    @property
    def gil_wait_share(self):
        """The share of the wall time in which one thread or more waited for the GIL
        (waiting_s, from the timeline), at least the longest-waiting thread's (all there is
        without a timeline): what processes could win back of it. A thread-per-request server's
        threads each wait a sliver of the run, and between them all of it."""
        longest = max((t.wait_s for t in self.threads), default=0.0)
        return self._contention(max(longest, self.waiting_s or 0.0))

    def to_dict(self):
        d = asdict(self)
        d["threads"] = [asdict(t) for t in self.threads]
        d.update(cpu_s=self.cpu_s, max_speedup=self.max_speedup, gil_wait_share=self.gil_wait_share,
                 longest_wait_share=self.longest_wait_share)
        return d

    def _repr_pretty_(self, printer, cycle):
        # IPython and Jupyter show a cell's last value with this: the table, as print() does.
        printer.text(str(self))

    def __str__(self):
        ranked = _ranked(self.threads)
        shown = ranked[:TOP_THREADS]
        width = max([len("thread")] + [len(_printable(t.name)) + (t.lost_after_s is not None) for t in shown])
        width = min(width, NAME_WIDTH)
        lines = [
            f"GIL report: wall {self.wall_s:.3f} s, GIL held {self.held_fraction:.1%}, "
            f"{self.switches} switches, {self.forced_switches} forced (drop requests)",
            self.usage(),
            f"{'thread':<{width}} {'tid':>8} {'held s':>8} {'wait s':>8} {'free s':>8} {'cpu s':>8} {'waits':>7} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        ]
        for t in shown:
            name = _printable(t.name)
            name = _elide(name, width - 1) + "*" if t.lost_after_s is not None else _elide(name, width)
            lines.append(
                f"{name:<{width}} {t.tid:>8} {t.held_s:>8.3f} {t.wait_s:>8.3f} {t.free_s:>8.3f} {t.cpu_s:>8.3f} "
                f"{t.waits:>7} {t.wait_p50_s * 1e3:>8.2f} {t.wait_p99_s * 1e3:>8.2f} {t.wait_max_s * 1e3:>8.2f}"
            )
        if len(ranked) > TOP_THREADS:
            rest = ranked[TOP_THREADS:]
            lines.append(f"... and {len(rest)} more threads (held {sum(t.held_s for t in rest):.3f} s, "
                         f"waited {sum(t.wait_s for t in rest):.3f} s; all in Report.threads)")
        if self.top_functions and self.samples >= MIN_HOT_SPOT_SAMPLES:  # fewer say nothing yet
            lines.append(f"held the GIL most ({self.samples} samples): " + ", ".join(f"{name} {share:.0%}" for name, share in self.top_functions))
        if self.sampler_held_s:
            lines.append(f"(gilfree's sampler thread, not listed, held the GIL {self.sampler_held_s * 1e3:.1f} ms: "
                         f"the threads' waits include up to that much waiting for it)")
        if self.dropped_events:
            lines.append(
                f"({self.dropped_events} timeline events dropped: memory budget reached"
                + (f"; from {self.lost_after_s:.3f} s on, the timeline (trace, picture) and the wait percentiles "
                   f"of the threads marked * are partial" if self.lost_after_s is not None else "")
                + "; held, wait, waits and the other totals are exact)"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append("verdict: " + _printable(self.verdict))
        return "\n".join(lines)

    def usage(self):
        """The line on cores: what the process used of those it may use, its children, the
        rest of the machine (which a verdict's numbers depend on)."""
        used = self.cpu_s / (self.wall_s or 1e-9)
        line = (f"process used {used:.2f} of {self.cores} core{'s' if self.cores != 1 else ''} "
                f"(CPU {self.cpu_s:.3f} s over {self.wall_s:.3f} s wall)")
        if self.children_cpu_s >= 0.001:
            line += (f"; child processes: CPU {self.children_cpu_s:.3f} s "
                     f"({self.children_cpu_s / (self.wall_s or 1e-9):.2f} cores)")
        if self.other_load_cores is not None:
            line += f"; machine: other work used ~{self.other_load_cores:.1f} cores"
        return line


NAME_WIDTH = 40  # the table's thread column at most; longer names lose their middle


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _printable(text):
    """text with control characters escaped: a thread may be named anything, and a newline
    would break the table, an ESC reach the terminal."""
    return _CONTROL.sub(lambda c: repr(c.group())[1:-1], text)


def _elide(name, width):
    """name, its middle replaced by '...' if longer than width (both ends tell threads apart)."""
    if len(name) <= width:
        return name
    head = (width - 3) // 2
    return name[:head] + "..." + name[len(name) - (width - 3 - head):]


def _live_records(rows):
    """Native id -> record id of the threads alive in rows (a live native id is unique)."""
    return {row[_TID]: row[_ID] for row in rows if not row[_EXIT]}


# In a forked child, threading keeps the parent's native id for the thread that forked.
_forked_thread = None  # (that Thread, its native id in this process)


def _threads():
    """(native id, Thread) of the Python threads alive."""
    for t in threading.enumerate():
        if _forked_thread is not None and t is _forked_thread[0]:
            yield _forked_thread[1], t
        elif t.native_id is not None:
            yield t.native_id, t


def _cpu_ns(thread):
    """CPU time of a live Python thread so far (0 if it has just ended)."""
    try:
        return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
    except (OSError, TypeError):
        return 0


def _name_threads(names, rows):
    """Adds the names of the Python threads alive in rows to names (record id -> name). A C
    thread Python met (threading.current_thread() in it, as logging calls) is a Dummy-N there:
    the OS name it gave itself says more."""
    live = _live_records(rows)
    process = _process_name()
    os_names = {row[_TID]: _os_name(row[_NAME], process) for row in rows if not row[_EXIT]}
    for native_id, t in _threads():
        if native_id in live:
            dummy = isinstance(t, threading._DummyThread)
            names[live[native_id]] = (os_names.get(native_id) if dummy else None) or t.name


def _process_name():
    try:
        with open("/proc/self/comm") as comm:
            return comm.read().strip()
    except OSError:
        return None


def _os_name(raw, process):
    """A thread's OS name from its record when it set one of its own (a C thread such as
    gilfree's result thread, which Python has no name for), else None: threads keep the
    process's name until they set one."""
    name = raw.decode(errors="replace")
    return name if name and process is not None and name != process else None


def _name_at_end(thread):
    """threading.Thread._delete while monitors are open, which every thread threading started
    (also before the window) calls last, holding the GIL through the hooks, so it has a record:
    names it for them by the name it ends under. Threads alive at the window's end are named
    from threading's registry then. (Not the profile hook: that is the program's.)"""
    key = _hook().record_id()
    for m in list(_open):
        m._names[key] = thread.name
    _delete_before(thread)


SAMPLER_PRIORITY = 8  # above any the program sets: the sampler takes the GIL from its holder at once


class _Sampler(threading.Thread):
    """Wakes at a low rate and takes the GIL; the thread it took it from was holding it: counts
    where that thread is.

    It waits at a high GIL priority, so the holder is asked to drop the GIL at once: a plain
    waiter waits a switch interval, in which another thread (one that releases the GIL often,
    into C code or I/O) may take it first and be sampled in the middle of a call without it."""

    def __init__(self, hook, rate_hz):
        super().__init__(name="gilfree-sampler", daemon=True)
        self._hook, self._period = hook, 1.0 / rate_hz
        self._stop_event = threading.Event()
        self.counts = {}
        self.in_loop = {}  # (thread name, where) -> samples of the program's own code in an event loop
        self.submitting = 0  # samples of an event loop in gilfree.Pool's submission (pickling arguments)
        self.record = None  # its own record id, left out of the report

    def run(self):
        self.record = self._hook.record_id()
        self._hook.set_priority(SAMPLER_PRIORITY)
        try:
            self._sample()
        finally:
            self._hook.set_priority(0)

    def _sample(self):
        ids = {}
        while not self._stop_event.wait(self._period):
            holder = self._hook.took_from()
            if not holder:
                continue
            if holder not in ids:
                ids = {native_id: t for native_id, t in _threads()}
            thread = ids.get(holder)
            frame = sys._current_frames().get(thread.ident) if thread is not None else None
            if frame is None:
                continue
            key = _where(frame)
            work = _loop_work(frame)
            if work == LOOP_OWN:
                self.in_loop[thread.name, key] = self.in_loop.get((thread.name, key), 0) + 1
            elif work == LOOP_SUBMIT:
                self.submitting += 1
            # Not kept over the sleep: a frame object that outlives its call holds the call's
            # locals, which this thread would then free (a parsed document: 100 ms held here).
            del frame
            self.counts[key] = self.counts.get(key, 0) + 1

    def stop(self):
        self._stop_event.set()
        self.join()


_LOOP_CALLBACK = (os.path.join("asyncio", "events.py"), "_run")  # asyncio.events.Handle._run
_ASYNC_CODE = 0x80 | 0x100 | 0x200  # CO_COROUTINE, CO_ITERABLE_COROUTINE, CO_ASYNC_GENERATOR
_GILFREE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


LOOP_OWN, LOOP_SUBMIT = "own", "submit"
_SUBMIT = (os.path.join(_GILFREE_DIR, "pool.py"), "_submit")  # gilfree.Pool._submit: pickles a task


def _loop_work(frame):
    """What a thread runs inside an event loop (a coroutine of any loop: asyncio, uvloop, trio,
    or a callback of an asyncio loop, which serves nothing else meanwhile): LOOP_OWN, the
    program's own code; LOOP_SUBMIT, gilfree.Pool submitting a task (pickling its arguments,
    also in the program's __reduce__); else None. The loop's own machinery (a busy server's many
    short callbacks) is not the program's code, and neither is other gilfree code."""
    own = gilfree = submit = False
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_GILFREE_DIR):
            gilfree = True
            submit = submit or (code.co_name == _SUBMIT[1] and code.co_filename == _SUBMIT[0])
        elif not gilfree:
            own = own or _is_own(code.co_filename)
        if code.co_flags & _ASYNC_CODE or (
                code.co_name == _LOOP_CALLBACK[1] and code.co_filename.endswith(_LOOP_CALLBACK[0])):
            return LOOP_SUBMIT if submit else LOOP_OWN if own else None
        frame = frame.f_back
    return None


def _frame_name(frame):
    code = frame.f_code
    return f"{getattr(code, 'co_qualname', code.co_name)} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"


def _where(frame):
    """Where a thread is: its innermost frame, and when that is library code, the innermost
    frame of the program's own code too ("own > library")."""
    own = frame
    while own is not None and not _is_own(own.f_code.co_filename):
        own = own.f_back
    if own is None or own is frame:
        return _frame_name(frame)
    return f"{_frame_name(own)} > {_frame_name(frame)}"


_LIBRARY_DIRS = None
_own_files = {}


def _is_own(filename):
    """Whether a code file is the program's own: not the standard library, not an installed
    package (site-packages), not gilfree, not frozen."""
    global _LIBRARY_DIRS
    if filename not in _own_files:
        if _LIBRARY_DIRS is None:
            paths = sysconfig.get_paths()
            dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
            dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
            dirs.add(site.getusersitepackages())
            dirs.add(os.path.dirname(os.__file__))
            dirs.add(os.path.dirname(os.path.abspath(__file__)))
            _LIBRARY_DIRS = tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)
        real = os.path.realpath(filename) if not filename.startswith("<") else filename
        _own_files[filename] = not filename.startswith("<frozen") and not real.startswith(_LIBRARY_DIRS)
    return _own_files[filename]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_ticks():
    """(busy, all, CPUs) clock ticks since boot of the CPUs the process may run on (/proc/stat;
    idle and iowait are not busy; the machine's where the affinity is unknown): other work on
    CPUs it cannot use takes nothing from it. None where unreadable."""
    allowed = _allowed_cpus()
    names = {f"cpu{n}" for n in allowed} if allowed else {"cpu"}
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in names:
                    ticks = [int(v) for v in fields[1:]]
                    busy, total = busy + sum(ticks) - ticks[3] - ticks[4], total + sum(ticks)
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total, len(allowed) if allowed else os.cpu_count() or 1) if total else None


def _descendants_cpu():
    """{pid: CPU s} of this process's live descendants (/proc), with their reaped children's
    (gilfree.Pool's workers are its template's children, the template the program's)."""
    children, cpu = {}, {}
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return {}
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the command, which may hold anything
            children.setdefault(int(fields[1]), []).append(int(name))
            cpu[int(name)] = sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
    found, todo = {}, list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        found[pid] = cpu[pid]
        todo.extend(children.get(pid, ()))
    return found


def _usage(hook):
    """(reaped children's CPU s, live descendants' {pid: CPU s}, machine ticks). With the hooks in.

    Every /proc read gives the GIL up: taking it back from a CPU-bound thread would cost a
    switch interval per file (a quarter of a second for 65 processes), so the calling thread
    asks for it at the sampler's priority meanwhile."""
    level = hook.get_priority()
    try:
        hook.set_priority(SAMPLER_PRIORITY)
    except OSError:  # no priorities on this interpreter: the plain wait
        pass
    try:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return reaped.ru_utime + reaped.ru_stime, _descendants_cpu(), _machine_ticks()
    finally:
        if hook.get_priority() != level:
            hook.set_priority(level)


def _usage_between(before, after, cpu, wall_s):
    """(children's CPU s, other load in cores or None) between two _usage()s, given the
    process's CPU time."""
    # A descendant alive at the start and reaped since is in the reaped total whole.
    children = (after[0] - before[0] + sum(c - before[1].get(pid, 0.0) for pid, c in after[1].items())
                - sum(c for pid, c in before[1].items() if pid not in after[1]))
    children = max(0.0, children)
    other = None
    if before[2] and after[2] and after[2][1] - before[2][1] >= 25:  # enough ticks to mean something
        busy = (after[2][0] - before[2][0]) / (after[2][1] - before[2][1]) * after[2][2]
        other = max(0.0, busy - (cpu + children) / (wall_s or 1e-9))
    return children, other


# Draining and reaping run under _lock, with the monitors' windows opening and closing.
_lock = threading.Lock()
_open = []  # monitors inside their window: they get the final rows of threads reaped meanwhile
_active = []  # of which collect events: drained events go to each of them
_delete_before = threading.Thread._delete  # what _name_at_end wraps


def _sync(hook):
    """Drains the recorded events into the tracing monitors, then frees the records of ended
    threads (whose events are all drained now), handing their final rows to the open monitors."""
    takers = [m for m in _active if m._cut is None]
    started = time.monotonic_ns()  # CLOCK_MONOTONIC, the hooks' clock
    data = bytearray() if takers else None
    count = hook.drain(data)
    adopted = False
    for m in _active:
        adopted = m._take(data, count, started, adopt=not adopted) or adopted
    for row in hook.reap():
        for m in _open:
            m._reaped[row[_ID]] = row


def _unwrap_delete():
    # Only while ours is on top: under another wrapper it stays (naming for no monitor), or theirs would go too.
    if threading.Thread._delete is _name_at_end:
        threading.Thread._delete = _delete_before


class Monitor:
    """Context manager measuring the GIL between __enter__ and __exit__.

    Monitors nest (each reports its own window). A monitor is reused one window after another:
    each ``with`` starts a fresh window and report() then describes the last one; entering a
    monitor again inside its own window raises RuntimeError, and so does report() before its
    first window has ended or inside a window.
    """

    def __init__(self, trace=True, sample_hz=0.0, trace_budget_bytes=_TRACE_BUDGET):
        self._trace = trace
        self._sample_hz = sample_hz
        self._budget = trace_budget_bytes
        self._report = None
        self._inside = False
        self._forked = False  # set in a forked child for the parent's windows
        self._t1 = None

    def __enter__(self):
        if self._inside:
            raise RuntimeError("this monitor is measuring already: use another monitor to nest a window")
        self._forked = False
        hook = self._hook = _hook()
        # The window's events as drained (16 bytes each, never a Python object per event), at
        # most the budget: past it, the timeline is cut where the events kept are complete.
        self._events = bytearray()
        self._cut = None
        self._refused = 0
        self._reaped = {}
        self._names = {}  # record id -> thread name
        global _delete_before
        with _lock:
            hook.acquire(self._trace, self._budget, True)  # keep: ended threads' rows until reaped
            self._usage0 = _usage(hook)  # before the window: its CPU time is not the main thread's work
            self._dropped0 = hook.dropped()
            _sync(hook)  # what came before belongs to earlier monitors
            self._cpu0 = time.process_time()
            self._t0, rows = hook.threads()
            self._complete_until = self._t0
            if not _open and threading.Thread._delete is not _name_at_end:
                _delete_before, threading.Thread._delete = threading.Thread._delete, _name_at_end
            _open.append(self)
            if self._trace:
                _active.append(self)
        self._inside, self._report = True, None
        _name_threads(self._names, rows)
        self._start = {row[_ID]: row for row in rows}
        # Python threads alive now that the hooks have not seen yet (blocked since before they
        # went in): their records, when they come, belong to threads alive from the start. Their
        # name, and CPU time so far.
        seen = _live_records(rows)
        self._unseen = {native_id: (t.name, _cpu_ns(t)) for native_id, t in _threads() if native_id not in seen}
        self._sampler = _Sampler(hook, self._sample_hz) if self._sample_hz else None
        if self._sampler:
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self._forked:  # a forked child leaving the parent's window: it gave it up at the fork
            return False
        hook = self._hook
        if self._sampler:
            self._sampler.stop()
        with _lock:
            self._t1, rows = hook.threads()
            self._cpu1 = time.process_time()
            _sync(hook)
            _open.remove(self)
            if not _open:
                _unwrap_delete()
            if self._trace:
                _active.remove(self)
            self._dropped = hook.dropped() - self._dropped0 + self._refused
            self._usage1 = _usage(hook)
            hook.release(self._trace, True)
        self._inside = False
        # Threads reaped during the window, with their rows at its end where still listed then.
        self._end = {**self._reaped, **{row[_ID]: row for row in rows}}
        self._interval = sys.getswitchinterval()
        _name_threads(self._names, rows)
        live = _live_records(rows)
        # Python threads alive now, by record id; those without a record (never seen by the
        # hooks: blocked without the GIL all along) by their negated native id.
        self._alive = {live.get(native_id, -native_id): t.name for native_id, t in _threads()}
        return False

    def _take(self, data, count, started, adopt):
        """Keeps a drain's events (drained from `started` on) within the budget; returns whether
        it adopted data as its buffer (only one monitor may: the others copy)."""
        if self._cut is not None or len(self._events) + len(data) > self._budget:
            if self._cut is None:
                self._cut = self._complete_until  # every event before it is kept
            self._refused += count
            return False
        self._complete_until = started
        if adopt and not self._events:
            self._events = data
            return True
        self._events += data
        return False

    def _timeline_ends(self):
        """(end, ends): the timelines end at end, or for the threads whose events were lost
        before it (the budget) at ends[record id]."""
        end = self._t1 if self._cut is None else min(self._t1, self._cut)
        ends = {key: max(self._t0, row[_LOST]) for key, row in self._end.items() if 0 < row[_LOST] < end}
        return end, ends

    def report(self):
        """Returns the Report of the last window (computed once per window).

        Raises RuntimeError inside a window, or before the first one has ended."""
        if self._forked:
            raise RuntimeError("this monitor measured the process this one was forked from")
        if self._inside:
            raise RuntimeError("report() comes after the with block: this monitor is still measuring")
        if self._t1 is None:
            raise RuntimeError("report() comes after a with block: this monitor has not measured anything yet")
        if self._report is None:
            self._report = self._build_report()
        return self._report

    def _build_report(self):
        wall_ns = max(1, self._t1 - self._t0)
        end, ends = self._timeline_ends()
        self._summary = self._hook.summarize(self._events, self._t0, end, ends) if self._trace else {}
        sampler = self._sampler.record if self._sampler else None
        process = _process_name()
        # The first record made in the window for each native id of a thread unseen at the
        # start is that thread's: a thread ends through a hooked release, so one that ended
        # before its id was reused has a record, made before.
        first_made = {}
        for key, row in sorted(self._end.items(), key=lambda kv: -kv[1][_FIRST]):
            if key not in self._start and row[_TID] in self._unseen:
                first_made[row[_TID]] = key
        threads, self._keys, switches, forced, held_total, sampler_held = [], [], 0, 0, 0, 0
        for key in set(self._end) | set(self._alive):
            row = self._end.get(key)
            start = self._start.get(key)
            if key == sampler:
                sampler_held = row[_HELD] - (start[_HELD] if start else 0) if row else 0
                continue
            if row is None:
                row = (key, -key, self._t0, 0) + (0,) * 12 + (b"",)
            if row[_FIRST] > self._t1 or (row[_EXIT] and row[_EXIT] < self._t0):
                continue

            unseen = first_made.get(row[_TID]) == key

            def delta(i):
                if i == _CPU and unseen:
                    return row[i] - self._unseen[row[_TID]][1]
                return row[i] - (start[i] if start else 0)

            held, wait = delta(_HELD), delta(_WAIT)
            if held == 0 and wait == 0 and key not in self._alive:
                continue
            born = self._t0 if unseen else max(self._t0, row[_FIRST])
            gone = row[_EXIT] if row[_EXIT] and row[_EXIT] < self._t1 else self._t1
            alive = max(held + wait, gone - born)
            timeline_end, _, p50, p99, wait_max = self._summary.get(key, (ends.get(key, end), 0, 0, 0, 0))
            self._keys.append(key)
            switches += delta(_SWITCHES)
            forced += delta(_REQUESTS)
            held_total += held
            threads.append(
                ThreadReport(
                    name=(self._names.get(key) or self._alive.get(key) or (self._unseen[row[_TID]][0] if unseen else None)
                          or _os_name(row[_NAME], process) or f"thread-{row[_TID]}"),
                    tid=row[_TID],
                    held_s=held / 1e9,
                    wait_s=wait / 1e9,
                    waits=delta(_WAITS),
                    wait_p50_s=p50 / 1e9,
                    wait_p99_s=p99 / 1e9,
                    wait_max_s=wait_max / 1e9,
                    free_s=max(0, alive - held - wait) / 1e9,
                    acquisitions=delta(_ACQ),
                    forced=delta(_FORCED),
                    drop_requests=delta(_REQUESTS),
                    timeouts=delta(_TIMEOUTS),
                    alive_s=alive / 1e9,
                    cpu_s=delta(_CPU) / 1e9,
                    lost_after_s=(timeline_end - self._t0) / 1e9 if self._trace and timeline_end < gone else None,
                )
            )
        top, total, in_loop, loop_thread, loop_where = [], 0, 0, None, None
        if self._sampler and self._sampler.in_loop:
            in_loop = sum(self._sampler.in_loop.values())
            per_thread = {}
            for (name, _), n in self._sampler.in_loop.items():
                per_thread[name] = per_thread.get(name, 0) + n
            loop_thread = max(per_thread, key=per_thread.get)
            loop_where = max((key for key in self._sampler.in_loop if key[0] == loop_thread),
                             key=self._sampler.in_loop.get)[1]
        if self._sampler and self._sampler.counts:
            total = sum(self._sampler.counts.values())
            top = [(name, n / total) for name, n in sorted(self._sampler.counts.items(), key=lambda kv: -kv[1])[:3]]
        cpu = self._cpu1 - self._cpu0
        waiting = self._waiting_ns() / 1e9 if self._trace else None
        children, other = _usage_between(self._usage0, self._usage1, cpu, wall_ns / 1e9)
        report = Report(
            wall_s=wall_ns / 1e9,
            held_fraction=min(1.0, held_total / wall_ns),
            switches=switches,
            forced_switches=forced,
            threads=threads,
            interval_s=self._interval,
            dropped_events=self._dropped,
            top_functions=top,
            samples=total,
            notes=_subinterpreter_notes(),
            lost_after_s=min((t.lost_after_s for t in threads if t.lost_after_s is not None), default=None),
            process_cpu_s=cpu,
            children_cpu_s=children,
            other_load_cores=other,
            sampler_held_s=sampler_held / 1e9,
            loop_samples=in_loop,
            loop_thread=loop_thread,
            loop_where=loop_where,
            loop_submit_samples=self._sampler.submitting if self._sampler else 0,
            waiting_s=waiting,
        )
        report.verdict = verdict(report)
        return report

    def _waiting_ns(self):
        """How long one thread or more of the report's waited for the GIL, half a switch interval
        or more at a time: the union of those waits. A shorter wait is a hand-over (the holder
        blocked before it was asked to drop the GIL), not contention; a thread waking from
        sleep or I/O into a busy GIL makes many. Shorter spans merge into slices of half a switch
        interval (longer in a long trace: _resolution), which count, from their start, when
        their waits add up to that much: in a long trace, short waits crowding a slice count. A span
        from the window's start is a guess (a thread first seen taking the GIL may have been
        blocked before, not waiting): left out."""
        shortest = int(self._interval * 1e9 / 2)
        resolution = max(shortest, self._resolution())
        waits = sorted((start, start + wait) for _, _, start, _, _, wait, _ in self._slices(resolution)
                       if start > self._t0 and wait >= shortest)
        total, until = 0, 0
        for start, end in waits:
            if end > until:
                total += end - max(start, until)
                until = end
        return total

    def _resolution(self):
        """Spans shorter than this merge into slices, so that a timeline has about
        MAX_TRACE_SLICES slices at most (0: every span as it is)."""
        spans = sum(self._summary[key][1] for key in self._keys if key in self._summary)
        tracks = sum(1 for key in self._keys if key in self._summary) or 1
        return 0 if spans <= MAX_TRACE_SLICES else max(1000, 3 * tracks * (self._t1 - self._t0) // MAX_TRACE_SLICES)

    def _slices(self, resolution_ns):
        """(record id, state, start_ns, end_ns, held_ns, wait_ns, spans) of the report's threads,
        their spans shorter than resolution_ns merged."""
        end, ends = self._timeline_ends()
        keys = set(self._keys)
        for thread, state, start, stop, held, wait, spans, _ in _SLICE.iter_unpack(
                self._hook.slices(self._events, self._t0, end, ends, resolution_ns)):
            if thread in keys:
                yield thread, state, start, stop, held, wait, spans

    def write_trace(self, path):
        """Writes the timeline as Chrome trace-event JSON (one track per thread; open in Perfetto).

        Up to MAX_TRACE_SLICES held and wait spans are written as they are; beyond, spans shorter
        than a resolution that keeps the file within about that many slices are merged (a
        merged slice is named by the state covering half of it or more, else "mixed", and says
        how much of it was held and waited)."""
        import json

        if not self._trace:
            raise ValueError("this monitor was created with trace=False")
        report = self.report()
        resolution = self._resolution()
        pid, held_state = os.getpid(), self._hook.STATE_HELD
        other = {"verdict": report.verdict, "merged_below_us": resolution / 1e3, "dropped_events": report.dropped_events}
        with open(path, "w") as f:
            f.write('{"displayTimeUnit": "ms", "otherData": %s, "traceEvents": [\n' % json.dumps(other))
            f.write(json.dumps({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "GIL"}}))
            # A track's id is its thread's native id, but for a thread whose native id an earlier
            # one had (the kernel reuses them): two threads must not share a track.
            tracks, taken = {}, set()
            for key, t in sorted(zip(self._keys, report.threads), key=lambda kt: kt[0]):
                tracks[key] = t.tid if t.tid not in taken else (1 << 32) + key
                taken.add(t.tid)
                meta = {"ph": "M", "name": "thread_name", "pid": pid, "tid": tracks[key], "args": {"name": t.name, "native_id": t.tid}}
                f.write(",\n" + json.dumps(meta))
            for thread, state, start, stop, held, wait, n in self._slices(resolution):
                args = ""
                name = "held" if state == held_state else "wait"
                if n > 1:
                    if max(held, wait) * 2 < stop - start:
                        name = "mixed"
                    args = f', "args": {{"held_ms": {held / 1e6:.3f}, "wait_ms": {wait / 1e6:.3f}, "spans": {n}}}'
                f.write(f',\n{{"name": "{name}", "cat": "gil", "ph": "X", "pid": {pid}, "tid": {tracks[thread]}, '
                        f'"ts": {(start - self._t0) / 1e3:.3f}, "dur": {(stop - start) / 1e3:.3f}, '
                        f'"cname": "{_TRACE_COLORS[name]}"{args}}}')
            f.write("\n]}\n")

    def write_svg(self, path, width=1200):
        """Draws the timeline Beazley-style: held green, waiting red, free grey, one row per thread
        (where a pixel holds several spans, its colour is the one that covers more, as opaque
        as the thread was busy there). A row's free time is tinted blue by the share of it the
        thread ran C code without the GIL (its CPU time says how much, not when); the verdict
        is wrapped below."""
        import textwrap

        if not self._trace:
            raise ValueError("this monitor was created with trace=False")
        report = self.report()
        row, label, top, line = 22, 180, 30, 16
        by_thread = dict(zip(map(id, report.threads), self._keys))
        ranked = _ranked(report.threads)
        rows = [(by_thread[id(t)], t) for t in ranked[:TOP_THREADS]]
        more = len(ranked) - len(rows)
        verdict_lines = textwrap.wrap(report.verdict, (label + width) // 7) or [""]
        height = top + row * (len(rows) + (more > 0)) + 24 + line * len(verdict_lines)
        scale = width / max(1, self._t1 - self._t0)
        colors = {self._hook.STATE_HELD: "#2ca02c", self._hook.STATE_WANT: "#d62728"}
        y_of = {key: top + i * row for i, (key, _) in enumerate(rows)}
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{label + width + 10}" height="{height}" '
            f'font-family="sans-serif" font-size="12">',
            f'<text x="4" y="18">GIL timeline, {report.wall_s:.3f} s, held {report.held_fraction:.0%}: '
            f'green held, red waiting, grey free (blocked, or tinted blue by the share of it running C code '
            f'without the GIL)</text>',
        ]
        for key, t in rows:
            y = y_of[key]
            out.append(f'<text x="4" y="{y + 14}">{_xml_text(_elide(t.name, 28))}</text>')
            out.append(f'<rect x="{label}" y="{y}" width="{width}" height="{row - 4}" fill="#cccccc"/>')
            tint = min(1.0, t.parallel_s / t.free_s) if t.free_s > 0 else 0.0
            if tint >= 0.05:
                out.append(f'<rect x="{label}" y="{y}" width="{width}" height="{row - 4}" fill="#6baed6" '
                           f'fill-opacity="{tint:.2f}"/>')
        if more:
            out.append(f'<text x="4" y="{top + row * len(rows) + 14}">... and {more} more threads</text>')
        for thread, state, start, stop, held, wait, _ in self._slices(max(1, (self._t1 - self._t0) // width)):
            if thread not in y_of:
                continue
            x, w = (start - self._t0) * scale, max(0.5, (stop - start) * scale)
            opacity = min(1.0, (held + wait) / max(1, stop - start))
            out.append(f'<rect x="{label + x:.2f}" y="{y_of[thread]}" width="{w:.2f}" height="{row - 4}" '
                       f'fill="{colors[state]}"' + (f' fill-opacity="{opacity:.2f}"/>' if opacity < 0.99 else "/>"))
        axis = top + row * (len(rows) + (more > 0)) + 12
        for i in range(6):
            out.append(f'<text x="{label + i * width // 5 - (20 if i == 5 else 0)}" y="{axis}">{report.wall_s * i / 5 * 1e3:.0f} ms</text>')
        for i, text in enumerate(verdict_lines):
            out.append(f'<text x="4" y="{axis + 24 + i * line}">{_xml_text(text)}</text>')
        out.append("</svg>")
        with open(path, "w") as f:
            f.write("\n".join(out))


_TRACE_COLORS = {"held": "good", "wait": "terrible", "mixed": "grey"}


def _after_fork_in_child():
    """Only the thread that forked lives on in a child, whose records the hooks have reset: the
    parent's open monitors give up their windows (no more events or counting for them here)."""
    global _lock, _forked_thread
    _lock = threading.Lock()  # another thread of the parent may have held it
    _forked_thread = (threading.current_thread(), threading.get_native_id())
    _unwrap_delete()
    for m in _open:
        m._forked, m._inside = True, False
        m._hook.release(m._trace, True)
    _open.clear()
    _active.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _ranked(threads):
    """Threads, those that held or waited for the GIL longest first."""
    return sorted(threads, key=lambda t: -t.wanted_s)


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text):
    """text escaped for XML, the characters XML 1.0 cannot hold (thread names may have any)
    replaced."""
    import html

    return html.escape(_NOT_XML.sub("\ufffd", text))


def _subinterpreter_notes():
    """Subinterpreters may have their own GIL, which the hooks (on the main one) do not see."""
    for name in ("_interpreters", "_xxsubinterpreters"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        count = len(module.list_all())
        if count > 1:
            return [f"{count - 1} subinterpreter(s) exist: threads running under their own GIL are not covered"]
        return []
    return []


MIN_HOT_SPOT_SAMPLES = 10
GIL_BOUND_SHARE = 1 / 3  # a thread waited for the GIL this share of the wall time or more: GIL-bound
PARTLY_SHARE = 0.1  # less: the GIL cost the run under a tenth of its wall time
MOSTLY_PARALLEL = 2 / 3  # of the threads' CPU time ran without the GIL: it mostly releases it
SATURATED = 0.9  # of the cores the process may use busy (its own work, its children's, other work)
BLOCKED_LOOP_SHARE = 0.5  # of the samples in an event loop's callbacks, and
BLOCKED_LOOP_BUSY = 0.2  # of the wall time (GIL held x that share): a blocked event loop


def _convoys(report):
    """The threads in a convoy behind CPU threads: short holds between blocking calls, and half a
    switch interval or more to get the GIL back on a tenth of their takes or more (an echo
    thread takes it two to four times a message and waits once: its waits, not its takes, say
    what a wait costs); blocked meanwhile (little CPU time without the GIL: not a CPU thread in
    C code that releases it). That CPU time includes what its waits cost (take_gil's timed waits:
    about 150 us a message for an echo thread on a 2-vCPU VM), so it is weighed against the time
    outside the GIL, waits included: against its free time alone, a thread that waited most of
    its life read as running C code. Blocked in I/O, sleep or a lock (a thread waiting on
    futures): the counters cannot tell which."""
    interval = report.interval_s or 0.005
    return [t for t in report.threads
            if t.waits >= 20 and t.waits * 10 >= t.acquisitions and t.parallel_s < 0.25 * (t.free_s + t.wait_s)
            and t.held_s < 0.2 * interval * t.acquisitions and _typical_wait(t) >= 0.5 * interval]


def _typical_wait(thread):
    """A thread's median wait for the GIL (over the takes that waited), or its mean where there
    is no timeline for the median."""
    return thread.wait_p50_s or thread.wait_s / (thread.waits or 1)


def _convoy_sentence(convoys, interval):
    """One sentence for the threads in a convoy, the most starved named first."""
    convoys = sorted(convoys, key=lambda t: -t.wait_s)
    names = ", ".join(f"'{t.name}'" for t in convoys[:3]) + (f" and {len(convoys) - 3} more" if len(convoys) > 3 else "")
    low, high = (f"{f(_typical_wait(t) for t in convoys) * 1e3:.1f}" for f in (min, max))
    one = len(convoys) == 1
    return (
        f"Convoy: blocking thread{'' if one else 's'} {names} (I/O, sleep or a lock between short holds) typically "
        f"waited {low if low == high else f'{low}-{high}'} ms on {sum(t.waits for t in convoys)} of "
        f"{'its' if one else 'their'} {sum(t.acquisitions for t in convoys)} GIL reacquisitions (the switch interval "
        f"is {interval * 1e3:.0f} ms): a blocking call costs {'it' if one else 'each'} about that while CPU threads "
        f"run - give {'it' if one else 'them'} priority (gilfree.priority.background() around the CPU work) or move "
        f"the CPU work to processes."
    )


def _loop_findings(report):
    """The sentences on an event loop's thread: blocked by the program's own CPU work, or by
    pickling the arguments of the tasks it hands a gilfree.Pool."""
    if report.samples < MIN_HOT_SPOT_SAMPLES:
        return []
    found = []
    loop_share = report.loop_samples / report.samples
    if loop_share >= BLOCKED_LOOP_SHARE and loop_share * report.held_fraction >= BLOCKED_LOOP_BUSY:
        where = f", most in {report.loop_where}," if report.loop_where else ""
        thread = f" of thread '{_printable(report.loop_thread)}'" if report.loop_thread else ""
        found.append(
            f"Blocked event loop: {loop_share:.0%} of the samples found the GIL held by the program's own code "
            f"running in the event loop{thread} (a coroutine or a loop callback){where} and the GIL was held "
            f"{report.held_fraction:.0%} of the time: while that code runs, the loop answers nothing else. Hand "
            f"the CPU work to processes: `await pool.run(fn, *args)` on a gilfree.Pool (or "
            f"`await loop.run_in_executor(pool, fn, *args)`)."
        )
    # Not the program's CPU work, and not for processes to take over: the arguments are too big.
    submit_share = report.loop_submit_samples / report.samples
    if submit_share * report.held_fraction >= BLOCKED_LOOP_BUSY:
        found.append(
            f"Event loop pickling Pool arguments: {submit_share:.0%} of the samples found the event loop's thread "
            f"pickling the arguments of tasks it hands a gilfree.Pool, and the GIL was held "
            f"{report.held_fraction:.0%} of the time: meanwhile the loop answers nothing else. Pass small "
            f"arguments (an index, a path: the worker loads the data) or pool.share() large buffers and arrays."
        )
    return found


def verdict(report):
    """A sentence a person can act on, from the numbers of a Report.

    It rests on what processes could win back: waits for the GIL matter in proportion to the
    run's wall time (Report.gil_wait_share: the time one thread or more waited), not to the
    threads' busy time, which is small in an I/O-bound program, and within the cores the process
    did not use yet (Report.max_speedup). Busy time (holding the GIL, waiting for it, or running
    without it: CPU time outside it) and the threads' lives then say where the rest of the time went:
    blocked in I/O, sleep, locks or join() is not work, and neither is waiting for a CPU, which
    it may have been when the cores the process may use were busy.
    """
    threads = report.threads
    wall = report.wall_s or 1e-9
    cores = max(1, report.cores)
    share, speedup = report.gil_wait_share, report.max_speedup
    used = f"the process used {report.cpu_s / wall:.2f} of its {cores} core{'s' if cores != 1 else ''}"
    if report.children_cpu_s >= 0.05 * wall:  # they take cores processes could have had
        used += f" and its child processes {report.children_cpu_s / wall:.2f} more"
    gain = f"processes (gilfree.Pool) could make it at most ~{speedup:.1f}x faster on this machine's {cores} core{'s' if cores != 1 else ''}"
    top_held = max((t.held_s for t in threads), default=0.0)
    longest = max(0.0, max((t.wait_s for t in threads), default=0.0) - report.sampler_held_s)
    # Threads that waited a fair share of the longest wait and either held a fair share of the
    # GIL (not a main thread's few hand-overs around start() and join()) or are starved in a
    # convoy: an I/O thread holds next to nothing. The longest waiter always counts.
    convoys = _convoys(report)
    longest_waiter = max(threads, key=lambda t: t.wait_s, default=None)
    waiters = [t for t in threads if t.wait_s - report.sampler_held_s >= 0.1 * longest > 0
               and (t.held_s >= 0.05 * top_held or t in convoys or t is longest_waiter)]
    work = sum(t.busy_s for t in threads) or 1e-9
    parallel = sum(t.parallel_s for t in threads) / (sum(t.cpu_s for t in threads) or 1e-9)
    busiest = max((t.busy_s for t in threads), default=0.0)
    # Work is CPU time and waits for the GIL, not held time, which a thread preempted on a busy
    # CPU keeps counting: a main thread that only starts and joins the others does none.
    most = max((t.cpu_s + t.wait_s for t in threads), default=0.0)
    working = [t for t in threads if 0 < t.cpu_s + t.wait_s >= 0.1 * most]
    blocked = 1 - sum(t.busy_s for t in working) / (sum(max(t.alive_s, t.busy_s) for t in working) or 1e-9)
    first = max(waiters, key=lambda t: t.wait_s, default=None)
    which = f", '{first.name}'{', starved in the convoy below' if first in convoys else ''}," if first else ""
    waited = f"the longest-waiting thread{which} {longest / wall:.0%}"
    if share >= 1.25 * longest / wall:  # threads took turns waiting (a thread per request)
        waited = f"one or more of them waiting {share:.0%} of the run's wall time" + (f"; {waited}" if waiters else "")
    else:
        waited += " of the run's wall time"
    # No thread's own waits may stand out where many short-lived ones took turns.
    threads_waited = f"{len(waiters) or 'several'} thread{'s' if len(waiters) != 1 else ''} waited for the GIL ({waited})"
    parts = []
    quiet = False  # where the GIL sat is beside the point
    other = report.other_load_cores or 0.0
    # With the cores it may use busy, a thread that neither ran nor waited for the GIL may have
    # been runnable, waiting for a CPU: not blocked.
    saturated = (report.cpu_s + report.children_cpu_s) / wall + other >= SATURATED * cores
    if share >= PARTLY_SHARE and speedup < 1.1:
        parts.append(f"Not GIL-bound on this machine: {threads_waited}, but {used}: processes would not run it faster here.")
    elif share >= PARTLY_SHARE and parallel >= MOSTLY_PARALLEL:
        parts.append(
            f"Mostly releases the GIL: threads ran {parallel:.0%} of their CPU time without it, in parallel, and "
            f"{used}; their waits for it ({waited}) are what processes could still win back: {gain}."
        )
    elif share >= GIL_BOUND_SHARE:
        parts.append(
            f"GIL-bound: {threads_waited} while {used}; adding threads will not help - {gain}, as would "
            f"moving the CPU work to code that releases the GIL."
        )
    elif share >= PARTLY_SHARE:
        parts.append(
            f"Partly GIL-bound: {threads_waited} while {used}: {gain}, or with the CPU work in code that "
            f"releases the GIL."
        )
    else:
        quiet = True
        cost = (f"waiting for the GIL cost its threads {f'at most {share:.0%}' if share >= 0.01 else 'under 1%'} "
                f"of the wall time, which processes would not win back.")
        if report.children_cpu_s >= 0.5 * wall and report.children_cpu_s >= work:
            parts.append(
                f"Not GIL-bound: the work runs in its child processes ({report.children_cpu_s / wall:.2f} cores), "
                f"each with a GIL of its own; this process's threads were busy {work / wall:.0%} of the run's wall time."
            )
        elif work < 0.1 * wall:
            parts.append(
                f"Not GIL-bound: {'single-threaded and ' if len(working) <= 1 else ''}mostly idle: its threads "
                f"were busy {work / wall:.0%} of the run's wall time, and blocked (I/O, sleep, locks) or idle the rest."
            )
        elif len(working) <= 1 and top_held > 0.7 * wall:
            quiet = False
            parts.append(
                f"Not GIL-bound, but one thread held the GIL {top_held / wall:.0%} of the time and nobody "
                f"waited for it: the program is single-threaded CPU work; more cores need processes (gilfree.Pool)."
            )
        elif len(working) >= 2 and report.held_fraction > 0.7 and parallel < MOSTLY_PARALLEL:
            quiet = False
            parts.append(
                f"Not GIL-bound, but the GIL was held {report.held_fraction:.0%} of the time and nobody waited for it "
                f"long: its {len(working)} working threads took turns at CPU work that holds it, which is "
                f"single-threaded CPU work; more cores need processes (gilfree.Pool)."
            )
        elif len(working) <= 1 and parallel >= MOSTLY_PARALLEL and busiest >= 0.3 * wall:
            parts.append(
                f"Not GIL-bound: single-threaded, in code that releases the GIL: one thread did the work (busy "
                f"{busiest / wall:.0%} of the run's wall time), {parallel:.0%} of its CPU time without the GIL (C code "
                f"such as Pillow, hashlib or zlib): threads would run such calls in parallel - a ThreadPoolExecutor, "
                f"or `loop.run_in_executor(None, fn, *args)` in asyncio - on up to the machine's {cores} cores."
            )
        elif len(working) <= 1:
            parts.append(
                f"Not GIL-bound: single-threaded: one thread did the work (busy {busiest / wall:.0%} of the run's "
                f"wall time) and nobody waited for the GIL long."
            )
        elif blocked >= 0.5 and saturated:
            others = f" and other work ~{other:.1f} more" if other >= 0.05 else ""
            parts.append(
                f"Not GIL-bound: short of CPU: its {len(working)} working threads neither ran nor waited for the GIL "
                f"{blocked:.0%} of their lives while the cores it may use were busy ({used}{others}): waiting for "
                f"a CPU, or blocked (I/O, sleep, locks), which the counters cannot tell apart; {cost}"
            )
        elif blocked >= 0.5:
            parts.append(
                f"Not GIL-bound: I/O-bound: its {len(working)} working threads were blocked (I/O, sleep, locks) "
                f"{blocked:.0%} of their lives and {used}; {cost}"
            )
        elif parallel >= MOSTLY_PARALLEL:
            parts.append(
                f"Not GIL-bound: mostly releases the GIL: threads ran {parallel:.0%} of their CPU time without it, "
                f"in parallel, and {used}; threads scale here: {cost}"
            )
        else:
            parts.append(f"Not GIL-bound: threads ran {parallel:.0%} of their CPU time without the GIL, seldom at "
                         f"the same time, and {used}; {cost}")
    if not quiet and other >= 0.5:
        waits = "the waits may be longer, and the cores left for processes fewer," if share >= PARTLY_SHARE \
            else "fewer cores are left for processes"
        parts.append(f"Other work kept ~{other:.1f} of the machine's cores busy meanwhile: {waits} than on an idle machine.")
    if convoys:
        parts.append(_convoy_sentence(convoys, report.interval_s or 0.005))
    # The event loop's findings lead: the rest describes the threads, the loop being one of them.
    parts[:0] = _loop_findings(report)
    # A hot spot is worth naming when the GIL is what the program waits on or holds, and when
    # there are enough samples for a share to mean something.
    if report.top_functions and report.samples >= MIN_HOT_SPOT_SAMPLES and not quiet:
        name, share = report.top_functions[0]
        parts.append(f"The GIL was held most in {name} ({share:.0%} of samples).")
    return " ".join(parts)


def monitor(trace=True, sample_hz=0.0, trace_budget_bytes=_TRACE_BUDGET):
    """A Monitor: ``with gilfree.gil.monitor() as m: ...; print(m.report())``.

    trace: record the timeline (needed for wait percentiles, write_trace, write_svg).
    sample_hz: sample which function holds the GIL this many times a second (0: off).
    trace_budget_bytes: memory for timeline events (16 bytes each), while recording and in the
    monitor; beyond it events are dropped (report.dropped_events), each thread's timeline ends
    where its events were lost (report.lost_after_s), and the totals stay exact.
    Raises UnsupportedInterpreter on entry where exact accounting is impossible.
    """
    return Monitor(trace=trace, sample_hz=sample_hz, trace_budget_bytes=trace_budget_bytes)


_counting = False
_unrecorded_ns = [0, 0]  # held and wait time of spans open at a stop(), which the records drop


def counters():
    """Cumulative GIL numbers of the process, for a metrics endpoint (Prometheus counters).

    The first call starts the accounting; stop() pauses it and a later call resumes it. The
    totals never go back to zero in a process (as Prometheus counters must not): after a stop()
    they carry on from where they were, without what happened while stopped.

    Returns a dict: held_s, wait_s, waits, acquisitions, switches, forced_switches (totals), and
    threads: the threads alive now that the hooks have seen. Its cost grows with those, not with
    the threads that have ended.
    """
    global _counting
    hook = _hook()
    with _lock:
        if not _counting:
            hook.acquire(False, 0, False)
            _counting = True
        _sync(hook)  # ended threads' records are folded into the totals
        live, held, wait, acquisitions, waits, switches, _, requests = hook.totals()
    return {
        "held_s": (held + _unrecorded_ns[0]) / 1e9,
        "wait_s": (wait + _unrecorded_ns[1]) / 1e9,
        "waits": waits,
        "acquisitions": acquisitions,
        "switches": switches,
        "forced_switches": requests,
        "threads": live,
    }


def stop():
    """Pauses the accounting counters() started, keeping its totals (monitors and priorities keep
    theirs): the next counters() resumes it."""
    global _counting
    with _lock:
        if _counting:
            hook = _hook()
            open_spans = hook.totals()
            hook.release(False, False)
            # A thread holding or waiting for the GIL now has that span in the totals only while
            # the hooks are in: its record keeps spans that ended. Kept here, so totals never drop.
            recorded = hook.totals()
            for i, index in enumerate((1, 2)):  # held, wait
                _unrecorded_ns[i] += max(0, open_spans[index] - recorded[index])
            _counting = False

