"""The service's executor: one object with the concurrent.futures interface plus ``stats()``.

- ``pool`` (default): ``gilfree.Pool``; bytes travel through its shared-memory arena, a task over
  the time budget has its worker killed and replaced (TaskTimeout), a dead worker fails only its own
  task (WorkerCrashed) and is replaced.
- ``threads``: the naive way, a ThreadPoolExecutor in the server process; every worker shares the
  server's GIL with the event loop. Kept for comparison.
- ``mp``: the textbook fix, ``multiprocessing.Pool`` behind a Future adapter. Kept for comparison:
  it cannot stop a task over its budget, and a killed worker's task never completes (the request
  then ends at its time budget with 504).
"""
import concurrent.futures
import multiprocessing
import os
import threading

KINDS = ("pool", "threads", "mp")


def make_executor(kind, workers, task_timeout, worker_nice=0):
    """Returns the executor for kind; task_timeout is only enforced by ``pool``. Every kind's
    workers (processes or threads) run `worker_nice` steps nicer than the server, so that the
    event loop answering /health gets a core as soon as it wants one on a saturated machine."""
    # os.nice is per thread on Linux: in a worker thread it leaves the event loop's thread alone.
    initializer, initargs = (os.nice, (worker_nice,)) if worker_nice else (None, ())
    if kind == "pool":
        from .. import Pool

        return Pool(max_workers=workers, task_timeout=task_timeout, preload=("gilfree.images.ops",),
                    initializer=initializer, initargs=initargs)
    if kind == "threads":
        return ThreadExecutor(workers, initializer, initargs)
    if kind == "mp":
        return MultiprocessingExecutor(workers, initializer, initargs)
    raise ValueError(f"executor must be one of {', '.join(KINDS)}, not {kind!r}")


class _Counts:
    """Task accounting for the comparison executors, reported in Pool.stats()'s shape."""

    def __init__(self, workers):
        self.workers = workers
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

    def stats(self, running=None):
        """running: the caller's count when it knows better than started()/stopped()."""
        with self._lock:
            in_flight = self._submitted - self._done
            running = self._running if running is None else running(in_flight)
            # Per-worker figures need the workers' cooperation, which these executors lack.
            return {"workers": [], "tasks": self._done, "queued": max(0, in_flight - running),
                    "running": running, "busy_workers": running, "restarts": 0, "bytes_in": 0,
                    "bytes_out": 0}


class ThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts busy threads."""

    def __init__(self, workers, initializer=None, initargs=()):
        super().__init__(max_workers=workers, thread_name_prefix="gilfree-images", initializer=initializer,
                         initargs=initargs)
        self._counts = _Counts(workers)

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
    """multiprocessing.Pool's apply_async behind concurrent.futures Futures."""

    def __init__(self, workers, initializer=None, initargs=()):
        # spawn: the server has threads by the time anything could fork.
        self._pool = multiprocessing.get_context("spawn").Pool(workers, _own_process_group, (initializer, initargs))
        self._counts = _Counts(workers)

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        self._counts.track(future)
        self._pool.apply_async(fn, args, kwargs, callback=future.set_result, error_callback=future.set_exception)
        return future

    def stats(self):
        # The pool does not say when a task starts: tasks in flight fill the workers first.
        return self._counts.stats(running=lambda in_flight: min(in_flight, self._counts.workers))

    def shutdown(self, wait=True, *, cancel_futures=False):
        if cancel_futures or not wait:
            self._pool.terminate()
        else:
            self._pool.close()
        if wait:
            self._pool.join()


def _own_process_group(initializer, initargs):
    """multiprocessing workers' initializer: a process group of their own, so a signal to the server's group
    (a service manager's stop, Ctrl-C) reaches only the server, which then stops them. Killed by that signal,
    an idle worker dies holding the pool's task-queue lock, and Pool.terminate() waits for that lock forever."""
    os.setpgrp()
    if initializer is not None:
        initializer(*initargs)
