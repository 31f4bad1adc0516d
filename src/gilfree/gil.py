"""Exact GIL accounting for a running program.

``with gilfree.gil.monitor() as m: ...`` then ``m.report()``: per thread, how long it held the
GIL, how long and how often it waited for it, how long it ran without it, how often it was
asked to drop it; a verdict; ``m.write_trace(path)`` (Chrome trace JSON, opens in Perfetto) and
``m.write_svg(path)``. ``counters()`` gives cheap cumulative numbers for a metrics endpoint.

The measurements come from ``gilfree._gilhook``: hooks on the pthread calls of CPython's own
take_gil/drop_gil, recorded without the GIL (see docs/gil.md).
"""
import html
import json
import os
import re
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from .errors import UnsupportedInterpreter

__all__ = ["monitor", "counters", "stop", "Monitor", "Report", "ThreadReport", "UnsupportedInterpreter"]

_SLICE = struct.Struct("=IIQQQQII")  # _gilhook.slices()
_TRACE_BUDGET = 256 << 20
MAX_TRACE_SLICES = 200_000
TOP_THREADS = 20  # rows of the report's table and picture, by held + wait time
# Rows of _gilhook.threads(). _ID identifies a thread's record: the kernel reuses native ids
# (_TID) once a thread has ended, so every per-thread table is keyed by _ID.
_ID, _TID, _FIRST, _EXIT, _HELD, _WAIT, _ACQ, _WAITS, _SWITCHES, _FORCED, _REQUESTS, _TIMEOUTS, _STATE, _PRIO, _LOST, _CPU = range(16)


def _hook():
    """The binding module; raises UnsupportedInterpreter if it cannot load here."""
    try:
        from . import _gilhook
    except ImportError as exc:
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

    def to_dict(self):
        d = asdict(self)
        d["threads"] = [asdict(t) for t in self.threads]
        return d

    def __str__(self):
        lines = [
            f"GIL report: wall {self.wall_s:.3f} s, GIL held {self.held_fraction:.1%}, "
            f"{self.switches} switches, {self.forced_switches} forced (drop requests)",
            f"{'thread':<24} {'tid':>8} {'held s':>8} {'wait s':>8} {'free s':>8} {'waits':>7} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        ]
        ranked = _ranked(self.threads)
        for t in ranked[:TOP_THREADS]:
            name = t.name[:23] + "*" if t.lost_after_s is not None else t.name[:24]
            lines.append(
                f"{name:<24} {t.tid:>8} {t.held_s:>8.3f} {t.wait_s:>8.3f} {t.free_s:>8.3f} "
                f"{t.waits:>7} {t.wait_p50_s * 1e3:>8.2f} {t.wait_p99_s * 1e3:>8.2f} {t.wait_max_s * 1e3:>8.2f}"
            )
        if len(ranked) > TOP_THREADS:
            rest = ranked[TOP_THREADS:]
            lines.append(f"... and {len(rest)} more threads (held {sum(t.held_s for t in rest):.3f} s, "
                         f"waited {sum(t.wait_s for t in rest):.3f} s; all in Report.threads)")
        if self.top_functions:
            lines.append(f"held the GIL most ({self.samples} samples): " + ", ".join(f"{name} {share:.0%}" for name, share in self.top_functions))
        if self.dropped_events:
            lines.append(
                f"({self.dropped_events} timeline events dropped: memory budget reached"
                + (f"; from {self.lost_after_s:.3f} s on, the timeline (trace, picture) and the wait percentiles "
                   f"of the threads marked * are partial" if self.lost_after_s is not None else "")
                + "; held, wait, waits and the other totals are exact)"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append("verdict: " + self.verdict)
        return "\n".join(lines)


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
    """Adds the names of the Python threads alive in rows to names (record id -> name)."""
    live = _live_records(rows)
    for native_id, t in _threads():
        if native_id in live:
            names[live[native_id]] = t.name


def _record_name(*_):
    """threading's profile function while monitors are open: runs first thing in each new
    thread (which took the GIL through the hooks, so it has a record) and names it for them."""
    key, name = _hook().record_id(), threading.current_thread().name
    for m in list(_open):
        m._names[key] = name
    sys.setprofile(_profile_before)


class _Sampler(threading.Thread):
    """Wakes at a low rate; whoever it had to take the GIL from was running: count its function."""

    def __init__(self, hook, rate_hz):
        super().__init__(name="gilfree-sampler", daemon=True)
        self._hook, self._period = hook, 1.0 / rate_hz
        self._stop_event = threading.Event()
        self.counts = {}
        self.record = None  # its own record id, left out of the report

    def run(self):
        self.record = self._hook.record_id()
        ids = {}
        while not self._stop_event.wait(self._period):
            holder = self._hook.took_from()
            if not holder:
                continue
            if holder not in ids:
                ids = {native_id: t.ident for native_id, t in _threads()}
            frame = sys._current_frames().get(ids.get(holder))
            if frame is None:
                continue
            code = frame.f_code
            key = f"{getattr(code, 'co_qualname', code.co_name)} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"
            self.counts[key] = self.counts.get(key, 0) + 1

    def stop(self):
        self._stop_event.set()
        self.join()


# Draining and reaping run under _lock, with the monitors' windows opening and closing.
_lock = threading.Lock()
_open = []  # monitors inside their window: they get the final rows of threads reaped meanwhile
_active = []  # of which collect events: drained events go to each of them
_profile_before = None  # threading's profile function before the first monitor opened


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
        global _profile_before
        with _lock:
            hook.acquire(self._trace, self._budget, True)  # keep: ended threads' rows until reaped
            self._dropped0 = hook.dropped()
            _sync(hook)  # what came before belongs to earlier monitors
            self._t0, rows = hook.threads()
            self._complete_until = self._t0
            if not _open:
                _profile_before = threading.getprofile()
                threading.setprofile(_record_name)
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
            _sync(hook)
            _open.remove(self)
            if not _open:
                threading.setprofile(_profile_before)
            if self._trace:
                _active.remove(self)
            self._dropped = hook.dropped() - self._dropped0 + self._refused
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
        # The first record made in the window for each native id of a thread unseen at the
        # start is that thread's: a thread ends through a hooked release, so one that ended
        # before its id was reused has a record, made before.
        first_made = {}
        for key, row in sorted(self._end.items(), key=lambda kv: -kv[1][_FIRST]):
            if key not in self._start and row[_TID] in self._unseen:
                first_made[row[_TID]] = key
        threads, self._keys, switches, forced, held_total = [], [], 0, 0, 0
        for key in set(self._end) | set(self._alive):
            if key == sampler:
                continue
            row = self._end.get(key)
            start = self._start.get(key)
            if row is None:
                row = (key, -key, self._t0, 0) + (0,) * 12
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
                          or f"thread-{row[_TID]}"),
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
        top, total = [], 0
        if self._sampler and self._sampler.counts:
            total = sum(self._sampler.counts.values())
            top = [(name, n / total) for name, n in sorted(self._sampler.counts.items(), key=lambda kv: -kv[1])[:3]]
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
        )
        report.verdict = verdict(report)
        return report

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
        if not self._trace:
            raise ValueError("this monitor was created with trace=False")
        report = self.report()
        spans = sum(self._summary[key][1] for key in self._keys if key in self._summary)
        tracks = sum(1 for key in self._keys if key in self._summary) or 1
        resolution = 0 if spans <= MAX_TRACE_SLICES else max(1000, 3 * tracks * (self._t1 - self._t0) // MAX_TRACE_SLICES)
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
        as the thread was busy there)."""
        if not self._trace:
            raise ValueError("this monitor was created with trace=False")
        report = self.report()
        row, label, top = 22, 180, 30
        by_thread = dict(zip(map(id, report.threads), self._keys))
        ranked = _ranked(report.threads)
        rows = [(by_thread[id(t)], t) for t in ranked[:TOP_THREADS]]
        more = len(ranked) - len(rows)
        height = top + row * (len(rows) + (more > 0)) + 40
        scale = width / max(1, self._t1 - self._t0)
        colors = {self._hook.STATE_HELD: "#2ca02c", self._hook.STATE_WANT: "#d62728"}
        y_of = {key: top + i * row for i, (key, _) in enumerate(rows)}
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{label + width + 10}" height="{height}" '
            f'font-family="sans-serif" font-size="12">',
            f'<text x="4" y="18">GIL timeline, {report.wall_s:.3f} s, held {report.held_fraction:.0%}: '
            f'green held, red waiting, grey free</text>',
        ]
        for key, t in rows:
            y = y_of[key]
            out.append(f'<text x="4" y="{y + 14}">{_xml_text(t.name[:24])}</text>')
            out.append(f'<rect x="{label}" y="{y}" width="{width}" height="{row - 4}" fill="#cccccc"/>')
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
        out.append(f'<text x="4" y="{height - 12}">{_xml_text(report.verdict[:200])}</text>')
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
    if _open:
        threading.setprofile(_profile_before)
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


def verdict(report):
    """A sentence a person can act on, from the numbers of a Report.

    Waiting is weighed against the time threads were busy (holding the GIL, waiting for it, or
    running without it: their CPU time outside it), not against the run's wall time, which
    idle stretches would dilute; time blocked in I/O, sleep, locks or join() is not work.
    """
    threads = report.threads
    wall = report.wall_s or 1e-9
    work = sum(t.busy_s for t in threads) or 1e-9
    waited = sum(t.wait_s for t in threads) / work
    parallel = sum(t.parallel_s for t in threads) / work
    busiest = max((t.busy_s for t in threads), default=0.0)
    working = [t for t in threads if 0 < t.busy_s >= 0.1 * busiest]
    top_held = max((t.held_s for t in threads), default=0.0)
    # Threads that hold a fair share of the GIL and spend a fair share of their work waiting.
    contenders = [t for t in threads if 0 < t.held_s >= 0.05 * top_held and t.wait_s >= 0.1 * t.busy_s]
    contended = sum(t.wait_s for t in contenders) / (sum(t.busy_s for t in contenders) or 1e-9)
    parts = []
    quiet = False  # where the GIL sat is beside the point
    if len(contenders) >= 2 and contended >= 0.3:
        parts.append(
            f"GIL-bound: {len(contenders)} threads waited for the GIL {contended:.0%} of the time they were busy "
            f"(holding it, waiting for it or running without it); adding threads will not help - move this "
            f"work to processes (gilfree.Pool) or to code that releases the GIL."
        )
    elif work < 0.1 * wall:
        quiet = True
        parts.append(
            f"Not GIL-bound: {'single-threaded and ' if len(working) <= 1 else ''}mostly idle: its threads "
            f"were busy {work / wall:.0%} of the run's wall time, and blocked (I/O, sleep, locks) or idle the rest."
        )
    elif waited < 0.05:
        quiet = True
        if len(working) <= 1 and top_held > 0.7 * wall:
            quiet = False
            parts.append(
                f"Not GIL-bound, but one thread held the GIL {top_held / wall:.0%} of the time and nobody "
                f"waited for it: the program is single-threaded CPU work; more cores need processes (gilfree.Pool)."
            )
        elif len(working) <= 1:
            parts.append(
                f"Not GIL-bound: single-threaded: one thread did the work (busy {busiest / wall:.0%} of the run's "
                f"wall time) and nobody waited for the GIL."
            )
        else:
            parts.append(
                f"Not GIL-bound: threads ran {parallel:.0%} of their busy time without the GIL and waited "
                f"{waited:.0%} of it; threads scale here."
            )
    elif parallel >= 0.5:
        parts.append(
            f"Mostly releases the GIL: threads ran {parallel:.0%} of their busy time without it, in parallel; "
            f"their waits ({waited:.0%} of it) are what processes (gilfree.Pool) would still win back."
        )
    else:
        parts.append(
            f"Partly GIL-bound: threads waited for the GIL {waited:.0%} of their busy time (held it "
            f"{1 - waited - parallel:.0%}); the waiting threads would run sooner in processes (gilfree.Pool) or "
            f"with the CPU work in code that releases the GIL."
        )
    interval = report.interval_s or 0.005
    for t in report.threads:
        if t.acquisitions < 20:
            continue
        per_take, per_hold = t.wait_s / t.acquisitions, t.held_s / t.acquisitions
        # Short holds between blocking calls, then about an interval to get the GIL back.
        if per_hold < 0.2 * interval and per_take >= 0.5 * interval:
            parts.append(
                f"Convoy: I/O thread '{t.name}' waited {per_take * 1e3:.1f} ms per GIL reacquisition, about one "
                f"switch interval ({interval * 1e3:.0f} ms): every blocking call costs it that while CPU threads "
                f"run - give it priority (gilfree.priority.background() around the CPU work) or move the CPU "
                f"work to processes."
            )
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


def counters():
    """Cumulative GIL numbers since accounting started (the first call starts it; stop() ends it).

    Returns a dict: held_s, wait_s, waits, acquisitions, switches, forced_switches, and threads:
    the threads alive now that the hooks have seen. Its cost grows with those, not with the
    threads that have ended.
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
        "held_s": held / 1e9,
        "wait_s": wait / 1e9,
        "waits": waits,
        "acquisitions": acquisitions,
        "switches": switches,
        "forced_switches": requests,
        "threads": live,
    }


def stop():
    """Ends the accounting counters() started (monitors and priorities keep theirs)."""
    global _counting
    with _lock:
        if _counting:
            _hook().release(False, False)
            _counting = False

