"""DaskPool against a real distributed.LocalCluster with two worker processes (one thread each)."""
import concurrent.futures
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import cloudpickle
import dask
import distributed
import numpy
import pytest

from gilfree import Pool, TaskTimeout, WorkerCrashed
from gilfree.cluster.dask import DaskPool

# Tasks defined here travel by value, as a user's script functions would.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOCAL_POOL_STATS = {"workers", "tasks", "queued", "running", "busy_workers", "restarts", "bytes_in", "bytes_out"}
LOCAL_WORKER_STATS = {"slot", "pid", "tasks", "busy_s", "idle_s", "bytes_in", "bytes_out", "restarts", "busy"}


@pytest.fixture(scope="module")
def cluster():
    # One retry after a worker death (Dask's default is 3), so the crash tests stay short.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
            silence_logs=logging.CRITICAL,
        )
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def thread_cluster():
    """Two workers in this process: they share a pid and have no nanny."""
    cluster = distributed.LocalCluster(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    )
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def pool(client):
    with DaskPool(client) as pool:
        yield pool


def square(x):
    return x * x


def add(x, y):
    return x + y


def fail_when_five(x):
    if x == 5:
        raise ValueError(f"bad item {x}")
    return x


def raise_deep(depth):
    if depth == 0:
        raise KeyError("deep")
    return raise_deep(depth - 1)


def test_submit_returns_results_with_args_and_kwargs(pool):
    assert pool.submit(add, 2, y=40).result(timeout=30) == 42
    assert pool.submit(pow, 2, 10).result(timeout=30) == 1024


@pytest.mark.parametrize("chunksize", [1, 7, "auto"])
def test_map_keeps_input_order(pool, chunksize):
    assert list(pool.map(square, range(300), chunksize=chunksize)) == [x * x for x in range(300)]


def test_map_reads_lazy_input(pool):
    assert list(pool.map(square, (x for x in range(50)))) == [x * x for x in range(50)]


def test_map_unordered_yields_every_result(pool):
    out = list(pool.map(square, range(200), chunksize=3, ordered=False))
    assert sorted(out) == [x * x for x in range(200)]


def test_map_of_several_iterables_and_starmap(pool):
    assert list(pool.map(add, range(10), range(100, 110))) == [100 + 2 * x for x in range(10)]
    assert list(pool.starmap(add, [(1, 2), (3, 4)])) == [3, 7]


def test_runs_on_both_worker_processes(pool):
    pids = set(pool.map(lambda _: (time.sleep(0.05), os.getpid())[1], range(20), chunksize=1))
    assert len(pids) == 2 and os.getpid() not in pids


def test_exception_carries_remote_traceback(pool):
    with pytest.raises(KeyError) as info:
        pool.submit(raise_deep, 3).result(timeout=30)
    remote = str(info.value.__cause__)
    assert remote.count("in raise_deep") == 4 and "KeyError: 'deep'" in remote


def test_map_raises_after_the_results_before_the_error(pool):
    seen = []
    with pytest.raises(ValueError, match="bad item 5") as info:
        for value in pool.map(fail_when_five, range(10), chunksize=2):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]
    assert "in fail_when_five" in str(info.value.__cause__)


def test_unpicklable_exception_becomes_runtime_error(pool):
    class Local(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def fail():
        raise Local("gone")

    with pytest.raises(RuntimeError, match=r"Local: gone \(the exception cannot travel back.*: no") as info:
        pool.submit(fail).result(timeout=30)
    assert "in fail" in str(info.value.__cause__)


class NeedsArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_needs_args():
    raise NeedsArgs(1, 2)


def test_exception_that_does_not_unpickle_becomes_runtime_error(pool):
    with pytest.raises(RuntimeError, match=r"NeedsArgs: 1-2 \(the exception cannot travel back") as info:
        pool.submit(raise_needs_args).result(timeout=30)
    assert "in raise_needs_args" in str(info.value.__cause__)
    assert pool.submit(square, 3).result(timeout=30) == 9


def rebuild_unless_in(pid):
    if os.getpid() == pid:
        raise ImportError("not here")
    return ValueError("rebuilt")


class FailsToRebuildIn(Exception):
    """Pickles and unpickles on a worker, but unpickling it in process args[0] fails."""

    def __reduce__(self):
        return rebuild_unless_in, self.args


def test_exception_that_cannot_be_rebuilt_in_the_caller_fails_only_its_task(pool):
    def fail(pid):
        raise FailsToRebuildIn(pid)

    with pytest.raises(RuntimeError, match="not rebuilt in this process: ImportError: not here") as info:
        pool.submit(fail, os.getpid()).result(timeout=30)
    assert "in fail" in str(info.value.__cause__)
    assert pool.submit(square, 3).result(timeout=30) == 9


def exit_with(code):
    sys.exit(code)


def interrupt():
    raise KeyboardInterrupt


def exit_at_three(x):
    if x == 3:
        sys.exit(5)
    return x


def test_system_exit_and_keyboard_interrupt_reach_the_caller_and_spare_the_workers(pool):
    pids = set(pool.client.run(os.getpid).values())
    with pytest.raises(SystemExit) as info:
        pool.submit(exit_with, 3).result(timeout=30)
    assert info.value.code == 3 and "in exit_with" in str(info.value.__cause__)
    with pytest.raises(KeyboardInterrupt) as info:
        pool.submit(interrupt).result(timeout=30)
    assert "in interrupt" in str(info.value.__cause__)
    with pytest.raises(SystemExit) as info:
        list(pool.map(exit_at_three, range(6), chunksize=6))
    assert info.value.code == 5
    assert set(pool.client.run(os.getpid).values()) == pids


def test_lambdas_and_closures(pool):
    offset = 1000
    counter = {"n": 0}

    def closure(x):
        counter["n"] += 1  # the worker's copy: the caller's dict stays untouched
        return x + offset + counter["n"]

    assert list(pool.map(lambda x: x - offset, [offset, offset + 1])) == [0, 1]
    assert pool.submit(closure, 1).result(timeout=30) == 1002
    assert counter["n"] == 0


def test_share_100_mb_buffer_reaches_tasks_as_read_only_view(pool):
    payload = bytes(range(256)) * (100 * 1024 * 1024 // 256)
    digest = hashlib.sha256(payload).hexdigest()
    with pool.share(payload) as handle:
        assert handle.nbytes == len(payload)
        assert bytes(handle.get()[:3]) == b"\x00\x01\x02"

        def inspect(i):
            view = handle  # inside the task the handle is the worker's buffer
            return type(view).__name__, view.readonly, len(view), hashlib.sha256(view).hexdigest(), view[i]

        results = list(pool.map(inspect, range(4), chunksize=1))
    assert results == [("memoryview", True, len(payload), digest, i) for i in range(4)]
    with pytest.raises(ValueError, match="released"):
        pool.submit(inspect, 0)


def test_share_numpy_array_arrives_read_only(pool):
    array = numpy.arange(1_000_000, dtype=numpy.float64)
    handle = pool.share(array)

    def use(scale):
        try:
            handle[0] = 1.0
            writable = True
        except ValueError:
            writable = False
        return type(handle).__name__, writable, float(handle.sum()) * scale

    assert pool.submit(use, 2).result(timeout=30) == ("ndarray", False, float(array.sum()) * 2)
    handle.release()


def test_share_broadcasts_again_when_a_worker_left_meanwhile(pool, monkeypatch):
    scatter = pool.client.scatter
    calls = []

    def worker_left_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:  # what the scheduler's replicate raises for a worker gone meanwhile
            raise KeyError("tcp://127.0.0.1:1")
        return scatter(*args, **kwargs)

    monkeypatch.setattr(pool.client, "scatter", worker_left_once)
    with pool.share(b"abc") as handle:
        assert pool.submit(bytes, handle).result(timeout=30) == b"abc"
    assert len(calls) == 2


async def test_run_awaits_one_call(pool):
    assert await pool.run(add, 1, y=2) == 3


async def test_amap_yields_results_in_order(pool):
    assert [r async for r in pool.amap(square, range(40))] == [x * x for x in range(40)]


def test_initializer_and_preload_run_on_every_worker(client):
    def remember(value):
        import builtins

        builtins._gilfree_test_value = value

    def probe():
        import builtins

        return builtins._gilfree_test_value, "colorsys" in sys.modules

    with DaskPool(client, initializer=remember, initargs=(7,), preload=("colorsys",)) as pool:
        assert set(pool.map(lambda _: (time.sleep(0.05), probe())[1], range(20), chunksize=1)) == {(7, True)}


def test_failing_initializer_fails_pool_creation(client):
    def broken():
        raise OSError("no database")

    with pytest.raises(OSError, match="no database"):
        DaskPool(client, initializer=broken)


def test_options_that_belong_to_dask_workers_warn(client):
    with pytest.warns(UserWarning, match="max_tasks_per_worker"):
        DaskPool(client, max_tasks_per_worker=10).shutdown()
    with pytest.warns(UserWarning, match="max_memory_per_worker"):
        DaskPool(client, max_memory_per_worker=1 << 30).shutdown()


@pytest.mark.parametrize(
    "max_workers, error", [(0, ValueError), (-1, ValueError), ("2", TypeError), (1.5, TypeError)]
)
def test_invalid_max_workers_is_refused_at_construction(client, max_workers, error):
    with pytest.raises(error):
        DaskPool(client, max_workers=max_workers)


def test_stats_per_dask_worker(client):
    with DaskPool(client) as pool:
        list(pool.map(square, range(30), chunksize=5))
        pool.submit(square, 3).result(timeout=30)
        stats = pool.stats()
    assert LOCAL_POOL_STATS <= stats.keys()
    assert len(stats["workers"]) == 2
    for row in stats["workers"]:
        assert LOCAL_WORKER_STATS <= row.keys()
        assert row["pid"] != os.getpid() and row["busy"] is False
    assert stats["tasks"] == 31 == sum(row["tasks"] for row in stats["workers"])
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0
    assert stats["running"] == stats["queued"] == 0


def test_stats_count_each_worker_of_a_shared_process(thread_cluster):
    with DaskPool(thread_cluster) as pool:
        for i in range(10):
            pool.submit(square, i).result(timeout=30)
        stats = pool.stats()
    rows = stats["workers"]
    assert len(rows) == 2 and rows[0]["pid"] == rows[1]["pid"] == os.getpid()
    assert stats["tasks"] == 10 == sum(row["tasks"] for row in rows)


def test_pool_with_cluster_argument_is_a_dask_pool(client):
    with Pool(cluster=client, task_timeout=30) as pool:
        assert isinstance(pool, DaskPool)
        assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]


def test_pool_with_cluster_takes_process_pool_executor_arguments(client):
    def remember(value):
        import builtins

        builtins._gilfree_test_value = value

    def probe(_):
        import builtins

        return builtins._gilfree_test_value

    spawn = multiprocessing.get_context("spawn")
    with Pool(2, spawn, remember, (8,), cluster=client) as pool:
        assert isinstance(pool, DaskPool)
        assert set(pool.map(probe, range(4))) == {8}
    with pytest.warns(UserWarning, match="max_tasks_per_worker"):
        Pool(cluster=client, max_tasks_per_child=5).shutdown()
    with pytest.raises(ValueError, match="never forks"):
        Pool(cluster=client, mp_context=multiprocessing.get_context("fork"))


@pytest.mark.parametrize("target", ["address", "cluster object"])
def test_pool_owns_and_closes_only_its_own_client(cluster, client, target):
    pool = DaskPool(cluster.scheduler_address if target == "address" else cluster, max_workers=3)
    assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]
    own_client = pool.client
    assert own_client is not client
    pool.shutdown()
    assert own_client.status == "closed"
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 2)
    DaskPool(client).shutdown()
    assert client.status == "running"


def test_shutdown_leaves_an_unfinished_map_over_an_endless_input_readable(cluster):
    # As with the local pool: shutdown neither submits an endless input nor waits for it; the
    # map reads on lazily, and the pool lets go of the cluster once the map is closed.
    read = []

    def numbers():
        for i in itertools.count():
            read.append(i)
            yield i

    pool = DaskPool(cluster.scheduler_address)
    results = pool.map(square, numbers())
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    started = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - started < 30
    assert len(read) < 10**5
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 2)
    assert pool.client.status == "running"  # the map still needs it
    assert [next(results) for _ in range(2000)] == [i * i for i in range(5, 2005)]
    results.close()
    deadline = time.monotonic() + 30
    while pool.client.status != "closed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.client.status == "closed"


def test_map_read_after_shutdown_reads_its_generator_to_the_end(client):
    with DaskPool(client) as pool:
        results = pool.map(square, (i for i in range(3000)))
        assert next(results) == 0
    assert list(results) == [i * i for i in range(1, 3000)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.map(square, range(3))


def test_shutdown_cancelling_futures_stops_an_unfinished_map(client):
    pool = DaskPool(client)
    results = pool.map(square, itertools.count())
    assert next(results) == 0
    pool.shutdown(cancel_futures=True)
    with pytest.raises(concurrent.futures.CancelledError):
        for _ in results:
            pass


def test_cancelled_future_never_runs(pool, tmp_path):
    marker = tmp_path / "ran"
    blockers = [pool.submit(time.sleep, 1.0) for _ in range(4)]
    late = pool.submit(marker.write_text, "yes")
    assert late.cancel() and late.cancelled()
    assert late in concurrent.futures.wait([late], timeout=30).done
    for blocker in blockers:
        blocker.result(timeout=60)
    assert pool.submit(square, 4).result(timeout=30) == 16
    assert not marker.exists()


def test_cancel_is_refused_once_the_task_runs(pool, tmp_path):
    started = tmp_path / "started"

    def mark_then_sleep():
        started.write_text("yes")
        time.sleep(1)
        return "done"

    future = pool.submit(mark_then_sleep)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not future.cancel() and not future.cancelled()
    assert future.result(timeout=30) == "done"


def test_cancel_futures_on_shutdown(client):
    pool = DaskPool(client)
    futures = [pool.submit(time.sleep, 0.5) for _ in range(8)]
    pool.shutdown(cancel_futures=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)


def test_closing_the_users_client_fails_pending_and_new_work_clearly(cluster):
    client = distributed.Client(cluster, set_as_default=False)
    pool = DaskPool(client)
    pending = pool.submit(time.sleep, 1)
    client.close()
    with pytest.raises(BrokenProcessPool, match="client was closed"):
        pending.result(timeout=30)
    with pytest.raises(BrokenProcessPool, match="client was closed"):
        pool.submit(square, 2)
    with pytest.raises(BrokenProcessPool, match="client was closed"):
        pool.stats()
    pool.shutdown()


def test_pool_whose_scheduler_is_gone_fails_pending_and_new_work_clearly():
    cluster = distributed.LocalCluster(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    )
    pool = DaskPool(cluster.scheduler_address)
    pending = pool.submit(time.sleep, 1)
    cluster.close()
    with pytest.raises(BrokenProcessPool, match="lost its scheduler"):
        pending.result(timeout=30)
    with pytest.raises(BrokenProcessPool, match="lost its scheduler"):
        pool.submit(square, 2)
    with pytest.raises(BrokenProcessPool, match="lost its scheduler"):
        list(pool.map(square, range(3)))
    pool.shutdown()
    assert pool.client.status == "closed"


# -- failures that take worker processes down: last, since the cluster restarts workers


def kill_own_worker():
    os.kill(os.getpid(), signal.SIGKILL)


def test_task_killing_its_worker_each_time_fails_with_worker_crashed(pool):
    with pytest.raises(WorkerCrashed) as info:
        pool.submit(kill_own_worker).result(timeout=60)
    assert info.value.pid is not None
    assert pool.submit(square, 9).result(timeout=60) == 81
    assert list(pool.map(square, range(10))) == [x * x for x in range(10)]


def test_task_whose_worker_dies_once_is_retried(pool, tmp_path):
    marker = tmp_path / "died-once"

    def die_first_time(x):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    assert pool.submit(die_first_time, 21).result(timeout=60) == 42
    assert marker.exists()
    assert wait_for_restart(pool)["restarts"] >= 1


def spin(x=None):
    while True:
        pass


def test_task_timeout_stops_python_code_and_keeps_the_worker(client):
    client.wait_for_workers(2, timeout=60)  # the crash tests above restarted workers
    with DaskPool(client, task_timeout=0.5) as pool:
        pids = {row["pid"] for row in pool.stats()["workers"]}
        started = time.monotonic()
        with pytest.raises(TaskTimeout):
            pool.submit(spin).result(timeout=30)
        assert time.monotonic() - started < 10
        with pytest.raises(TaskTimeout):
            list(pool.map(lambda x: spin() if x == 3 else x, range(6), chunksize=2))
        assert pool.submit(os.getpid).result(timeout=30) in pids
        stats = pool.stats()
        assert {row["pid"] for row in stats["workers"]} == pids and stats["restarts"] == 0


def wait_for_restart(pool, timeout=30):
    deadline = time.monotonic() + timeout
    while pool.stats()["restarts"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    return pool.stats()


def test_task_timeout_restarts_a_worker_stuck_in_c(client, tmp_path):
    client.wait_for_workers(2, timeout=60)
    address_file = tmp_path / "address"

    def stuck():
        address_file.write_text(distributed.get_worker().address)
        time.sleep(60)

    with DaskPool(client, task_timeout=0.5) as pool:
        pids = {row["pid"] for row in pool.stats()["workers"]}
        started = time.monotonic()
        future = pool.submit(stuck)
        # Callbacks run as the future fails: by then the scheduler must have let the worker go,
        # so that what the caller does next (a share(), say) only meets live workers.
        listed = []
        checked = threading.Event()

        def check(_):
            listed.append(address_file.read_text() in client.scheduler_info()["workers"])
            checked.set()

        future.add_done_callback(check)
        with pytest.raises(TaskTimeout, match="worker process was killed and is being restarted"):
            future.result(timeout=30)
        assert time.monotonic() - started < 15
        assert checked.wait(30) and listed == [False]
        with pool.share(b"after") as handle:
            assert pool.submit(bytes, handle).result(timeout=30) == b"after"
        stats = wait_for_restart(pool)
        assert stats["restarts"] == 1
        assert len(pids - {row["pid"] for row in stats["workers"]}) == 1  # the stuck one is gone
        assert list(pool.map(square, range(10))) == [x * x for x in range(10)]


def test_task_stuck_in_c_without_a_nanny_says_its_worker_was_not_restarted(thread_cluster):
    with DaskPool(thread_cluster, task_timeout=0.5) as pool:
        with pytest.raises(TaskTimeout, match="worker was not restarted .no nanny") as info:
            pool.submit(time.sleep, 2.5).result(timeout=30)
        assert "killed" not in str(info.value)
        assert pool.submit(square, 5).result(timeout=30) == 25


def test_a_timeout_the_task_already_saw_leaves_no_pending_exception_behind():
    # The watchdog used to clear a fired TaskTimeout with PyThreadState_SetAsyncExc(id, NULL),
    # which signals the interpreter again: CPython 3.11 then keeps its eval breaker set for good,
    # and a thread started under a profile function (a gil monitor's) spun forever.
    script = """
import os, threading, time
from gilfree import gil
from gilfree.cluster.dask import _Watchdog
from gilfree.errors import TaskTimeout

watchdog = _Watchdog()

def task():
    entry = watchdog.arm(0.05, lambda: None)
    try:
        try:
            time.sleep(0.3)  # in C past the deadline: the TaskTimeout surfaces as it returns
        finally:
            watchdog.disarm(entry)
    except TaskTimeout:
        pass

t = threading.Thread(target=task)
t.start()
t.join()
with gil.monitor():
    later = threading.Thread(target=sum, args=(range(1000),), daemon=True)
    later.start()
    later.join(10)
print("stuck" if later.is_alive() else "ok", flush=True)
os._exit(0)
"""
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["ok"], done.stderr


def test_ctrl_c_in_with_block_cancels_the_tasks_and_waits_for_none(client):
    # Ctrl-C used to leave the block through shutdown(wait=True): every submitted task ran first.
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with DaskPool(client) as pool:
            futures = [pool.submit(time.sleep, 1) for _ in range(20)]  # 10 s on 2 workers
            futures[0].result(timeout=30)
            raise KeyboardInterrupt  # as Ctrl-C raises it in the waiting thread
    assert time.monotonic() - started < 8  # well before the 19 tasks left would finish
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures[1:]) >= 17
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 2)
    # Cancelled on the cluster too, running ones included (they end in their threads, their
    # results dropped); when the scheduler then forgets them is Dask's business.
    statuses = [f.dask_future.status for f in futures[1:]]
    assert set(statuses) <= {"cancelled", "finished"} and statuses.count("cancelled") >= 17, statuses
    time.sleep(1)  # the running calls end before the next test


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler for the test, also where the suite started with SIGINT
    ignored (a background job of a non-interactive shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_map_shuts_the_pool_down_without_waiting(client, ctrl_c):
    # As the local pool (which kills its workers): the pool is shut down, its tasks cancelled.
    pool = DaskPool(client)
    futures = [pool.submit(time.sleep, 1) for _ in range(10)]
    started = time.monotonic()
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in pool.map(slow_item, range(40), chunksize=1):
                pass
    finally:
        timer.cancel()
    assert time.monotonic() - started < 8  # the 10 tasks and 40 one-second items: 25 s
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 2)
    time.sleep(1)


def slow_item(x):
    time.sleep(1)
    return x


async def test_async_with_left_on_cancellation_waits_for_no_task(client):
    import asyncio

    pool = DaskPool(client)
    futures = []

    async def work():
        async with pool:
            futures.extend(pool.submit(time.sleep, 1) for _ in range(20))
            await asyncio.sleep(30)

    started = time.monotonic()
    task = asyncio.ensure_future(work())
    await asyncio.sleep(1.5)
    task.cancel()  # as asyncio.timeout, a TaskGroup's failure or Ctrl-C under asyncio.run do
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 8  # 20 one-second tasks on 2 workers: 10 s
    assert sum(f.cancelled() for f in futures) >= 14
    concurrent.futures.wait(futures, timeout=10)  # the running ones finish in the background
    assert all(f.done() for f in futures)
    time.sleep(0.5)


@pytest.mark.parametrize("address", ["", "notaurl", "tcp://host:noport", "nosuch://host:8786"])
def test_bad_scheduler_address_raises_value_error_and_creates_no_client(address, monkeypatch):
    made = []
    monkeypatch.setattr(distributed.Client, "__init__", lambda self, *a, **k: made.append(a))
    with pytest.raises(ValueError, match=f"cluster={address!r} is not a Dask scheduler address"):
        Pool(cluster=address)
    assert made == []


def test_bad_scheduler_address_leaves_no_hang_at_exit():
    # A half-made Client kept the interpreter 60 s at exit (Client.__del__).
    import subprocess

    script = "import gilfree\ntry:\n    gilfree.Pool(cluster='')\nexcept ValueError as e:\n    print('ValueError', e)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=40)
    assert done.stdout.startswith("ValueError cluster=''"), done.stderr


@pytest.mark.parametrize(
    "option", [dict(max_tasks_per_worker=-1), dict(max_tasks_per_worker=0), dict(max_tasks_per_child=0),
               dict(max_memory_per_worker=-5)],
)
def test_invalid_worker_options_are_refused_as_by_the_local_pool(client, option, recwarn):
    with pytest.raises(ValueError, match=f"{next(iter(option))} must be at least 1"):
        DaskPool(client, **option)
    assert not [w for w in recwarn if "does not apply" in str(w.message)]
