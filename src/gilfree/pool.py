"""gilfree.Pool: a process pool whose transport, scheduling and worker management are C.

Threads in the parent:
- the caller's threads run ``submit`` (pickling, then a C call that writes the task into a
  worker's ring or the queue) and may collect results themselves while they wait in
  ``Future.result`` (spinning briefly without the GIL: no thread hand-off on the fast path);
- one C thread (started by ``Engine.start_waiter``) sleeps in epoll without the GIL, wakes on
  results, worker exits and timeouts, and completes futures in batches (``_on_events``).
"""
import concurrent.futures
import functools
import io
import itertools
import operator
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from concurrent.futures._base import FINISHED, PENDING, RUNNING

from . import _engine
from ._executor import PoolBase, is_ctrl_c, process_pool_options, with_remote_traceback
from ._serialize import Codec, blob_never_stale, by_value_pickler, function_blob, names_main, with_task
from ._worker import EXIT_ADDRESS_SPACE, WorkerConfig
from .errors import TaskTimeout, WorkerCrashed, oom_kill_counter, read_oom_kills, signal_name

RING_BYTES = 1 << 20
# Virtual: the memfd is sparse, pages exist only while buffers do. Half is the parent's, half is
# split between the workers, each of which keeps at least WORKER_ARENA_BYTES for its results.
ARENA_BYTES = 64 << 30
WORKER_ARENA_BYTES = 4 << 30
# How long a thread waiting for a result polls the rings itself before it sleeps (see
# Pool._waited).
RESULT_SPIN_MAX_S = 200e-6
RESULT_SPIN_MIN_S = 50e-6
SPIN_PROBE_EVERY = 64
# Workers dying before they ever start (a failing initializer, say) break the pool after this
# many attempts in a row: retrying forever would hide the error.
MAX_START_FAILURES = 3
# Attempts at delivering an event whose handling raised (see Pool._redeliver); each attempt
# finishes what the one before did not, the bound only keeps a bug from spinning forever.
REDELIVERY_ATTEMPTS = 100
# The template must find gilfree (and the user's modules) on the parent's sys.path.
_TEMPLATE_CODE = (
    "import sys; sys.path[:] = sys.argv[6:]; from gilfree._worker import template_main; "
    "template_main()"
)


class BrokenPool(concurrent.futures.process.BrokenProcessPool):
    """The pool cannot run tasks any more (its template died, or workers cannot start)."""


_lazy_lock = threading.Lock()  # makes a future's condition or lists, once (rare path)


class _Future(concurrent.futures.Future):
    """A concurrent.futures.Future that is cheap to create and complete, and whose result()
    collects results itself before falling back to waiting.

    The Condition and the two lists every Future carries are made only when somebody needs them
    (a waiter, a callback, a timeout): most futures of a busy pool are completed and read
    without them, and fewer objects per future also means less work for the garbage collector.
    Completion sets the state first and looks for a condition second, so a waiter that made one
    meanwhile is either notified or sees the final state (the GIL orders the two)."""

    _lazy_condition = None
    _lazy_waiters = None
    _lazy_callbacks = None
    _started = False  # a worker was seen running it

    def __init__(self, pool_ref, task_id):
        self._state = PENDING
        self._result = None
        self._exception = None
        self._pool_ref = pool_ref
        self._task_id = task_id

    def _make_lazy(self, name, factory):
        """Returns the attribute `name`, made by factory() on first use by whichever thread."""
        with _lazy_lock:
            value = getattr(self, name)
            if value is None:
                value = factory()
                setattr(self, name, value)
        return value

    @property
    def _condition(self):
        condition = self._lazy_condition
        return condition if condition is not None else self._make_lazy("_lazy_condition", threading.Condition)

    @property
    def _waiters(self):
        waiters = self._lazy_waiters
        return waiters if waiters is not None else self._make_lazy("_lazy_waiters", list)

    @property
    def _done_callbacks(self):
        callbacks = self._lazy_callbacks
        return callbacks if callbacks is not None else self._make_lazy("_lazy_callbacks", list)

    def _finish(self):
        """Marks the future done after its result or exception was stored."""
        self._state = FINISHED
        condition = self._lazy_condition
        if condition is not None:
            with condition:
                for waiter in self._waiters:
                    if self._exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                condition.notify_all()
        if self._lazy_callbacks:
            self._invoke_callbacks()

    def set_result(self, result):
        if self._state != PENDING or self._lazy_condition is not None:
            return super().set_result(result)  # waiters, callbacks, or an error to raise
        self._result = result
        self._finish()

    def set_exception(self, exception):
        if self._state != PENDING or self._lazy_condition is not None:
            return super().set_exception(exception)
        self._exception = exception
        self._finish()

    def _helped(self):
        """Collects results in this thread first (no thread hand-off); True when that finished
        this future. Tells the pool how long it took."""
        pool = self._pool_ref()
        if pool is None or self._state != PENDING:
            return False
        started = time.perf_counter()
        try:
            found = pool._help(self)
        except KeyboardInterrupt as exc:
            _stop_on_ctrl_c(self, exc)
            raise
        pool._waited(time.perf_counter() - started, found)
        return found

    def result(self, timeout=None):
        if self._state == FINISHED or self._helped():
            if self._exception is not None:
                raise self._exception
            return self._result
        return _wait_interruptibly(self, super().result, timeout)

    def exception(self, timeout=None):
        if self._state == FINISHED or self._helped():
            return self._exception
        return _wait_interruptibly(self, super().exception, timeout)

    def running(self):
        """True once a worker has taken the task, until it is done (such a task can no longer
        be cancelled). The state stays PENDING: completion sets it without the condition."""
        if self._state == PENDING and not self._started:
            pool = self._pool_ref()
            engine = None if pool is None else pool._engine
            if engine is not None and engine.running(self._task_id):
                self._started = True
        return self._state == RUNNING or (self._state == PENDING and self._started)

    def cancel(self):
        pool = self._pool_ref()
        with self._condition:
            if self._state != PENDING:
                return self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED")
        if pool is None or not pool._cancel(self):
            return False
        super().cancel()
        # No worker will dequeue it: tell wait() and as_completed() here, as the executor would.
        self.set_running_or_notify_cancel()
        return True


def _wait_interruptibly(future, wait, timeout):
    """Waits in short slices so that Ctrl-C is seen within 100 ms even when the signal went to
    another thread; on Ctrl-C the future's task stops (see Pool._stop_waited)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            remaining = 0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
            try:
                return wait(remaining)
            except TimeoutError:
                if future.done() or (deadline is not None and time.monotonic() >= deadline):
                    raise
    except KeyboardInterrupt as exc:
        _stop_on_ctrl_c(future, exc)
        raise


def _stop_on_ctrl_c(future, exc):
    """Ctrl-C (exc) while waiting for future: its task stops, with its map's (see
    Pool._stop_waited)."""
    pool = future._pool_ref()
    if pool is not None and is_ctrl_c(exc):
        pool._stop_waited(pool._waited_with(future))


class SharedHandle:
    """A buffer copied into shared memory once by ``Pool.share``, read-only from then on. Pass
    it in any number of tasks, in the arguments or held by the callable (a partial, a callable
    instance, a closure, a global of a function sent by value): it pickles as a reference to
    its block, so no task copies the data, and ``stats()`` does not count it. A task sees the
    data: a numpy array as a read-only numpy array of its dtype and shape, anything else as a
    flat read-only memoryview of its bytes (format 'B'); ``get()`` gives the same here. The
    block is freed once the handle and every view of it, here and in workers, are gone."""

    __slots__ = ("_view", "_meta", "__weakref__")

    def __init__(self, view, meta):
        self._view = view
        self._meta = meta

    @property
    def nbytes(self):
        return self._view.nbytes

    def __reduce_ex__(self, protocol):
        # The view pickles out-of-band: the arena block is referenced, never copied.
        return _attach_shared, (pickle.PickleBuffer(self._view), self._meta)

    def get(self):
        """The shared data, as a worker sees it."""
        return _attach_shared(self._view, self._meta)

    def __repr__(self):
        what = "bytes" if self._meta is None else f"numpy {self._meta[0]} {self._meta[1]}"
        return f"<gilfree.SharedHandle {self.nbytes:,} bytes: {what}>"


def _attach_shared(buffer, meta):
    view = memoryview(buffer).toreadonly()
    if meta is None:
        return view
    import numpy

    dtype, shape = meta
    return numpy.frombuffer(view, dtype=dtype).reshape(shape)


def _available_cpus():
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _default_workers():
    """On 3.13+ os.process_cpu_count(), which -X cpu_count and PYTHON_CPU_COUNT override, as
    ProcessPoolExecutor's default does; else the CPUs this process may run on."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    return _available_cpus()


class Pool(PoolBase):
    """A drop-in concurrent.futures.ProcessPoolExecutor with a C core (see the README).

    - max_workers: worker processes (default: one per CPU this process may run on).
    - mp_context: None, or a 'spawn' or 'forkserver' multiprocessing context, accepted as
      ProcessPoolExecutor does; nothing to do, since workers start from a clean template
      process. A 'fork' context raises ValueError: workers never inherit this process's memory.
    - initializer, initargs: initializer(*initargs) runs in each worker before its first task;
      workers that keep failing in it break the pool (BrokenProcessPool). A multiprocessing
      Queue, Lock or Value cannot be passed (TypeError: multiprocessing passes them only to
      processes it starts); a multiprocessing.Manager()'s queue, lock or value can.
    - max_tasks_per_worker (alias max_tasks_per_child): a worker is replaced after this many
      tasks (each item of a map counts one; a map chunk is not split).
    - task_timeout: seconds a task, or one item of a map, may run; past it the task fails with
      gilfree.TaskTimeout and its worker is replaced.
    - max_memory_per_worker: bytes of a worker's own resident memory (shared buffers not
      counted), checked between tasks; a worker past it is replaced.
    - preload: modules the template process imports once, so that workers start warm.
    - cluster: a Dask scheduler address, distributed.Client or cluster object: returns a
      gilfree.cluster.dask.DaskPool with the same API (pip install 'gilfree[dask]').

    Workers see the environment, working directory and sys.path as they were at Pool(). A task
    whose worker dies fails with gilfree.WorkerCrashed; the worker is replaced. Ctrl-C during
    result() or map stops the tasks waited for (cancelled, or their workers killed and
    replaced: CancelledError) and raises KeyboardInterrupt; the pool goes on.

    ``with Pool() as pool:`` shuts down with wait=True on leaving; ``async with Pool() as
    pool:`` does the same without blocking the event loop (the wait runs in a thread). Left on
    Ctrl-C (KeyboardInterrupt), either kills the workers at once. Left on an asyncio
    cancellation (the code awaiting in the block was cancelled: asyncio.run's answer to Ctrl-C,
    asyncio.timeout, a failing TaskGroup), either waits for nothing: tasks no worker has started
    are cancelled, running ones finish in the background (as when ``await pool.run(...)`` is
    cancelled), then the workers end; an interpreter exiting on an uncaught Ctrl-C (as
    asyncio.run raises it) kills them at once instead.

    One difference: large buffers arrive read-only. Numpy arrays, memoryviews and
    pickle.PickleBuffers of 64 KiB and more travel as zero-copy views of shared memory, both
    ways: in a worker, a task's arguments (and what its callable holds); in the parent, the
    results. Writing into one raises (numpy: ``ValueError: output array is read-only``; a
    memoryview: TypeError); copy first to work in place: ``a = a.copy()`` or ``np.array(a)``.
    Smaller ones, bytearrays, and arrays numpy pickles in-band (non-contiguous views,
    datetime64 and timedelta64, subclasses) arrive as writable copies, as with
    ProcessPoolExecutor.
    """

    def __new__(cls, *args, cluster=None, **kwargs):
        if cluster is not None:
            from .cluster.dask import DaskPool

            return DaskPool(cluster, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        max_workers=None,
        mp_context=None,
        initializer=None,
        initargs=(),
        *,
        max_tasks_per_child=None,
        task_timeout=None,
        max_tasks_per_worker=None,
        max_memory_per_worker=None,
        preload=(),
        cluster=None,
    ):
        if _exiting:
            # The exit hook that shuts pools down has run: this pool's tasks would be dropped.
            raise RuntimeError(
                "cannot create a gilfree.Pool after interpreter shutdown began (the main thread "
                "has returned: in an atexit handler, or a thread still running then), as "
                "concurrent.futures refuses: nothing would wait for its tasks"
            )
        max_tasks_per_worker = process_pool_options(mp_context, max_tasks_per_worker, max_tasks_per_child)
        if max_workers is None:
            max_workers = min(_default_workers(), _engine.MAX_WORKERS)
        if not 1 <= max_workers <= _engine.MAX_WORKERS:
            raise ValueError(f"max_workers must be between 1 and {_engine.MAX_WORKERS}")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        for name, value in (
            # Named as the caller passed it.
            ("max_tasks_per_child" if max_tasks_per_child is not None else "max_tasks_per_worker",
             max_tasks_per_worker),
            ("max_memory_per_worker", max_memory_per_worker),
        ):
            if value is not None and operator.index(value) < 1:
                raise ValueError(f"{name} must be at least 1")
        super().__init__()
        self._max_workers = max_workers
        self._spin_below = max(1, _available_cpus() - 1)
        self._spin_s = RESULT_SPIN_MAX_S
        self._misses = 0
        self._task_timeout = task_timeout
        self._ids = itertools.count(1)
        self._futures = {}
        self._stopping = set()  # ids of tasks whose workers _stop_waited killed
        # The kernel's OOM kill count, and how many of those kills this pool's SIGKILLed
        # workers have accounted for (see _oom_verdict).
        self._oom_file, self._oom_kills = oom_kill_counter()
        self._last_function = (None, None)
        self._shutdown = False
        self._close_when_idle = False
        self._broken = None
        self._start_failures = 0
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._waiter_ident = None
        self._final_stats = None
        if max_tasks_per_worker:
            # A map chunk counts as its items for recycling: never more than a worker may run.
            self._max_chunk = max_tasks_per_worker
        self._engine = _engine.Engine(
            max_workers, RING_BYTES, _arena_bytes(max_workers), task_timeout or 0.0
        )
        self._codec = Codec(self._engine)

        config = WorkerConfig(
            initializer,
            tuple(initargs),
            max_tasks_per_worker,
            max_memory_per_worker,
            tuple(preload),
            task_timeout,
        )
        from subprocess import _args_from_interpreter_flags

        memfd, doorbell, ctl = self._engine.child_fds()
        try:
            config_blob = _pickle_config(config)
        except RuntimeError as exc:
            if "through inheritance" not in str(exc):  # multiprocessing's assert_spawning
                raise
            raise _inherited_only(config.initargs, exc) from exc
        config_fd = _memfd_holding(config_blob)
        self._interpreter = _interpreter()
        argv = [
            self._interpreter,
            # The parent's flags (as multiprocessing passes them); site runs unless they say
            # otherwise, so that .pth import hooks (editable installs) work in workers too.
            *_args_from_interpreter_flags(),
            "-c",
            _TEMPLATE_CODE,
            str(memfd),
            str(doorbell),
            str(ctl),
            str(max_workers),
            str(config_fd),
            *sys.path,
        ]
        env = [f"{k}={v}" for k, v in os.environ.items()]
        try:
            self._engine.start_template(self._interpreter, argv, env, config_fd)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot start the pool's template process: {self._interpreter}: "
                            f"{exc.strerror}. {_NOT_PYTHON_HINT}") from None
        finally:
            os.close(config_fd)
        try:
            for slot in range(max_workers):
                self._engine.spawn(slot)
        except BrokenPipeError:  # the template has exited already
            reason = self._template_death()
            self._engine.close(0.0)
            raise BrokenPool(reason) from None
        self._weakself = weakref.ref(self)
        self._engine.start_waiter(_events_callback(self._weakself))
        # The waiter thread holds the engine: a pool dropped while idle must still end it.
        weakref.finalize(self, self._engine.close, 0.0)
        _live_pools.add(self)

    # help() and inspect.signature() show __init__'s parameters, not __new__'s (*args, **kwargs).
    __new__.__wrapped__ = __init__

    # ------------------------------------------------------------ submitting

    def submit(self, fn, /, *args, **kwargs):
        """Schedules fn(*args, **kwargs) in a worker; returns a concurrent.futures.Future.

        Functions from __main__, lambdas and closures travel by value. Raises here, not in the
        future: pickling errors of the arguments; MemoryError when they do not fit in the
        shared memory for arguments; RuntimeError after shutdown(); BrokenProcessPool when the
        pool is broken. The future fails with the task's exception (its worker's traceback as
        __cause__; MemoryError when the result does not fit in shared memory),
        gilfree.WorkerCrashed or gilfree.TaskTimeout."""
        return self._submit(False, fn, (args, kwargs))

    def _submit_chunk(self, fn, items, star):
        return self._submit(True, fn, (items, star))

    def _submit(self, chunk, fn, body):
        if self._broken is not None:
            raise BrokenPool(self._broken)
        engine = self._engine  # read once: shutdown() may clear it meanwhile
        # A map opened before shutdown goes on reading its input (see _open_map).
        if engine is None or (self._shutdown and not chunk):
            raise RuntimeError("cannot schedule new futures after shutdown")
        last = self._last_function  # one tuple: read and replaced atomically under the GIL
        if last[0] is fn:
            head = last[1]
        else:
            head = function_blob(fn)
            # A function by value is asked each time: what it captured may have been rebound.
            if blob_never_stale(fn):
                self._last_function = (fn, head)
        if head is None:  # fn holds a large buffer: it goes with the arguments, out-of-band
            body = (*body, with_task(fn))
        payload, refs = self._codec.dumps(body)
        task_id = next(self._ids)
        future = _Future(self._weakself, task_id)
        self._futures[task_id] = future
        _busy_pools.add(self)  # after the insertion: see _settled
        try:
            engine.submit(task_id, chunk, head, payload, refs)
        except BaseException as exc:
            self._futures.pop(task_id, None)
            self._settled()
            if isinstance(exc, RuntimeError) and not self._shutdown:
                # The engine closed as the template died, before the waiter told the pool.
                raise BrokenPool(self._broken or self._template_death()) from None
            raise
        return future

    def _open_map(self, pipeline):
        if self._broken is not None:  # before the shutdown check: a forked child's copy is both
            raise BrokenPool(self._broken)
        with self._lock:  # against shutdown: it closes the pool once no map is open
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            super()._open_map(pipeline)
        # A map dropped without being read never runs its generator's finally: this tells.
        weakref.finalize(pipeline, self._map_closed).atexit = False

    def _close_map(self, pipeline):
        super()._close_map(pipeline)
        self._map_closed()

    def _map_closed(self):
        if self._close_when_idle:
            self._settled()

    def share(self, obj):
        """Places a read-only buffer (bytes, bytearray, memoryview, numpy array) in shared memory
        once; pass the returned handle to tasks instead of the data."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("cannot share after shutdown")
        meta = None
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.ndarray):
            if type(obj) is not numpy.ndarray:
                raise TypeError(
                    f"share() takes plain numpy arrays, not {type(obj).__name__} (its extra "
                    "state would be lost): numpy.asarray(obj) shares the data alone"
                )
            if obj.dtype.hasobject:
                raise TypeError("share() cannot place Python objects in shared memory (dtype=object)")
            meta = (obj.dtype, obj.shape)
            # As bytes: any dtype (datetimes, records) and any shape (0-d, empty) travel as is.
            obj = numpy.ascontiguousarray(obj).reshape(-1).view(numpy.uint8)
        try:
            view = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"share() takes a buffer (bytes, bytearray, memoryview, numpy array), not "
                f"{type(obj).__name__}: share a pandas object's array (df.to_numpy()), or pass "
                "the object itself to tasks (pickled at each submit)"
            ) from None
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        block, at, length, _flags = engine.export(view)
        return SharedHandle(engine.view(block, at, length, 0), meta)

    # ------------------------------------------------------------ results

    def _help(self, future):
        """Collects waiting results in the calling thread instead of sleeping until the waiter
        thread does: no thread hand-off. It spins for a result only while few tasks are out, so
        that spinning never takes a core from a busy worker."""
        engine = self._engine
        if engine is None:
            return False
        busy = len(self._futures) > self._spin_below
        spin = 1e-9 if busy else self._spin_s  # busy: look once
        batch = []
        try:
            # Called and stored from C: a signal handler raising as collect returns (it ran
            # during the spin) cannot drop the batch, as with `events = engine.collect(...)`.
            batch.extend(map(engine.collect, (False,), (spin,)))
            if batch[0]:
                self._on_events(batch[0])
        except BaseException as exc:
            self._deliver_batch(batch, exc)
        return future._state == FINISHED

    def _deliver_batch(self, batch, exc):
        """_help's slow path: exc (a signal handler's, say) was raised before the batch it
        collected was delivered. Delivers it (_on_events empties a batch it finished), then
        raises exc."""
        for _ in range(REDELIVERY_ATTEMPTS):
            try:
                if batch and batch[0]:
                    self._on_events(batch[0])
                break
            except BaseException:  # another one, or the batch's own: exc is raised
                pass
        raise exc

    def _waited(self, seconds, found):
        """Sizes the next spin: about 2.5x a wait the spin caught; halved after one it missed
        (a slow task, or a machine too busy to run the worker meanwhile), with a full-length
        probe every SPIN_PROBE_EVERY misses so that a spin stuck short can grow back."""
        if found:
            spin = 2.5 * seconds
        else:
            spin = self._spin_s / 2
            self._misses += 1
            if self._misses % SPIN_PROBE_EVERY == 0:
                spin = RESULT_SPIN_MAX_S
        self._spin_s = min(RESULT_SPIN_MAX_S, max(RESULT_SPIN_MIN_S, spin))

    def _cancel(self, future):
        engine = self._engine
        if engine is not None and engine.cancel(future._task_id):
            self._futures.pop(future._task_id, None)
            self._settled()
            return True
        return False

    def _settled(self):
        """Called after futures left the table. A pool with futures out is held by _busy_pools,
        so that they complete even if the user dropped the pool (as in ProcessPoolExecutor); an
        idle one is not, so that it can be collected. Discarding first and adding back when
        futures remain keeps this right against a concurrent _submit, which adds after inserting.
        """
        if self._futures:
            return
        _busy_pools.discard(self)
        if self._futures:
            _busy_pools.add(self)
        elif self._close_when_idle and not self._pipelines:
            self._close(grace=1.0)

    def _on_events(self, events):
        # Runs on the waiter thread, and on any thread collecting in result(): there a signal
        # handler may raise at any point. A future leaves the table only once it is complete,
        # so that delivering an event again is harmless: _redeliver finishes one whose handling
        # raised, _deliver_batch a batch left unfinished.
        futures = self._futures
        loads = pickle.loads
        raised = None
        for event in events:
            try:
                kind = event[0]
                if kind == _engine.EV_RESULT:
                    _, task_id, (msg_kind, _, payload, views) = event
                    future = futures.get(task_id)
                    if future is None:
                        continue
                    value = loads(payload) if not views else Codec.loads(payload, views)
                    if msg_kind == _engine.MSG_RESULT and future._lazy_condition is None:
                        # Nobody waits on it or has a callback on it (the common case).
                        future._result = value
                        future._finish()
                    else:
                        _complete_message(future, msg_kind, value)
                    futures.pop(task_id, None)
                elif kind == _engine.EV_DIED:
                    self._worker_died(*event[1:])
                elif kind == _engine.EV_TEMPLATE_DIED:
                    self._template_died()
            except BaseException as exc:
                exc = self._redeliver(event, exc)
                if raised is None:
                    raised = exc
        engine = self._engine
        if engine is not None:
            engine.scan()
        self._settled()
        del events[:]  # delivered
        if raised is not None:
            raise raised

    def _redeliver(self, event, exc):
        """Delivers an event whose handling in _on_events raised exc. exc is the task's own
        when its result cannot be unpickled (loading it again fails too); otherwise it is a
        signal handler's exception or a done-callback's BaseException, returned to be raised
        once the whole batch is delivered. Each step is idempotent, so an exception during an
        attempt only means another one. A load failing with an Exception, or twice in a row with
        the same BaseException other than KeyboardInterrupt (a SystemExit from the result's own
        __reduce__), is the result's error: its future gets it."""
        raised = exc
        failed_with = type(exc)
        for _ in range(REDELIVERY_ATTEMPTS):
            try:
                kind = event[0]
                if kind == _engine.EV_RESULT:
                    _, task_id, (msg_kind, _, payload, views) = event
                    future = self._futures.get(task_id)
                    if future is not None and future._state == PENDING:
                        try:
                            value = Codec.loads(payload, views)
                        except BaseException as error:
                            # A KeyboardInterrupt is a signal's (Ctrl-C again), never the result's.
                            if not isinstance(error, Exception) and (
                                    type(error) is not failed_with or isinstance(error, KeyboardInterrupt)):
                                failed_with = type(error)
                                raise
                            if raised is exc:
                                raised = None
                            _complete(future, None, _unpickling_error(error))
                        else:
                            _complete_message(future, msg_kind, value)
                    self._futures.pop(task_id, None)
                elif kind == _engine.EV_DIED:
                    self._fail_task(*event[1:6])
                    if self._broken is not None:
                        self._fail_all(BrokenPool(self._broken))
                elif kind == _engine.EV_TEMPLATE_DIED:
                    self._template_died()
                return raised
            except BaseException as again:
                if raised is None:
                    raised = again
        return raised

    def _worker_died(self, task_id, slot, pid, status, timed_out, was_ready):
        self._fail_task(task_id, slot, pid, status, timed_out)
        if _exit_code(status) == EXIT_ADDRESS_SPACE and not was_ready:
            # Every worker would fail the same way: the initializer (or the parent's ulimit -v)
            # set the limit.
            self._break(f"worker {pid} {_ADDRESS_SPACE_TEXT}")
        elif was_ready:
            self._start_failures = 0
        else:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES * self._max_workers:
                how = (f"was killed by {signal_name(os.WTERMSIG(status))}" if os.WIFSIGNALED(status)
                       else f"exited with code {_exit_code(status)}")
                self._break(f"workers die while starting (see the initializer's traceback above), "
                            f"last: worker {pid} {how} before its first task")

    def _oom_verdict(self, status):
        """(oom_killed, the accounted count after this death) for a worker's death. Each SIGKILL
        takes one OOM kill the count shows beyond those accounted for: two workers the OOM
        killer ended both read True. Changes nothing: the caller stores the count."""
        if self._oom_kills is None or not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return None, self._oom_kills
        count = read_oom_kills(self._oom_file)
        if count is None:
            return None, self._oom_kills
        if count > self._oom_kills:
            return True, self._oom_kills + 1
        return False, count

    def _fail_task(self, task_id, slot, pid, status, timed_out):
        """Fails the task a dead worker was running, if any."""
        killed_by_pool = timed_out or task_id in self._stopping
        oom_killed, oom_kills = (None, self._oom_kills) if killed_by_pool else self._oom_verdict(status)
        future = self._futures.get(task_id) if task_id else None
        if future is None:
            self._oom_kills = oom_kills  # an idle worker's death accounts for a kill too
            return
        if task_id in self._stopping:
            error = concurrent.futures.CancelledError(
                f"stopped by Ctrl-C: worker {pid}, which ran it, was killed and replaced"
            )
        elif timed_out:
            error = TaskTimeout(
                f"task ran longer than task_timeout={self._task_timeout}s; "
                f"worker {pid} was killed and replaced"
            )
        else:
            error = _crash_error(pid, status, oom_killed)
        _complete(future, None, error)
        self._futures.pop(task_id, None)
        self._stopping.discard(task_id)  # after: a redelivery must tell the same
        self._oom_kills = oom_kills  # after too

    def _template_died(self):
        # Even during shutdown: engine.close stops the waiter before it ends the template, so
        # this death is never the pool's own, and with the template gone nobody reports the
        # workers' deaths: the futures out would wait forever (a SIGTERM to the whole group).
        self._break(self._template_death())

    def _template_death(self):
        """Why the pool broke when its template process is gone: how it ended and, when it
        exited before starting a worker, that it may be no Python interpreter."""
        engine = self._engine
        ended = _how_it_ended(engine.template_pid) if engine is not None else None
        if ended is None:
            return "the pool's template process died"
        if ended.si_code != os.CLD_EXITED:
            return f"the pool's template process was killed by {signal_name(ended.si_status)}"
        reason = f"the pool's template process exited with code {ended.si_status}"
        if not any(w["alive_s"] for w in engine.stats()):
            reason += f" before it started a worker (it ran {self._interpreter})"
            # A Python's failure (a preload import) printed its traceback above.
            if not os.path.basename(self._interpreter).startswith("python"):
                reason += f". {_NOT_PYTHON_HINT}"
        return reason

    def _break(self, reason):
        # Runs on the waiter thread: the engine is closed later, by shutdown.
        self._broken = reason
        self._fail_all(BrokenPool(reason))

    def _fail_all(self, error):
        """Fails every future left. One whose done-callback raises a BaseException (or a
        signal handler's exception) does not stop the others: it is raised at the end."""
        futures = self._futures
        raised = None
        while futures:
            for task_id, future in list(futures.items()):
                try:
                    _complete(future, None, error)
                    futures.pop(task_id, None)
                except BaseException as exc:
                    if raised is None:
                        raised = exc
        if raised is not None:
            raise raised

    # ------------------------------------------------------------ lifecycle

    def stats(self):
        """Per-worker counters and pool totals (after shutdown: as they were at shutdown).

        ``bytes_in``/``bytes_out`` count what tasks and results moved: their pickles and the
        out-of-band buffers copied into shared memory for them. A buffer passed on by
        reference (a ``share()`` handle, a view a worker returns) moves nothing and is not
        counted, as the Dask pool counts no shared buffers."""
        engine = self._engine
        if engine is not None:
            return self._stats_of(engine)
        if self._final_stats is None:
            raise BrokenPool(self._broken)
        return self._final_stats

    def _stats_of(self, engine):
        workers = engine.stats()
        for w in workers:
            w["idle_s"] = max(0.0, w.pop("alive_s") - w["busy_s"])
        running = sum(1 for w in workers if w["busy"])
        return {
            "workers": workers,
            "tasks": sum(w["tasks"] for w in workers),
            # Waiting in the parent's queue or in a worker's ring behind the task it runs.
            "queued": max(0, len(self._futures) - running),
            "running": running,
            "busy_workers": running,
            "restarts": sum(w["restarts"] for w in workers),
            "bytes_in": sum(w["bytes_in"] for w in workers),
            "bytes_out": sum(w["bytes_out"] for w in workers),
        }

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Refuses new submits; the tasks already submitted still run.

        wait=True waits for the futures submitted so far, then stops the workers, unless a map
        or amap opened before shutdown is still being read: it goes on reading its input lazily,
        and the workers stay until every such map is read to its end, closed or dropped
        (shutdown never waits for an input, which may be endless). wait=False returns at once;
        the pool closes when that work is done; so does a call from a done-callback, which
        cannot wait. cancel_futures=True cancels the futures no worker has started, and open
        maps submit no more of their input: they yield the results of the chunks that ran,
        then raise CancelledError."""
        with self._lock:
            if self._engine is None:
                return
            self._shutdown = True
        if cancel_futures:
            self._stop_maps()
            for future in list(self._futures.values()):
                future.cancel()
        if wait and threading.get_ident() != self._waiter_ident:
            for future in list(self._futures.values()):
                try:
                    future.exception()
                except concurrent.futures.CancelledError:
                    pass
            if not self._pipelines:
                self._close(grace=1.0)
                return
        # The waiter thread (a done-callback) cannot wait for itself to complete futures, and
        # a map still being read goes on lazily: the pool closes once both are done.
        self._close_when_idle = True
        self._settled()

    def _stop_waited(self, futures):
        """Ctrl-C while the caller waited for futures: those not started are cancelled, the
        workers running the others are killed (their futures fail with CancelledError) and
        replaced. The pool and its other tasks go on; a program that then exits on the Ctrl-C
        kills its workers at once (_shutdown_at_exit)."""
        engine = self._engine
        if engine is None:
            return
        taken = []
        for future in futures:
            task_id = future._task_id
            # A map's futures are stopped by its head's result(), then seen again by the map.
            if task_id in self._stopping or future.done() or future.cancel():
                continue
            self._stopping.add(task_id)
            taken.append(task_id)
        # Kills only once every waited task that could be was cancelled: the worker replacing a
        # killed one would otherwise take the next, and be killed for it in turn.
        for task_id in taken:
            try:
                killed = engine.kill_task(task_id)
            except RuntimeError:  # closed meanwhile by a shutdown in another thread
                killed = False
            # cancel() failed, so a worker had taken the task (claimed or started), and
            # kill_task finds it there until it finishes: a failed kill means it finished.
            if not killed:
                self._stopping.discard(task_id)

    def _interrupted(self):
        """Ctrl-C while leaving a with block, or at exit: kill the workers now and fail what
        is left."""
        self._shutdown = True
        self._close(grace=0.0)

    def _close(self, grace):
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is None:
            return
        self._stop_maps()
        self._final_stats = self._stats_of(engine)
        engine.close(grace)
        _busy_pools.discard(self)
        _live_pools.discard(self)
        self._fail_all(concurrent.futures.CancelledError("the pool was shut down"))

    def _forget_after_fork(self):
        """In a child forked from this pool's process: the pool is the parent's. Drops this
        copy (the engine only closes its descriptors and memory here, it signals nobody) and
        fails the copied futures, so that nothing in the child waits for them forever."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        engine, self._engine = self._engine, None
        self._final_stats = None
        self._shutdown = True
        self._broken = (
            f"the pool belongs to process {self._owner_pid}, which forked this one: create a pool "
            "in this process (a server forking its workers after it made the pool, as gunicorn "
            "--preload does: make it in a post_fork hook, or on first use)"
        )
        if engine is not None:
            engine.close(0.0)
        self._fail_all(BrokenPool(self._broken))

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a gilfree.Pool cannot be sent to another process (pickled): its workers and shared "
            "memory belong to this one. A task can create its own Pool"
        )

    def __repr__(self):
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        return f"<gilfree.Pool max_workers={self._max_workers} {state}>"


_NOT_PYTHON_HINT = ("The workers run sys.executable; where that is not a Python interpreter (an embedding "
                    "server such as uWSGI runs its own binary), call multiprocessing.set_executable() with "
                    "the path of one before Pool().")


def _how_it_ended(pid):
    """The waitid() result of child pid once it has ended, left for the engine to reap; None if
    that is unknown. The control socket's EOF can come a moment before the process ends."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if ended is not None or time.monotonic() >= deadline:
            return ended
        time.sleep(0.001)


def _interpreter():
    """The Python the workers run: sys.executable, or multiprocessing.set_executable()'s where
    sys.executable is another program (uWSGI's binary, say)."""
    exe = sys.executable
    spawn = sys.modules.get("multiprocessing.spawn")
    chosen = spawn.get_executable() if spawn is not None else None
    chosen = os.fsdecode(chosen) if chosen else None  # bytes on POSIX
    if chosen and chosen != exe and not os.path.basename(exe).startswith("python"):
        return chosen
    return exe


def _arena_bytes(max_workers):
    """The arena's virtual size: each worker keeps WORKER_ARENA_BYTES for its results, but under
    an address-space limit (ulimit -v) at most a quarter of it, which every process of the
    pool maps."""
    import resource

    wanted = max(ARENA_BYTES, 2 * max_workers * WORKER_ARENA_BYTES)
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    return wanted if limit == resource.RLIM_INFINITY else min(wanted, limit // 4)


def _memfd_holding(data):
    """Returns a descriptor of a memory file holding data, positioned at its start."""
    fd = os.memfd_create("gilfree-config", os.MFD_CLOEXEC)
    try:
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pickle_config(config):
    """The workers' configuration; an initializer from the main script or a closure goes by
    value."""
    try:
        blob = _dumps(pickle.Pickler, config)
        if not names_main(blob):
            return blob
    except (pickle.PicklingError, AttributeError, TypeError):
        pass
    return _dumps(by_value_pickler(), config)


def _dumps(pickler, obj):
    buffer = io.BytesIO()
    _with_proxy_authkeys(pickler)(buffer, 5).dump(obj)
    return buffer.getvalue()


@functools.cache
def _with_proxy_authkeys(base):
    """base, pickling a multiprocessing.Manager() proxy with its manager's authkey, as
    multiprocessing does for a process it spawns: the template's own authkey is another."""

    class ConfigPickler(base):
        def reducer_override(self, obj):
            managers = sys.modules.get("multiprocessing.managers")  # not imported: no proxy
            if managers is not None and isinstance(obj, managers.BaseProxy):
                rebuild, (*args, kwds) = obj.__reduce__()
                return rebuild, (*args, {**kwds, "authkey": bytes(obj._authkey)})
            parent = getattr(super(), "reducer_override", None)
            return NotImplemented if parent is None else parent(obj)

    return ConfigPickler


def _inherited_only(initargs, exc):
    """The error for an initializer or initargs holding what multiprocessing passes only to the
    processes it starts itself (a Queue, Lock, Value), naming the argument."""
    where = "the initializer"
    for index, arg in enumerate(initargs):
        try:
            _pickle_config(arg)
        except RuntimeError:
            where = f"initargs[{index}]"
            break
    return TypeError(
        f"{where} cannot reach the pool's workers: {exc}, and they are forked from a template "
        "process that multiprocessing did not start. Pass a multiprocessing.Manager()'s "
        "object instead (manager.Queue(), manager.Value(), manager.Lock()): its proxies pickle"
    )


def _complete_message(future, msg_kind, value):
    """Completes a future with a worker's reply: a result, or (exception, traceback text)."""
    if msg_kind == _engine.MSG_RESULT:
        _complete(future, value, None)
    else:
        _complete(future, None, with_remote_traceback(*value))


def _unpickling_error(exc):
    error = RuntimeError(
        f"the task's result cannot be unpickled in this process: {type(exc).__name__}: {exc}"
    )
    error.__cause__ = exc
    return error


def _complete(future, value, error):
    """Sets a future's outcome unless it was cancelled meanwhile."""
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


# A worker's exit with _worker.EXIT_ADDRESS_SPACE: it said why on stderr.
_ADDRESS_SPACE_TEXT = (
    "could not work under its address-space limit (RLIMIT_AS, ulimit -v; see its message "
    "above): every worker maps the pool's shared memory, which takes address space (not "
    "memory) far beyond what the worker uses, so RLIMIT_AS cannot cap a worker's memory as in "
    "a ProcessPoolExecutor. Use Pool(max_memory_per_worker=...) instead (its resident memory, "
    "checked between tasks)"
)


def _exit_code(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


def _crash_error(pid, status, oom_killed=None):
    if os.WIFSIGNALED(status):
        return WorkerCrashed(pid=pid, signal=os.WTERMSIG(status), oom_killed=oom_killed)
    code = _exit_code(status)
    if code == EXIT_ADDRESS_SPACE:
        detail = f"worker {pid} {_ADDRESS_SPACE_TEXT}; it was replaced"
        return WorkerCrashed(pid=pid, exitcode=code, detail=detail)
    return WorkerCrashed(pid=pid, exitcode=code)


def _events_callback(pool_ref):
    """The waiter thread's callback; holds the pool weakly so an unused pool can be collected."""

    def on_events(events):
        pool = pool_ref()
        if pool is not None:
            pool._waiter_ident = threading.get_ident()
            pool._on_events(events)

    return on_events


_live_pools = weakref.WeakSet()
_busy_pools = set()  # pools with futures out: see Pool._settled
_exiting = False  # set by _shutdown_at_exit: no Pool may start after it


def _shutdown_at_exit():
    global _exiting
    _exiting = True
    interrupted = _exiting_on_ctrl_c()
    for pool in list(_live_pools):
        pool._stop_maps()  # nobody reads a map at exit: the input it has not read is not run
        if interrupted:
            pool._interrupted()  # kills the workers: the exit does not wait for their tasks
        pool.shutdown(wait=True)


def _exiting_on_ctrl_c():
    """True when the interpreter exits on an uncaught Ctrl-C (as asyncio.run raises it): its
    traceback was printed, which sets sys.last_exc (3.12+) and sys.last_value before the exit
    hooks run. Not in an interactive session, where they may be an earlier command's."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return False
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return isinstance(exc, KeyboardInterrupt) and is_ctrl_c(exc)


def _forget_pools_after_fork():
    _busy_pools.clear()
    for pool in list(_live_pools):
        pool._forget_after_fork()
    _live_pools.clear()


# Like concurrent.futures: stop pools before the interpreter tears threads down.
threading._register_atexit(_shutdown_at_exit)
os.register_at_fork(after_in_child=_forget_pools_after_fork)
