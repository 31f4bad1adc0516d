"""What every gilfree pool shares: map/starmap/amap/run, lazy chunked input, ordering, progress.

A pool subclasses PoolBase and provides ``submit`` and ``_submit_chunk(fn, items, star)``, a
Future whose result is what ``run_chunk`` (from _worker) returns. Chunks are sized so that one
takes about ``_chunk_target_s`` of worker time, and at most ``2 * workers + 2`` chunks are in
flight: a generator of any length is consumed in bounded memory.
"""
import collections
import concurrent.futures
import itertools
import operator
import sys
import threading
import time
import weakref

from ._worker import run_chunk  # noqa: F401 - the chunk runner every pool sends

CHUNK_TARGET_S = 0.02
CHUNK_FIRST = 1
CHUNK_MAX = 100_000


def with_remote_traceback(exc, text):
    """Attaches the worker's traceback text to exc as concurrent.futures does; returns exc."""
    from concurrent.futures.process import _RemoteTraceback

    exc.__cause__ = _RemoteTraceback(text)
    return exc


def is_ctrl_c(exc):
    """True for a KeyboardInterrupt of this process; False for one a task raised in a worker
    (it arrives with the worker's traceback attached), which must not tear the pool down."""
    from concurrent.futures.process import _RemoteTraceback

    return not isinstance(exc.__cause__, _RemoteTraceback)


def process_pool_options(mp_context, max_tasks_per_worker, max_tasks_per_child):
    """Checks ProcessPoolExecutor's mp_context and max_tasks_per_child, which every pool takes
    so that it is a drop-in; returns max_tasks_per_worker (max_tasks_per_child is its alias)."""
    if mp_context is not None:
        if not callable(getattr(mp_context, "get_start_method", None)):
            raise TypeError("mp_context must be a multiprocessing context or None")
        # allow_none: asking a default context fixes its method for the whole program.
        if mp_context.get_start_method(allow_none=True) == "fork":
            raise ValueError(
                "gilfree.Pool never forks this process: workers start from a clean template "
                "process, as with 'spawn' or 'forkserver', and do not inherit its memory. Pass "
                "mp_context=None (or a 'spawn' or 'forkserver' context), and give tasks what they "
                "need as arguments, through initializer/initargs, or with pool.share()"
            )
    if max_tasks_per_child is not None:
        if max_tasks_per_worker is not None:
            raise TypeError("max_tasks_per_child is an alias of max_tasks_per_worker: pass one")
        return max_tasks_per_child
    return max_tasks_per_worker


class _ChunkSizer:
    """Grows chunks until one takes about target_s of worker time, up to max_size items."""

    def __init__(self, chunksize, target_s, max_size):
        self.target_s = target_s
        self.max_size = max_size
        self.fixed = None if chunksize == "auto" else operator.index(chunksize)
        if self.fixed is not None and self.fixed < 1:
            raise ValueError("chunksize must be >= 1 or 'auto'")
        self.size = self.fixed or CHUNK_FIRST

    def observe(self, items, elapsed):
        if self.fixed is not None or items == 0:
            return
        per_item = elapsed / items
        wanted = CHUNK_MAX if per_item <= 0 else int(self.target_s / per_item)
        # Never more than quadruple at once: the first chunks' timings are noisy.
        self.size = max(1, min(wanted, self.max_size, self.size * 4))


class _Pipeline:
    """Feeds chunks of an iterator to a pool, keeping a bounded number in flight."""

    def __init__(self, pool, fn, items, star, chunksize, ordered):
        self.pool = pool
        self.fn = fn
        self.items = iter(items)
        self.star = star
        self.sizer = _ChunkSizer(chunksize, pool._chunk_target_s, pool._max_chunk)
        self.ordered = ordered
        self.window = 2 * pool._max_workers + 2
        self.inflight = collections.deque()  # (future, item count)
        self.exhausted = False
        self.stopped = False  # by shutdown(cancel_futures=True): the rest is cancelled
        self.error = None  # the input's own, raised after the results of the items before it
        # The reading thread and a shutdown stopping the map must not both pull from the input.
        self.lock = threading.Lock()

    def fill(self, window=None):
        window = self.window if window is None else window
        with self.lock:
            while not self.exhausted and not self.stopped and len(self.inflight) < window:
                chunk = []
                try:
                    chunk.extend(itertools.islice(self.items, self.sizer.size))
                except Exception as exc:  # extend keeps the items read before it
                    self.error = exc
                if chunk:
                    future = self.pool._submit_chunk(self.fn, chunk, self.star)
                    self.inflight.append((future, len(chunk)))
                if not chunk or self.error is not None:
                    self.exhausted = True

    def finished(self):
        with self.lock:
            if self.inflight:
                return False
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            if self.stopped and not self.exhausted:
                if next(self.items, _END) is not _END:
                    raise concurrent.futures.CancelledError("the pool was shut down")
                self.exhausted = True
            return self.exhausted

    def take(self, future):
        """Removes a completed chunk; returns its results or raises its first error."""
        with self.lock:
            for i, (fut, count) in enumerate(self.inflight):
                if fut is future:
                    del self.inflight[i]
                    break
        results, error, elapsed = future.result()
        self.sizer.observe(count, elapsed)
        return results, error

    def cancel(self):
        """The map's reader is done with it (read to the end, closed, or failed)."""
        with self.lock:
            for fut, _ in self.inflight:
                fut.cancel()
            self.inflight.clear()
            self.exhausted = True
        self.pool._close_map(self)


_END = object()


def _to_pop(results):
    """A chunk's results list (a worker's, held by its future too), reversed in place to pop()
    from the end in order: a map keeps no reference to a result it yielded (as Executor.map), so
    a reader that drops each one frees it."""
    results.reverse()
    return results


def _in_notebook():
    """True in a Jupyter kernel (IPython's ZMQInteractiveShell)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class _Progress:
    def __init__(self, enabled, items):
        self.bar = None
        if not enabled:
            return
        # Checked even without a terminal, so a missing tqdm shows up where the script is tested
        # (CI, a log redirect), not first when someone runs it by hand.
        try:
            from tqdm import tqdm
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm: pip install 'gilfree[progress]'") from exc
        total = len(items) if hasattr(items, "__len__") else None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, file=sys.stderr)
        elif _in_notebook():  # stderr is no terminal there, but a bar shows
            try:
                from tqdm.notebook import tqdm as widget_bar

                self.bar = widget_bar(total=total)
            except ImportError:  # without ipywidgets (raised at the import or at the bar)
                self.bar = tqdm(total=total, file=sys.stderr)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class PoolBase(concurrent.futures.Executor):
    """map/starmap/amap/run and the context manager, over submit and _submit_chunk."""

    _max_workers = 1
    # Worker time one chunk of an "auto"-sized map should take: enough to amortise the
    # per-task overhead of the pool.
    _chunk_target_s = CHUNK_TARGET_S
    _max_chunk = CHUNK_MAX  # items in an "auto"-sized chunk at most

    def __init__(self):
        self._pipelines = weakref.WeakSet()  # maps and amaps still being read

    def _submit_chunk(self, fn, items, star):
        raise NotImplementedError

    def _open_map(self, pipeline):
        """Registers a map or amap about to be read."""
        self._pipelines.add(pipeline)

    def _close_map(self, pipeline):
        """Called when a map's reader is done with it."""
        self._pipelines.discard(pipeline)

    def _stop_maps(self):
        """The maps being read submit no more of their input: past the results of what they
        already submitted, they raise CancelledError (never a silently shortened sequence)."""
        for pipeline in list(self._pipelines):
            pipeline.stopped = True
            self._pipelines.discard(pipeline)

    def _interrupted(self):
        """Ctrl-C while leaving a with block (and, unless _stop_waited says otherwise, while
        waiting for a map's or a future's tasks)."""

    def _stop_waited(self, futures):
        """Ctrl-C arrived while the caller waited for these futures (a map's, a result())."""
        self._interrupted()

    def _waited_with(self, future):
        """The futures that Ctrl-C in future.result() stops: the map's in flight when future is
        the chunk an ordered map waits for (all at once, so that the worker replacing a killed
        one finds none of them left to take), else future alone."""
        for pipeline in list(self._pipelines):
            with pipeline.lock:
                if pipeline.inflight and pipeline.inflight[0][0] is future:
                    return [f for f, _ in pipeline.inflight]
        return [future]

    def run(self, fn, /, *args, **kwargs):
        """An asyncio future of fn(*args, **kwargs) run in the pool: ``await pool.run(...)``.

        Call it in a coroutine: the future belongs to the running event loop (RuntimeError,
        and nothing submitted, without one; use submit() there). Submits at once (as submit(),
        whose errors it raises here); cancelling the asyncio future cancels the task if no
        worker has started it."""
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "pool.run() needs a running event loop (await it in a coroutine); "
                "use pool.submit() outside asyncio"
            ) from None
        return asyncio.wrap_future(self.submit(fn, *args, **kwargs), loop=loop)

    def map(self, fn, *iterables, chunksize="auto", ordered=True, timeout=None, progress=False):
        """An iterator over fn(*args) for args taken from the iterables together (zipped: it
        stops with the shortest), as Executor.map, with these differences and options:

        - the input is read lazily, as results are taken, with a bounded number of chunks in
          flight: a generator of any length runs in bounded memory. Work starts at the call.
        - chunksize: items per task. "auto" (the default) grows chunks until one takes about
          20 ms of a worker's time (100 ms on Dask); an int fixes it.
        - ordered: True yields results in input order; False yields each chunk's results as it
          completes, whatever its position.
        - timeout: seconds from this call; the iterator raises TimeoutError once it passes
          with a result still missing.
        - progress: True draws a tqdm bar on stderr when stderr is a terminal, or in a Jupyter
          notebook (a widget with ipywidgets installed); nothing otherwise. Needs tqdm (pip
          install 'gilfree[progress]'), an ImportError without it either way.

        With no iterables it yields nothing, as Executor.map. An item that raises ends the map
        with its exception (its worker's traceback as __cause__), after the results before it
        (ordered=True: all of them). An input that
        raises ends it the same way, after the results of every item before the failing one.
        Closing the iterator once read from (close(), or dropping it) cancels the chunks it
        submitted that no worker has started. A map opened before shutdown() stays readable
        after it."""
        if len(iterables) == 1:
            items, star = iterables[0], False
        else:
            items, star = zip(*iterables), True
        return self._map(fn, items, star, chunksize, ordered, timeout, progress)

    def starmap(self, fn, iterable, *, chunksize="auto", ordered=True, timeout=None, progress=False):
        """map() of fn(*item) for each item of iterable (each an argument tuple); the same
        options and behaviour as map()."""
        return self._map(fn, iterable, True, chunksize, ordered, timeout, progress)

    def _map(self, fn, items, star, chunksize, ordered, timeout, progress):
        pipeline = _Pipeline(self, fn, items, star, chunksize, ordered)
        self._open_map(pipeline)
        bar = _Progress(progress, items)
        deadline = None if timeout is None else time.monotonic() + timeout
        # Like Executor.map, work starts now, not at the first next().
        pipeline.fill()
        return self._map_results(pipeline, bar, deadline)

    def _map_results(self, pipeline, bar, deadline):
        try:
            while not pipeline.finished():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if pipeline.ordered:
                    future = pipeline.inflight[0][0]
                    future.result(remaining)  # raises TimeoutError at the deadline
                else:
                    done, _ = concurrent.futures.wait(
                        [f for f, _ in pipeline.inflight],
                        timeout=remaining,
                        return_when=concurrent.futures.FIRST_COMPLETED,
                    )
                    if not done:
                        raise TimeoutError()
                    future = next(iter(done))
                results, error = pipeline.take(future)
                future = done = None  # it holds the chunk's results: yielded ones must not stay
                pipeline.fill()
                bar.update(len(results))
                results = _to_pop(results)
                while results:
                    yield results.pop()
                if error is not None:
                    raise with_remote_traceback(*error)
        except KeyboardInterrupt as exc:
            if is_ctrl_c(exc):
                self._stop_waited([f for f, _ in pipeline.inflight])
            raise
        finally:
            pipeline.cancel()
            bar.close()

    async def amap(self, fn, iterable, *, chunksize="auto", ordered=True, star=False, progress=False):
        """Async iterator over fn(item) for each item of iterable (fn(*item) with star=True),
        run in the pool: ``async for result in pool.amap(fn, items)``.

        chunksize, ordered and progress as in map(); no timeout (wrap the loop in
        asyncio.timeout). The input is read lazily in the event loop's thread, so a blocking
        generator blocks the loop. An item that raises ends it with that exception, after the
        results before it. Closing it early (aclose(), or dropping it) cancels the chunks it
        submitted that no worker has started."""
        import asyncio

        pipeline = _Pipeline(self, fn, iterable, star, chunksize, ordered)
        self._open_map(pipeline)
        bar = _Progress(progress, iterable)
        wrapped = {}
        try:
            pipeline.fill()
            while not pipeline.finished():
                for fut, _ in pipeline.inflight:
                    if fut not in wrapped:
                        wrapped[fut] = asyncio.wrap_future(fut)
                if pipeline.ordered:
                    future = pipeline.inflight[0][0]
                    await wrapped[future]
                else:
                    done, _ = await asyncio.wait(
                        [wrapped[f] for f, _ in pipeline.inflight],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    first = next(iter(done))
                    future = next(f for f in wrapped if wrapped[f] is first)
                wrapped.pop(future)
                results, error = pipeline.take(future)
                future = first = done = None  # they hold the chunk's results
                pipeline.fill()
                bar.update(len(results))
                results = _to_pop(results)
                while results:
                    yield results.pop()
                if error is not None:
                    raise with_remote_traceback(*error)
        finally:
            pipeline.cancel()
            bar.close()
            # Nobody awaits the chunks left any more: a running one's failure would otherwise be
            # logged as "Future exception was never retrieved" when its asyncio future goes.
            for waited in wrapped.values():
                try:
                    if not waited.cancel() and not waited.cancelled():
                        waited.exception()
                except RuntimeError:  # the loop is closed: it logs nothing any more
                    pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._left_on_interrupt(exc_type, exc):
            self.shutdown(wait=True)
        return False

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        """As __exit__, without blocking the event loop: the wait for the tasks runs in a
        thread of its own (not the loop's default executor, which asyncio.run joins)."""
        if self._left_on_interrupt(exc_type, exc):
            return False
        import asyncio

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down():
            try:
                self.shutdown(wait=True)
                outcome = None
            except BaseException as error:
                outcome = error
            try:
                loop.call_soon_threadsafe(_settle, done, outcome)
            except RuntimeError:  # the loop is closed: nobody waits
                pass

        threading.Thread(target=shut_down, name="gilfree-shutdown", daemon=True).start()
        try:
            await done
        except asyncio.CancelledError:
            # Cancelled while waiting (Ctrl-C under asyncio.run): as when left on cancellation.
            self.shutdown(wait=False, cancel_futures=True)
            raise
        return False

    def _left_on_interrupt(self, exc_type, exc):
        """Leaving a with or async with block on Ctrl-C or on the cancellation of the code that
        awaited in it: shuts the pool down without waiting for its running tasks; returns True.

        Ctrl-C (a KeyboardInterrupt of this process) kills the workers now. An asyncio
        cancellation (asyncio.run turns Ctrl-C into one; also asyncio.timeout, a TaskGroup's
        failure) cancels the tasks no worker has started and lets the running ones finish in the
        background, as cancelling ``await pool.run(...)`` does: the workers end after them, and
        at once if the interpreter then exits on a Ctrl-C."""
        if exc_type is KeyboardInterrupt and is_ctrl_c(exc):
            self._interrupted()
            self.shutdown(wait=True)  # nothing left to wait for
            return True
        asyncio = sys.modules.get("asyncio")  # not imported: no asyncio cancellation
        if asyncio is not None and isinstance(exc, asyncio.CancelledError):
            self.shutdown(wait=False, cancel_futures=True)
            return True
        return False


def _settle(future, error):
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
