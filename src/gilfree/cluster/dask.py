"""gilfree's Pool API on a Dask distributed cluster.

``DaskPool`` is ``gilfree._executor.PoolBase`` over ``distributed.Client.submit``: map, starmap,
chunking, ``ordered=False``, ``progress``, ``run`` and ``amap`` come from PoolBase; this module
only says how one call or one chunk runs on a Dask worker and how its outcome comes back.

Each task is one cloudpickle payload ``(fn, args, kwargs)`` (lambdas and closures work) sent to
``_execute`` on a worker; the outcome comes back pickled too, so errors keep their remote
traceback text and ``stats()`` can count exact payload bytes. Shared buffers travel beside the
payload as Dask futures (so the scheduler knows every task that needs one), and are swapped in by
pickle's persistent-id hook wherever the handle sits inside the arguments.

Threads: user threads call ``submit``; Dask's callback thread queues finished tasks
(``_on_done``) for the pool's settler thread, which gathers their results in batches and settles
the futures; the client's event loop delivers worker events (``_on_event``). ``_lock`` guards the
bookkeeping they share, ``_done_cond`` the settler's queue.
"""
import ctypes
import io
import operator
import os
import pickle
import signal
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import CancelledError, Future
from concurrent.futures import wait as futures_wait

import cloudpickle

try:
    import distributed
except ImportError as exc:
    raise ImportError("gilfree.Pool(cluster=...) needs Dask distributed: pip install 'gilfree[dask]'") from exc
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from .._executor import PoolBase, process_pool_options, run_chunk, with_remote_traceback
from .._worker import _error
from ..errors import TaskTimeout, WorkerCrashed
from ..pool import BrokenPool

__all__ = ["DaskPool", "SharedHandle"]

# A task still running this long after its async TaskTimeout is stuck in C code: restart its worker.
_STUCK_GRACE_S = 1.0
# share() broadcasts again when a worker leaves during one, at most this many times in all.
_SHARE_ATTEMPTS = 3


# ---------------------------------------------------------------- shared data


class SharedHandle:
    """A buffer broadcast to every Dask worker by ``DaskPool.share``.

    Put it anywhere in a task's arguments (or a closure); inside the task it is a read-only
    ``memoryview`` (or a read-only numpy array if a numpy array was shared). ``release()`` frees
    the worker copies; they are freed anyway when the handle is garbage collected.
    """

    __slots__ = ("_future", "nbytes", "__weakref__")

    def __init__(self, future, nbytes):
        self._future = future
        self.nbytes = nbytes

    def release(self):
        if self._future is not None:
            self._future.release()
            self._future = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def get(self):
        """The shared data, as a task sees it (fetched from the cluster)."""
        return _read_only(self._future.result())

    def __reduce__(self):
        raise TypeError("a SharedHandle only travels inside the arguments of its pool's tasks")

    def __repr__(self):
        state = "released" if self._future is None else self._future.key
        return f"<SharedHandle {self.nbytes} bytes {state}>"


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, with exceptions pickled as the standard library does: distributed installs
    tblib's reducers for exception classes, which skip ``__init__`` (SystemExit(3) would arrive
    with code None) and carry the frames."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

    def reducer_override(self, obj):
        if isinstance(obj, BaseException):
            return obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return super().reducer_override(obj)


def _dumps(obj):
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()


class _TaskPickler(_Pickler):
    """Also replaces each SharedHandle with its index in ``self.futures``."""

    def __init__(self, file):
        super().__init__(file)
        self.futures = []
        self._index = {}  # handle -> its index in futures, so a repeated handle travels once

    def persistent_id(self, obj):
        if type(obj) is not SharedHandle:
            return None
        if obj._future is None:
            raise ValueError(f"{obj!r} was released")
        if obj not in self._index:
            self._index[obj] = len(self.futures)
            self.futures.append(obj._future)
        return self._index[obj]


class _TaskUnpickler(pickle.Unpickler):
    def __init__(self, file, shared):
        super().__init__(file)
        self._shared = shared

    def persistent_load(self, index):
        return _read_only(self._shared[index])


def _read_only(value):
    """The task's view of a shared buffer: zero-copy and not writable (tasks share one copy)."""
    if isinstance(value, memoryview):
        return value.toreadonly()
    view = value.view()
    view.flags.writeable = False
    return view


def _dump_task(obj):
    """Returns (payload bytes, futures of the shared buffers the payload refers to)."""
    buf = io.BytesIO()
    pickler = _TaskPickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), pickler.futures


# ---------------------------------------------------------------- errors


class RemoteTaskError(Exception):
    """How a failed call travels from the worker: the pickled exception plus its traceback text.

    Raised on the worker so that Dask marks the task erred; the pool unwraps it.
    """

    def __init__(self, summary, exc_bytes, tb_text):
        super().__init__(summary, exc_bytes, tb_text)

    def __str__(self):  # what Dask's logs and dashboard show
        return self.args[0]

    __repr__ = __str__


# ---------------------------------------------------------------- worker side


class _Watchdog:
    """One thread per worker process that stops calls running past their task_timeout.

    At the deadline it raises TaskTimeout inside the task's thread (PyThreadState_SetAsyncExc,
    seen at the next bytecode). A call that never lets it through (stuck in C code, or catching
    it) is reported as stuck after _STUCK_GRACE_S; the pool then fails it and restarts the worker.
    """

    # The C API behind asynchronous exceptions; Python has no other way into another thread.
    _set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    _set_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)

    def __init__(self):
        self._cond = threading.Condition()
        self._armed = set()
        threading.Thread(target=self._watch, name="gilfree-watchdog", daemon=True).start()

    def arm(self, timeout, on_stuck):
        entry = _Deadline(threading.get_ident(), time.monotonic() + timeout, on_stuck)
        with self._cond:
            self._armed.add(entry)
            self._cond.notify()
        return entry

    def disarm(self, entry):
        # Under the lock the watchdog cannot fire in between: after this, no TaskTimeout is
        # pending in this thread to surface in Dask's own code.
        with self._cond:
            self._armed.discard(entry)
            if entry.fired:
                _take_pending(TaskTimeout)

    def _watch(self):
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in list(self._armed):
                    if not entry.fired and now >= entry.deadline:
                        entry.fired = True
                        entry.deadline = now + _STUCK_GRACE_S
                        self._set_async_exc(entry.thread_id, id(TaskTimeout))
                    elif entry.fired and now >= entry.deadline:
                        self._armed.discard(entry)
                        entry.on_stuck()
                wake = min((e.deadline for e in self._armed), default=now + 3600)
                self._cond.wait(max(0.0, wake - time.monotonic()))


def _take_pending(exc_type):
    """Lets an asynchronous exc_type still pending in this thread surface here, and drops it.
    Clearing it instead (PyThreadState_SetAsyncExc(id, NULL)) signals the interpreter again:
    CPython 3.11 then keeps its eval breaker set for good, and threads of the process spin."""
    try:
        for _ in range(2):  # a backward jump: the interpreter looks for pending exceptions
            pass
    except exc_type:
        pass


class _Deadline:
    # deadline and fired are written by the watchdog thread and read by the task's thread, both
    # under the watchdog's lock (the task reads fired after disarm released it).
    __slots__ = ("thread_id", "deadline", "on_stuck", "fired")

    def __init__(self, thread_id, deadline, on_stuck):
        self.thread_id = thread_id
        self.deadline = deadline
        self.on_stuck = on_stuck
        self.fired = False


_watchdog = None
_watchdog_lock = threading.Lock()
# Per-pool counters of the workers in this process, read by DaskPool.stats(); keyed by (pool
# token, worker address), since workers may share a process (LocalCluster(processes=False)). A
# Dask worker may run several tasks at once in threads: every update holds _counters_lock.
_counters = {}
_counters_lock = threading.Lock()


def _count(token, address, **deltas):
    """Adds deltas to the pool's counters on the worker at address; returns a copy of them."""
    with _counters_lock:
        counters = _counters.get((token, address))
        if counters is None:
            counters = _counters[token, address] = dict(
                started=time.monotonic(), tasks=0, busy_s=0.0, bytes_in=0, bytes_out=0, running=0
            )
        for name, delta in deltas.items():
            counters[name] += delta
        return dict(counters)


# Keys of a pool's tasks that cancel() stopped before they started, by (pool token, worker
# address): _execute skips them there. Written on the worker's event loop, read by its task
# threads: single set operations, atomic under the GIL.
_stopped = {}
# A worker's states of a task it has started (or finished).
_STARTED = frozenset({"executing", "long-running", "cancelled", "resumed", "memory", "error"})


def _stop_unless_started(token, keys, dask_worker):
    """Runs on each worker's event loop, where Dask starts tasks: returns those of keys this
    worker has started; the others, if they ever start here, are skipped (see DaskPool._cancel)."""
    tasks = dask_worker.state.tasks
    started = [key for key in keys if key in tasks and tasks[key].state in _STARTED]
    _stopped.setdefault((token, dask_worker.address), set()).update(set(keys).difference(started))
    return started


def _unstop(token, keys, dask_worker):
    _stopped.get((token, dask_worker.address), set()).difference_update(keys)


def _with_timeout(fn, timeout, token):
    """fn, stopped with TaskTimeout when one call of it runs longer than timeout seconds."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
    worker = distributed.get_worker()
    key = worker.get_current_task()

    def report_stuck():
        worker.log_event(
            f"gilfree-{token}",
            {"kind": "stuck", "key": key, "timeout": timeout, "address": worker.address, "pid": os.getpid()},
        )

    def timed(*args, **kwargs):
        entry = _watchdog.arm(timeout, report_stuck)
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                _watchdog.disarm(entry)
        except TaskTimeout:
            if not entry.fired:
                raise
            raise TaskTimeout(f"the task ran past task_timeout={timeout}s") from None

    return timed


def _execute(token, kind, payload, timeout, *shared):
    """The Dask task: run one call ("call") or one chunk ("chunk") of a DaskPool on this worker.

    payload pickles (fn, args, kwargs) for a call, (fn, items, star) for a chunk; shared are the
    values of the SharedHandles it refers to.
    Returns the pickled outcome. A chunk returns its error beside the results before it, as
    ``run_chunk`` does; anything else that fails (a call, or a chunk ended by SystemExit, say)
    raises RemoteTaskError.
    """
    worker = distributed.get_worker()
    address, key = worker.address, worker.get_current_task()
    stopped = _stopped.get((token, address))
    if stopped and key in stopped:
        stopped.discard(key)
        return None  # cancelled before it started: the pool settled its future
    _count(token, address, running=1, bytes_in=len(payload))
    started = time.perf_counter()
    tasks = bytes_out = 0
    try:
        fn, args, extra = _TaskUnpickler(io.BytesIO(payload), shared).load()
        if timeout is not None:
            fn = _with_timeout(fn, timeout, token)
        if kind == "call":  # extra: the keyword arguments
            tasks = 1
            outcome = fn(*args, **extra)
        else:  # a chunk: args are the items, extra says whether to star them
            results, error, elapsed = run_chunk(fn, args, extra)
            tasks = len(results) + (error is not None)
            if error is not None:  # run_chunk made it portable (_error)
                error = (_dumps(error[0]), error[1])
            outcome = (results, error, elapsed)
        out = _dumps(outcome)
        bytes_out = len(out)
        return out
    except BaseException as exc:
        # SystemExit and KeyboardInterrupt too: they end the task, not the worker (left to Dask,
        # they kill its process). As in the local pool's workers, an exception that would not
        # unpickle at home travels as a RuntimeError naming it.
        error, tb_text = _error(exc)
        failure = (f"{type(exc).__qualname__}: {exc}", _dumps(error), tb_text)
    finally:
        busy_s = time.perf_counter() - started
        _count(token, address, running=-1, tasks=tasks, bytes_out=bytes_out, busy_s=busy_s)
    # Raised outside the except block: the user's exception must not ride along as __context__
    # (Dask pickles the chain, and it may not pickle).
    raise RemoteTaskError(*failure)


def _worker_stats(token, dask_worker):
    counters = _count(token, dask_worker.address)
    counters["uptime_s"] = time.monotonic() - counters.pop("started")
    counters.update(pid=os.getpid(), name=dask_worker.name, nthreads=dask_worker.state.nthreads)
    return counters


class _PoolPlugin(WorkerPlugin):
    """Runs the pool's preload imports and initializer in every worker process, including
    workers that join or restart later, and announces each worker start to the pool."""

    def __init__(self, token, setup_bytes):
        self.token = token
        self.setup_bytes = setup_bytes  # cloudpickled (initializer, initargs, preload)

    async def setup(self, worker):
        initializer, initargs, preload = pickle.loads(self.setup_bytes)
        for module in preload:
            __import__(module)
        _count(self.token, worker.address)
        if initializer is not None:
            initializer(*initargs)
        # By RPC: a starting worker runs plugins before its event stream to the scheduler is
        # up, and Worker.log_event drops what it cannot send yet.
        await worker.scheduler.log_event(
            topic=f"gilfree-{self.token}", msg={"kind": "start", "name": str(worker.name), "pid": os.getpid()}
        )

    def teardown(self, worker):
        with _counters_lock:
            _counters.pop((self.token, worker.address), None)
        _stopped.pop((self.token, worker.address), None)


# ---------------------------------------------------------------- client side


class _ClusterFuture(Future):
    """A concurrent.futures.Future over a Dask future; cancelling it cancels the Dask task,
    unless a worker has started it."""

    def __init__(self, pool, dask_future, decode):
        super().__init__()
        self.pool = pool
        self.dask_future = dask_future
        self.decode = decode  # turns the task's pickled outcome into this future's result
        self.cancelling = False  # the pool is asking the workers; guarded by the pool's _lock

    def cancel(self):
        if not self.done():
            self.pool._cancel([self])
        return self.cancelled()


class DaskPool(PoolBase):
    """The gilfree Pool API on a Dask distributed cluster.

    ``cluster`` is a scheduler address (``"tcp://host:8786"``), a ``distributed.Client`` (used as
    is, never closed by the pool) or a Dask cluster object such as ``LocalCluster``.
    ``max_workers`` is the parallelism the pool plans chunking for (default: the cluster's
    threads); Dask decides placement. ``task_timeout`` fails a call with TaskTimeout;
    ``initializer``/``initargs`` and ``preload`` run in every worker process. Worker recycling
    (``max_tasks_per_worker``, alias ``max_tasks_per_child``) and memory caps (``max_memory_per_worker``) belong to the Dask
    workers' own configuration (``dask worker --memory-limit``, ``--lifetime 1h --lifetime-restart``); the pool warns
    and ignores them.
    """

    # Dask's scheduler costs 200 us to 1 ms a task: chunks of about 100 ms amortise it.
    _chunk_target_s = 0.1

    def __init__(
        self,
        cluster,
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
    ):
        max_tasks_per_worker = process_pool_options(mp_context, max_tasks_per_worker, max_tasks_per_child)
        for name, value in (  # checked as the local pool does, before saying they do not apply
            ("max_tasks_per_child" if max_tasks_per_child is not None else "max_tasks_per_worker",
             max_tasks_per_worker),
            ("max_memory_per_worker", max_memory_per_worker),
        ):
            if value is not None and operator.index(value) < 1:
                raise ValueError(f"{name} must be at least 1")
        if max_tasks_per_worker is not None:
            warnings.warn(
                "max_tasks_per_worker does not apply to a Dask cluster; use `dask worker --lifetime 1h "
                "--lifetime-restart` to recycle workers (without --lifetime-restart they are removed)", stacklevel=2,
            )
        if max_memory_per_worker is not None:
            warnings.warn(
                "max_memory_per_worker does not apply to a Dask cluster; use `dask worker "
                "--memory-limit` (the nanny restarts a worker past it)", stacklevel=2,
            )
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be > 0")
        if max_workers is not None and operator.index(max_workers) < 1:
            raise ValueError("max_workers must be at least 1")
        if isinstance(cluster, str):
            _check_address(cluster)
        super().__init__()
        if isinstance(cluster, distributed.Client):
            self._client, self._owns_client = cluster, False
        else:
            self._client, self._owns_client = distributed.Client(cluster, set_as_default=False), True
        if self._client.asynchronous:
            raise ValueError("DaskPool needs a synchronous distributed.Client (asynchronous=False)")
        self._token = uuid.uuid4().hex
        self._topic = f"gilfree-{self._token}"
        self._task_timeout = task_timeout
        self._lock = threading.Lock()
        self._outstanding = {}  # dask key -> _ClusterFuture, until settled
        self._tasks_done = 0
        self._stuck_handlers = []
        self._shutdown = False
        self._release_when_idle = False  # shut down while maps are still read (see shutdown)
        self._released = False
        setup_bytes = cloudpickle.dumps((initializer, tuple(initargs), tuple(preload)))
        try:
            # Runs setup on every current worker now, raising the initializer's error here.
            self._client.register_plugin(_PoolPlugin(self._token, setup_bytes), name=self._topic)
        except BaseException:
            self._close_client()
            raise
        self._client.subscribe_topic(self._topic, self._on_event)
        self._done_cond = threading.Condition()
        self._done = []  # finished Dask futures the settler thread has not taken yet
        self._settler_stop = False
        self._settler = threading.Thread(target=self._settle_loop, name="gilfree-dask-settler", daemon=True)
        self._settler.start()
        # PoolBase sizes its read-ahead window on this.
        self._max_workers = max_workers or max(1, sum(self._client.nthreads().values()))

    # -- what PoolBase builds on

    def submit(self, fn, /, *args, **kwargs):
        return self._submit("call", fn, args, kwargs, _decode_call)

    def _submit_chunk(self, fn, items, star):
        return self._submit("chunk", fn, items, star, _decode_chunk)

    def _submit(self, kind, fn, args, extra, decode):
        payload, shared = _dump_task((fn, args, extra))
        name = getattr(fn, "__name__", type(fn).__name__).replace("<", "").replace(">", "")
        key = f"{name}-{uuid.uuid4().hex}"
        with self._lock:
            # A map opened before shutdown goes on reading its input (see shutdown).
            if self._released or (self._shutdown and kind != "chunk"):
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._check_client()
            try:
                dask_future = self._client.submit(
                    _execute, self._token, kind, payload, self._task_timeout, *shared, key=key, pure=False
                )
            except Exception as exc:
                self._check_client(exc)  # closed meanwhile
                raise
            future = self._outstanding[key] = _ClusterFuture(self, dask_future, decode)
        dask_future.add_done_callback(self._on_done)
        if self._client.status != "running":
            # Closing: Dask may have cancelled its tasks before this one, or stopped the loop
            # that runs done-callbacks.
            self._fail(key, self._broken())
        return future

    def _check_client(self, cause=None):
        """Raises BrokenPool if the client cannot run tasks (closed, or without its scheduler)."""
        if self._client.status != "running":
            raise self._broken() from cause

    def _broken(self):
        if self._client.status == "connecting":
            return BrokenPool(
                "the pool's Dask client lost its scheduler (it is trying to reconnect; "
                "Dask dropped the tasks it had)"
            )
        return BrokenPool(
            "the pool's Dask client was closed (by its owner, or after it lost its scheduler)"
        )

    def _on_done(self, dask_future):
        """Runs in Dask's callback thread: hands the finished Dask task to the settler thread."""
        with self._done_cond:
            self._done.append(dask_future)
            self._done_cond.notify()

    def _settle_loop(self):
        """The settler thread: fetches finished results in batches, one round trip per batch
        rather than one per task, and settles their futures."""
        while True:
            with self._done_cond:
                while not self._done and not self._settler_stop:
                    self._done_cond.wait()
                if not self._done:
                    return
                batch, self._done = self._done, []
            finished = [f for f in batch if f.status == "finished"]
            outs = {}
            if finished and self._client.status == "running":
                try:
                    outs = dict(zip([f.key for f in finished], self._client.gather(finished)))
                except Exception:  # e.g. a result was lost with its worker: fetch one by one below
                    pass
            for dask_future in batch:
                try:
                    self._settle(dask_future, outs)
                except BaseException as exc:  # never the settler's end: every later task needs it
                    error = RuntimeError(f"the pool could not settle this task: {exc!r}")
                    self._fail(dask_future.key, error)

    def _settle(self, dask_future, outs):
        with self._lock:
            future = self._outstanding.get(dask_future.key)
        if future is None:
            return
        value = error = None
        done_count = 0
        if dask_future.key not in outs and self._client.status != "running":
            error = self._broken()  # asking would wait for the client to reconnect
        else:
            try:
                out = outs[dask_future.key] if dask_future.key in outs else dask_future.result()
                if out is None:  # a worker skipped it for _cancel
                    with self._lock:
                        if future.cancelling:
                            return  # _cancel settles it
                    raise RuntimeError("a worker skipped this task: it was being cancelled")
                value = future.decode(out)
                done_count = len(value[0]) + (value[1] is not None) if future.decode is _decode_chunk else 1
            except CancelledError as exc:  # not cancelled here: Dask dropped it
                error = self._dropped(exc)
            except BaseException as exc:
                value, error, done_count = None, _translate(exc), 1
        if not self._claim(future, dask_future.key, done_count):
            return  # cancelled, or already failed by a stuck-task report
        # Outside the lock: done-callbacks may submit more work (PoolBase's read-ahead).
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def _cancel(self, futures):
        """Cancels those of futures that no worker has started. Every worker is asked at once
        (a task may move between workers) and promises to skip the others if they start there;
        then Dask forgets them."""
        with self._lock:
            asking = {f.dask_future.key: f for f in futures if not f.done() and not f.cancelling}
            for future in asking.values():
                future.cancelling = True
        keys = list(asking)
        started = set(keys)  # unless every worker says otherwise
        try:
            if keys and self._client.status == "running":
                replies = self._client.run(_stop_unless_started, self._token, keys, on_error="return")
                started = set()
                for reply in replies.values():
                    started.update(keys if isinstance(reply, BaseException) else reply)
                if started:  # they run after all: no worker may skip them (a retry, say)
                    self._client.run(_unstop, self._token, list(started), on_error="ignore")
        except Exception:
            pass  # the client or the scheduler went away: the settler fails these tasks
        finally:
            stopped = [asking[key] for key in keys if key not in started]
            for future in stopped:
                if Future.cancel(future):
                    self._claim(future, future.dask_future.key, 0)  # notifies wait()
            with self._lock:
                for future in asking.values():
                    future.cancelling = False
        if stopped and self._client.status == "running":
            self._client.cancel([f.dask_future for f in stopped])

    def _dropped(self, exc):
        """The error for a task Dask cancelled on its own (exc: its FutureCancelledError)."""
        if self._client.status != "running":
            return self._broken()
        return RuntimeError(f"Dask cancelled this task: {exc}")

    def _fail(self, key, error):
        """Fails the pool's future for the Dask task key, unless it was settled already."""
        with self._lock:
            future = self._outstanding.get(key)
        if future is not None and self._claim(future, key, 1):
            future.set_exception(error)

    def _claim(self, future, key, done_count):
        """Moves future to RUNNING if nobody settled or cancelled it yet; True if this call did."""
        with self._lock:
            self._outstanding.pop(key, None)
            try:
                # PENDING -> RUNNING (ours); CANCELLED -> CANCELLED_AND_NOTIFIED, which wakes
                # concurrent.futures.wait(); RuntimeError: already settled.
                if not future.set_running_or_notify_cancel():
                    return False
            except RuntimeError:
                return False
            self._tasks_done += done_count
            return True

    def _on_event(self, event):
        """Runs on the client's event loop for each event a worker logged for this pool."""
        _, msg = event
        if msg["kind"] == "stuck":
            # Client calls block: never on the event loop.
            thread = threading.Thread(target=self._fail_stuck, args=(msg,), name="gilfree-stuck-task")
            with self._lock:
                self._stuck_handlers.append(thread)
            thread.start()

    def _fail_stuck(self, msg):
        """A task ignored its TaskTimeout (stuck in C code), so its thread is lost until the C
        call returns. Kill its worker process if a nanny runs it (the nanny starts a new one);
        only then fail the task, so that what the caller does next never meets that worker."""
        key, address = msg["key"], msg["address"]
        with self._lock:
            future = self._outstanding.get(key)
        if future is None or not self._claim(future, key, 1):
            return
        killed = False
        try:
            # Forgotten by the scheduler before the kill (the client's own cancel message could
            # arrive after it), so the worker's death does not run it again elsewhere.
            self._client.run_on_scheduler(_forget, [key], self._client.id)
            # No answer at all: no nanny (LocalCluster(processes=False), dask worker --no-nanny).
            answers = self._client.run(
                _kill_process, msg["pid"], workers=[address], nanny=True, on_error="return"
            )
            killed = True in answers.values()
            if killed:
                self._client.run_on_scheduler(_remove_worker, address)
        except Exception:
            pass  # the client, the scheduler or the worker went away meanwhile: fail it all the same
        what = (
            "its worker process was killed and is being restarted by its nanny"
            if killed
            else "its thread cannot be stopped and its worker was not restarted (no nanny runs it), "
            "so that thread stays busy until the call returns"
        )
        future.set_exception(TaskTimeout(
            f"the task ran past task_timeout={msg['timeout']}s and did not stop (stuck in C code?): {what}"
        ))

    # -- the rest of the Pool API

    def share(self, buf):
        """Broadcasts ``buf`` (bytes-like or numpy array) to every worker; returns a SharedHandle
        that tasks receive as a read-only view of the worker's single copy."""
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(buf, numpy.ndarray):
            data = buf
        else:
            data = memoryview(buf).cast("B")
        self._check_client()
        for attempt in range(_SHARE_ATTEMPTS):
            try:
                return SharedHandle(self._client.scatter(data, broadcast=True, hash=False), data.nbytes)
            except (KeyError, OSError):
                # A worker left during the broadcast (the scheduler meets it gone): again, to the
                # workers there are now.
                if attempt == _SHARE_ATTEMPTS - 1:
                    raise

    def stats(self):
        self._check_client()
        per_worker = self._client.run(_worker_stats, self._token, on_error="return")
        # The scheduler keeps the pool's events: every worker process that started for the pool
        # announced (name, pid); more than one pid under a name are restarts.
        pids_by_name = {}
        for _, msg in self._client.get_events(self._topic):
            if msg["kind"] == "start":
                pids_by_name.setdefault(msg["name"], set()).add(msg["pid"])
        rows = []
        for address in sorted(per_worker):
            s = per_worker[address]
            if isinstance(s, BaseException):  # a worker that is restarting right now
                continue
            restarts = max(0, len(pids_by_name.get(str(s["name"]), ())) - 1)
            rows.append({
                "slot": len(rows),
                "pid": s["pid"],
                "tasks": s["tasks"],
                "busy_s": s["busy_s"],
                "idle_s": max(0.0, s["uptime_s"] * s["nthreads"] - s["busy_s"]),
                "bytes_in": s["bytes_in"],
                "bytes_out": s["bytes_out"],
                "restarts": restarts,
                "busy": s["running"] > 0,
                "address": address,
                "name": s["name"],
                "nthreads": s["nthreads"],
            })
        with self._lock:
            outstanding, tasks = len(self._outstanding), self._tasks_done
        running = sum(per_worker[r["address"]]["running"] for r in rows)
        return {
            "workers": rows,
            "tasks": tasks,
            "queued": max(0, outstanding - running),
            "running": running,
            "busy_workers": sum(r["busy"] for r in rows),
            "restarts": sum(r["restarts"] for r in rows),
            "bytes_in": sum(r["bytes_in"] for r in rows),
            "bytes_out": sum(r["bytes_out"] for r in rows),
        }

    def _interrupted(self):
        """Ctrl-C while waiting on the pool (a with block, map): shuts it down now, waiting for
        no task. The cluster's workers are not the pool's to kill: every task of the pool is
        cancelled on the cluster (a running call cannot be stopped in its worker thread and
        finishes there; its result is dropped) and its future cancelled."""
        with self._lock:
            if self._shutdown and self._released:
                return
            self._shutdown = True
            pending = list(self._outstanding.values())
        self._stop_maps()
        for future in pending:
            if Future.cancel(future):
                self._claim(future, future.dask_future.key, 0)  # notifies wait()
        if pending and self._client.status == "running":
            try:
                self._client.cancel([f.dask_future for f in pending])
            except Exception:
                pass  # the client or the scheduler went away: Dask dropped them anyway
        self._release_when_idle = True
        self._release_if_idle(wait=True)  # nothing left to wait for: lets go of the cluster

    def shutdown(self, wait=True, *, cancel_futures=False):
        """As in concurrent.futures. A map opened before it goes on reading its input lazily (as
        with gilfree.Pool: an endless generator is never submitted whole); the pool lets go of
        the cluster once the last such map is read to the end, closed or dropped."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            pending = list(self._outstanding.values())
        if cancel_futures:
            self._stop_maps()
            self._cancel(pending)
        if wait:
            futures_wait(pending)
        self._release_when_idle = True
        self._release_if_idle(wait)

    def _close_map(self, pipeline):
        super()._close_map(pipeline)
        if self._release_when_idle:
            # Maybe in a finalizer, on whichever thread dropped the map: never block there.
            self._release_if_idle(wait=False)

    def _release_if_idle(self, wait):
        with self._lock:
            if self._released or self._pipelines:
                return
            self._released = True
        if wait:
            self._release()
        else:
            threading.Thread(target=self._release, name="gilfree-dask-shutdown", daemon=True).start()

    def _release(self):
        """Waits for the pool's last tasks, then lets go of what the pool holds on the cluster."""
        with self._lock:  # complete: nothing is submitted once released
            pending = list(self._outstanding.values())
        futures_wait(pending)
        for thread in self._stuck_handlers:
            thread.join()
        with self._done_cond:
            self._settler_stop = True
            self._done_cond.notify()
        self._settler.join()
        if self._client.status == "running":  # else the pool's subscription and plugin are out of reach
            self._client.unsubscribe_topic(self._topic)
            self._client.unregister_worker_plugin(self._topic)
        self._close_client()

    def _close_client(self):
        if self._owns_client:
            self._client.close()

    @property
    def client(self):
        """The distributed.Client the pool submits to."""
        return self._client


def _check_address(address):
    """Raises ValueError unless address parses as a scheduler address, as the client's connect
    would parse it; checked before any Client exists (a Client whose connect raised ValueError
    is left half-made, and the interpreter then waits 60 s for it at exit)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address

    try:
        scheme, location = parse_address(address)  # no scheme: Dask's default (tcp)
        try:
            registry.get_backend(scheme).get_address_host_port(location)
        except NotImplementedError:  # e.g. inproc://: no host and port to check
            pass
    except (ValueError, TypeError, ImportError) as exc:
        raise ValueError(
            f"cluster={address!r} is not a Dask scheduler address such as 'tcp://host:8786' ({exc})"
        ) from None


def _kill_process(pid, dask_worker):
    """Runs on the nanny of the worker process pid: kills that process if it is still the worker;
    True if it did."""
    if dask_worker.pid != pid:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def _forget(keys, client, dask_scheduler):
    """Runs on the scheduler: cancels the client's tasks keys now."""
    dask_scheduler.stimulus_cancel(keys, client, force=False, reason="gilfree: past task_timeout", msg=None)


async def _remove_worker(address, dask_scheduler):
    """Runs on the scheduler: forgets a worker whose process was just killed, without waiting for
    its nanny to report the death."""
    await dask_scheduler.remove_worker(address, stimulus_id=f"gilfree-stuck-task-{time.time()}", close=False)


def _decode_call(out):
    return pickle.loads(out)


def _decode_chunk(out):
    """The chunk's outcome as run_chunk returned it on the worker."""
    results, error, elapsed = pickle.loads(out)
    if error is not None:
        error = (pickle.loads(error[0]), error[1])
    return results, error, elapsed


def _translate(exc):
    """The gilfree exception for what a Dask future raised."""
    if isinstance(exc, RemoteTaskError):
        summary, exc_bytes, tb_text = exc.args
        try:
            error = pickle.loads(exc_bytes)
        except Exception as problem:  # e.g. its class is importable on the workers only
            error = RuntimeError(
                f"{summary} (not rebuilt in this process: {type(problem).__name__}: {problem})"
            )
        return with_remote_traceback(error, tb_text)
    if isinstance(exc, KilledWorker):
        last = exc.last_worker
        return WorkerCrashed(
            pid=getattr(last, "pid", None),
            detail=f"{exc.allowed_failures + 1} Dask workers died while running this task "
            f"(last: {getattr(last, 'address', last)}, pid {getattr(last, 'pid', '?')})",
        )
    return exc
