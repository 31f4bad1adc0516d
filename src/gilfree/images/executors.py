"""The service's executor: one object with the concurrent.futures interface plus ``stats()``.

- ``pool`` (default): ``gilfree.Pool``; bytes travel through its shared-memory arena, a task over
  the time budget has its worker killed and replaced (TaskTimeout), a dead worker fails only its own
  task (WorkerCrashed) and is replaced. A Pool whose template process died is broken for good
  (BrokenPool): RebuildingPool replaces it with a new one.
- ``threads``: the naive way, a ThreadPoolExecutor in the server process; every worker shares the
  server's GIL with the event loop. Kept for comparison.
- ``mp``: the textbook fix, ``multiprocessing.Pool`` behind a Future adapter. Kept for comparison:
  it cannot stop a task over its budget, and a killed worker's task never completes (the request
  then ends at its time budget with 504).
"""
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
import threading
import time

from ..errors import signal_name
from ..pool import Pool

KINDS = ("pool", "threads", "mp")
_log = logging.getLogger("gilfree.images")
_RECORDS = 4096  # mp's task start records, by task id modulo this: far more than tasks in flight at once


def make_executor(kind, workers, task_timeout, worker_nice=0):
    """Returns the executor for kind; task_timeout is only enforced by ``pool``. Every kind's
    workers (processes or threads) run `worker_nice` steps nicer than the server, so that the
    event loop answering /health gets a core as soon as it wants one on a saturated machine."""
    # os.nice is per thread on Linux: in a worker thread it leaves the event loop's thread alone.
    initializer, initargs = (os.nice, (worker_nice,)) if worker_nice else (None, ())
    if kind == "pool":
        return RebuildingPool(functools.partial(
            _ReportingPool, max_workers=workers, task_timeout=task_timeout, preload=("gilfree.images.ops",),
            initializer=initializer, initargs=initargs))
    if kind == "threads":
        return ThreadExecutor(workers, initializer, initargs)
    if kind == "mp":
        return MultiprocessingExecutor(workers, initializer, initargs)
    raise ValueError(f"executor must be one of {', '.join(KINDS)}, not {kind!r}")


class _ReportingPool(Pool):
    """A gilfree.Pool that logs each worker death in one line: the pool replaces the worker and fails only the task
    it ran, so the log is all an operator has. _worker_died is the Pool's (internal) handler of a death, run on its
    waiter thread: nothing on the requests' path."""

    def _worker_died(self, task_id, slot, pid, status, timed_out, was_ready):
        if timed_out:
            what = f"ran a task over its {self._task_timeout:g} s budget: killed"
        elif os.WIFSIGNALED(status):
            what = f"was killed by {signal_name(os.WTERMSIG(status))}"
        else:
            what = f"exited with code {os.WEXITSTATUS(status)}"
        when = "while running a task" if task_id else "while idle" if was_ready else "while starting"
        _log.warning("image worker %d (slot %d) %s %s; a new worker replaces it", pid, slot, what, when)
        super()._worker_died(task_id, slot, pid, status, timed_out, was_ready)


class RebuildingPool(concurrent.futures.Executor):
    """A gilfree.Pool that is replaced when it breaks. The Pool breaks for good when its template process dies
    (SIGKILLed by the OOM killer, say): its futures out fail with BrokenPool and so would every later submit.
    The next submit (or stats(), or check()) shuts the broken pool down, which reaps its template, and starts
    a new one; that counts as one restart. A rebuilt pool that breaks within REBUILD_INTERVAL seconds of its
    start, or a rebuild that raises, is not retried: the executor is failed (`failed` says why) and every
    submit raises BrokenPool, so that /health can say 503 and a supervisor restart the process.
    Only the event loop thread calls it."""

    REBUILD_INTERVAL = 10.0

    def __init__(self, make):
        self._make = make
        self._pool = make()
        self._rebuilt_at = None  # monotonic time of the last rebuild; None: the first pool
        self.failed = None  # why no pool runs any more
        self._rebuilds = 0
        self._before = {"tasks": 0, "restarts": 0, "bytes_in": 0, "bytes_out": 0}  # replaced pools' totals
        self._slot_tasks = {}  # replaced pools' tasks per worker slot

    def check(self):
        """Replaces the pool if it broke; returns the reason the executor failed, or None."""
        if self.failed is None and self._pool._broken is not None:
            self._replace(self._pool._broken)
        return self.failed

    def submit(self, fn, /, *args, **kwargs):
        from ..pool import BrokenPool

        if self.check() is None:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenPool:  # broke since check()
                if self.check() is None:
                    return self._pool.submit(fn, *args, **kwargs)
        raise BrokenPool(self.failed)

    def _replace(self, reason):
        from ..pool import BrokenPool

        old, self._pool = self._pool, None
        try:
            stats = old.stats()
        except BrokenPool:  # closed already: nothing to carry over
            stats = {"workers": [], **dict.fromkeys(self._before, 0)}
        for key in self._before:
            self._before[key] += stats[key]
        for worker in stats["workers"]:
            self._slot_tasks[worker["slot"]] = self._slot_tasks.get(worker["slot"], 0) + worker["tasks"]
        self._rebuilds += 1
        # Its futures have failed already; closing it kills what is left of its workers and reaps the template
        # (up to a second's grace): not in the event loop.
        threading.Thread(target=old.shutdown, name="gilfree-images-old-pool", daemon=True).start()
        now = time.monotonic()
        if self._rebuilt_at is not None and now - self._rebuilt_at < self.REBUILD_INTERVAL:
            self.failed = (f"{reason}, {now - self._rebuilt_at:.1f} s after the pool was rebuilt: not rebuilt "
                           "again; restart the service")
        else:
            self._rebuilt_at = now
            try:
                self._pool = self._make()
            except Exception as exc:
                self.failed = f"{reason}, and a new pool could not start: {exc!r}; restart the service"
        if self.failed is None:
            _log.warning("the image worker pool broke (%s): replaced by a new pool", reason)
        else:
            _log.warning("the image worker pool failed for good: %s. Transforms and /health answer 503 from now on",
                         self.failed)

    def stats(self):
        self.check()
        before = self._before
        if self._pool is None:
            return {"workers": [], "queued": 0, "running": 0, "busy_workers": 0, **before,
                    "restarts": before["restarts"] + self._rebuilds}
        stats = self._pool.stats()
        for key in before:
            stats[key] += before[key]
        stats["restarts"] += self._rebuilds
        for worker in stats["workers"]:
            worker["tasks"] += self._slot_tasks.get(worker["slot"], 0)
        return stats

    def shutdown(self, wait=True, *, cancel_futures=False):
        """cancel_futures=True also stops the tasks running, as mp's terminate() does: the service shuts its
        executor down once every request has ended, so such a task's request timed out and its result has nobody
        to go to; waiting for it (up to its task_timeout, which counts from the task's start) could take the
        stop up to twice the budget."""
        if self._pool is None:
            return
        if cancel_futures:
            self._pool._interrupted()  # as a with block left on Ctrl-C: kills the workers now, cancels the rest
        else:
            self._pool.shutdown(wait=wait)


class _Counts:
    """Task accounting for the threads executor, reported in Pool.stats()'s shape."""

    def __init__(self):
        self._lock = threading.Lock()  # task threads, callbacks and the event loop all update these
        self._submitted = 0
        self._done = 0
        self._running = 0

    def track(self, future):
        with self._lock:
            self._submitted += 1
        future.add_done_callback(self._finished)  # every end: result, exception or cancel

    def _finished(self, _future):
        with self._lock:
            self._done += 1

    def started(self):
        with self._lock:
            self._running += 1

    def stopped(self):
        with self._lock:
            self._running -= 1

    def stats(self):
        with self._lock:
            in_flight = self._submitted - self._done
            # Per-worker figures need the workers' cooperation, which this executor lacks.
            return {"workers": [], "tasks": self._done, "queued": max(0, in_flight - self._running),
                    "running": self._running, "busy_workers": self._running, "restarts": 0, "bytes_in": 0,
                    "bytes_out": 0}


class ThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts busy threads."""

    def __init__(self, workers, initializer=None, initargs=()):
        super().__init__(max_workers=workers, thread_name_prefix="gilfree-images", initializer=initializer,
                         initargs=initargs)
        self._counts = _Counts()

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(self._counted, fn, args, kwargs)
        self._counts.track(future)
        return future

    def _counted(self, fn, args, kwargs):
        self._counts.started()
        try:
            return fn(*args, **kwargs)
        finally:
            self._counts.stopped()

    def stats(self):
        return self._counts.stats()


class MultiprocessingExecutor(concurrent.futures.Executor):
    """multiprocessing.Pool's apply_async behind concurrent.futures Futures. The pool says neither when a task
    starts nor that a worker died with one: the workers record which task each starts, so stats() counts what
    runs, and drops a task whose worker is gone (its future never completes)."""

    def __init__(self, workers, initializer=None, initargs=()):
        context = multiprocessing.get_context("spawn")  # the server has threads by the time anything could fork
        # (pid, task id) pairs; no lock: a worker killed holding it would hang stats() for good.
        self._started = context.Array("q", 2 * _RECORDS, lock=False)
        self._pool = context.Pool(workers, _worker_init, (self._started, initializer, initargs))
        self._lock = threading.Lock()  # the pool's result thread and the event loop
        self._pending = set()  # task ids the pool has not reported back
        self._ids = itertools.count(1)
        self._done = 0

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        task = next(self._ids)
        with self._lock:
            self._pending.add(task)
        self._pool.apply_async(_recorded, (task, fn, args, kwargs),
                               callback=functools.partial(self._report, task, future.set_result),
                               error_callback=functools.partial(self._report, task, future.set_exception))
        return future

    def _report(self, task, settle, outcome):
        self._forget(task)
        settle(outcome)

    def _forget(self, task):
        with self._lock:
            if task in self._pending:
                self._pending.remove(task)
                self._done += 1

    def stats(self):
        live = {process.pid for process in multiprocessing.active_children()}
        with self._lock:
            pending = list(self._pending)
        busy, queued = set(), 0
        for task in pending:
            slot = 2 * (task % _RECORDS)
            if self._started[slot + 1] != task:  # task id first: the worker writes its pid before it
                queued += 1
            elif self._started[slot] in live:
                busy.add(self._started[slot])
            else:  # its worker died running it: the pool will never report it
                self._forget(task)
        return {"workers": [], "tasks": self._done, "queued": queued, "running": len(busy),
                "busy_workers": len(busy), "restarts": 0, "bytes_in": 0, "bytes_out": 0}

    def shutdown(self, wait=True, *, cancel_futures=False):
        if cancel_futures or not wait:
            self._pool.terminate()
        else:
            self._pool.close()
        if wait:
            self._pool.join()


_started = None  # in an mp worker: the executor's start records


def _worker_init(started, initializer, initargs):
    """multiprocessing workers' initializer. A process group of their own, so a signal to the server's group
    (a service manager's stop, Ctrl-C) reaches only the server, which then stops them. Killed by that signal,
    an idle worker dies holding the pool's task-queue lock, and Pool.terminate() waits for that lock forever."""
    global _started
    _started = started
    os.setpgrp()
    if initializer is not None:
        initializer(*initargs)


def _recorded(task, fn, args, kwargs):
    """Runs fn(*args, **kwargs) in an mp worker once this process is recorded as running task."""
    slot = 2 * (task % _RECORDS)
    _started[slot] = os.getpid()
    _started[slot + 1] = task
    return fn(*args, **kwargs)
