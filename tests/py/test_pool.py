"""Behaviour of gilfree.Pool: results, errors, crashes, timeouts, signals, buffers, threads."""
import asyncio
import collections
import gc
import concurrent.futures
import ctypes
import inspect
import io
import json
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest

import gilfree
import poolfuncs as f

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def pool():
    with gilfree.Pool(2) as p:
        yield p


def busy_worker_pid(pool, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [w["pid"] for w in pool.stats()["workers"] if w["busy"]]
        if busy:
            return busy[0]
        time.sleep(0.005)
    raise AssertionError("no worker became busy")


# Python leaves SIGINT alone when it starts ignored (as in a job a shell put in the background):
# the scripts take the handler a terminal program gets, so the Ctrl-C tests test the pool.
CTRL_C_HANDLER = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def run_script(code, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *sys.path]))
    return subprocess.Popen(
        [sys.executable, "-c", CTRL_C_HANDLER + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().split(") ")[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


# ------------------------------------------------------------------ results


def test_submit_and_map(pool):
    assert pool.submit(f.square, 12).result(timeout=10) == 144
    assert pool.submit(f.add, 1, b=2).result() == 3
    assert list(pool.map(f.square, range(100))) == [x * x for x in range(100)]
    assert list(pool.map(f.add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert list(pool.starmap(f.add, [(1, 2), (3, 4)])) == [3, 7]


def test_map_unordered_and_chunksizes(pool):
    for chunksize in (1, 7, "auto"):
        got = list(pool.map(f.square, range(500), chunksize=chunksize, ordered=False))
        assert sorted(got) == [x * x for x in range(500)]
    delays = [0.3, 0.0, 0.0]
    first = next(iter(pool.map(f.sleep_then, delays, delays, chunksize=1, ordered=False)))
    assert first == 0.0


@pytest.mark.parametrize("chunksize, ordered", [(5, True), (5, False), ("auto", True)])
def test_map_keeps_no_result_the_reader_dropped(pool, chunksize, ordered):
    alive = []
    for box in pool.map(f.boxed, range(20), chunksize=chunksize, ordered=ordered):
        watch = weakref.ref(box)
        del box
        gc.collect()
        alive.append(watch() is not None)
    assert alive == [False] * 20


@pytest.mark.parametrize("ordered", [True, False])
def test_amap_keeps_no_result_the_reader_dropped(pool, ordered):
    async def read():
        alive = []
        async for box in pool.amap(f.boxed, range(20), chunksize=5, ordered=ordered):
            watch = weakref.ref(box)
            del box
            gc.collect()
            alive.append(watch() is not None)
        return alive

    assert asyncio.run(read()) == [False] * 20


def test_map_consumes_input_lazily(pool):
    taken = 0

    def numbers():
        nonlocal taken
        for i in range(10**8):
            taken += 1
            yield i

    results = pool.map(f.square, numbers())
    for i, value in zip(range(2000), results):
        assert value == i * i
    # Read-ahead is bounded: nowhere near the generator's 10**8 items.
    assert taken < 2000 + 10 * 100_000
    results.close()


def test_map_timeout(pool):
    with pytest.raises(TimeoutError):
        list(pool.map(f.sleep_then, [2.0], timeout=0.2))


def test_map_error_after_partial_results(pool):
    results = pool.map(f.fail_on, range(20), [13] * 20, chunksize=4)
    got = []
    with pytest.raises(f.Boom, match="bad item 13"):
        for value in results:
            got.append(value)
    assert got == list(range(13))


def test_lambdas_closures_and_main_functions(pool):
    offset = 10
    assert pool.submit(lambda x: x + offset, 1).result() == 11

    def closure(x):
        return x * offset

    assert list(pool.map(closure, [1, 2])) == [10, 20]
    script = """
        import gilfree
        def triple(x):
            return 3 * x
        class Point:
            def __init__(self, x): self.x = x
        def norm(p):
            return Point(p.x * 2)
        if __name__ == "__main__":
            with gilfree.Pool(2) as pool:
                print(list(pool.map(triple, range(4))), pool.submit(norm, Point(4)).result().x)
    """
    proc = run_script(script)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "[0, 3, 6, 9] 8"


def test_user_exception_type_and_remote_traceback(pool):
    future = pool.submit(f.boom, 3)
    with pytest.raises(f.Boom, match="boom 3") as info:
        future.result()
    assert "in boom" in str(info.value.__cause__)
    assert isinstance(future.exception(), f.Boom)


def test_unpicklable_argument_is_refused_before_sending(pool):
    before = pool.stats()["tasks"]
    with pytest.raises((TypeError, pickle.PicklingError)):
        pool.submit(f.echo, threading.Lock())
    assert pool.submit(f.square, 3).result() == 9
    assert pool.stats()["tasks"] == before + 1


def test_unpicklable_result_is_an_error_not_a_crash(pool):
    with pytest.raises(Exception, match="pickle"):
        pool.submit(threading.Lock).result()
    assert pool.submit(f.square, 4).result() == 16


# ------------------------------------------------------------------ futures API


def test_futures_work_with_concurrent_futures_and_asyncio(pool):
    futures = [pool.submit(f.square, i) for i in range(50)]
    assert sorted(fut.result() for fut in concurrent.futures.as_completed(futures)) == sorted(
        i * i for i in range(50)
    )
    done, not_done = concurrent.futures.wait(futures)
    assert len(done) == 50 and not not_done

    async def main():
        loop = asyncio.get_running_loop()
        a = await asyncio.wrap_future(pool.submit(f.square, 5))
        b = await loop.run_in_executor(pool, f.square, 6)
        c = await pool.run(f.add, 1, b=1)
        items = [x async for x in pool.amap(f.square, range(10))]
        unordered = [x async for x in pool.amap(f.square, range(10), ordered=False)]
        return a, b, c, items, sorted(unordered)

    a, b, c, items, unordered = asyncio.run(main())
    assert (a, b, c) == (25, 36, 2)
    assert items == unordered == [x * x for x in range(10)]


def test_cancel_queued_tasks():
    with gilfree.Pool(1) as pool:
        blocker = pool.submit(f.sleep_then, 0.5)
        time.sleep(0.1)
        queued = [pool.submit(f.square, i) for i in range(20)]
        cancelled = [fut.cancel() for fut in queued]
        # The first tasks may already sit in the worker's ring; later ones are in the queue.
        assert cancelled[-1]
        assert blocker.result() is None
        for fut, was_cancelled in zip(queued, cancelled):
            if was_cancelled:
                assert fut.cancelled()
            else:
                assert fut.result() is not None


def test_running_reports_a_started_task_which_can_no_longer_be_cancelled():
    with gilfree.Pool(1) as pool:
        started = pool.submit(f.sleep_then, 1.0, "done")
        queued = pool.submit(f.square, 3)
        deadline = time.monotonic() + 10
        while not started.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started.running() and not started.done()
        assert not queued.running()
        assert not started.cancel()
        assert started.result() == "done"
        assert not started.running() and started.done()
        assert queued.result() == 9


def test_shutdown_cancel_futures():
    pool = gilfree.Pool(1)
    pool.submit(f.sleep_then, 0.3)
    time.sleep(0.05)
    queued = [pool.submit(f.square, i) for i in range(50)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert any(fut.cancelled() for fut in queued)
    with pytest.raises(RuntimeError):
        pool.submit(f.square, 1)


def test_many_threads_submit_at_once(pool):
    errors = []

    def hammer(base):
        try:
            futs = [pool.submit(f.add, base, i) for i in range(500)]
            assert [fut.result() for fut in futs] == [base + i for i in range(500)]
            assert list(pool.map(f.square, range(base, base + 100))) == [
                x * x for x in range(base, base + 100)
            ]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------ buffers


@pytest.mark.parametrize("size", [1 << 20, 16 << 20], ids=["copied", "mapped"])
def test_large_bytes_arrive_as_bytes_and_come_back(pool, size):
    data = os.urandom(size)
    assert pool.submit(f.nbytes_and_type, data).result() == ("bytes", size, data[:4])
    back = pool.submit(f.echo, data).result()
    assert type(back) is bytes and back == data
    assert hash(back) == hash(data) and back[-3:] == data[-3:] and back.hex()[:8] == data.hex()[:8]
    nested = pool.submit(f.echo, {"k": [data, data[:10]]}).result()
    assert nested == {"k": [data, data[:10]]}
    del back, nested


def test_bytearray_memoryview_and_numpy(pool):
    blob = bytearray(os.urandom(300_000))
    assert pool.submit(f.echo, blob).result() == blob
    view = memoryview(bytes(blob))
    got = pool.submit(f.echo, view).result()
    assert bytes(got) == bytes(blob)
    arr = np.arange(1_000_000, dtype=np.int64).reshape(1000, 1000)
    back = pool.submit(f.echo, arr).result()
    assert isinstance(back, np.ndarray) and back.shape == arr.shape and np.array_equal(back, arr)
    assert pool.submit(f.array_sum, arr).result() == ("ndarray", int(arr.sum()), False)


def test_share_buffers(pool):
    data = os.urandom(5 << 20)
    handle = pool.share(data)
    results = [pool.submit(f.nbytes_and_type, handle) for _ in range(20)]
    assert all(r.result() == ("memoryview", 5 << 20, data[:4]) for r in results)
    arr = np.random.default_rng(1).integers(0, 1000, size=(500, 400))
    shared = pool.share(arr)
    assert pool.submit(f.array_sum, shared).result() == ("ndarray", int(arr.sum()), False)
    assert np.array_equal(shared.get(), arr)


def test_random_payloads_round_trip_with_stable_fds_and_rss():
    rng = random.Random(7)
    source = os.urandom(8 << 20)
    libc = ctypes.CDLL(None)

    def payload():
        # Mostly small, some up to 8 MB: every size class crosses the transport.
        size = rng.randrange(0, 4096) if rng.random() < 0.99 else rng.randrange(0, 8 << 20)
        start = rng.randrange(0, len(source) - size + 1)
        return source[start : start + size]

    def memory():
        """(private, shared) resident bytes: the heap, and arena pages this process touches."""
        libc.malloc_trim(0)  # the test's own freed payloads must not count
        fields = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024 if value.strip().endswith("kB") else 0
        return fields["RssAnon"], fields["RssShmem"]

    with gilfree.Pool(2) as pool:
        fds_before = rss_before = None
        for batch in range(100):
            items = [payload() for _ in range(1000)]
            for sent, got in zip(items, pool.map(f.echo, items, chunksize=50)):
                assert got == sent
            del items, sent, got
            if batch == 9:
                fds_before = len(os.listdir("/proc/self/fd"))
                heap_before, _ = memory()
        heap, shared = memory()
        assert len(os.listdir("/proc/self/fd")) == fds_before
        assert heap - heap_before < 32 << 20
        # The arena keeps some free pages warm, within a fixed bound.
        assert shared < 512 << 20


# ------------------------------------------------------------------ failures


def test_sigkill_fails_only_that_task_and_pool_continues():
    from gilfree.errors import oom_kill_counter

    oom_file, oom_before = oom_kill_counter()
    with gilfree.Pool(2) as pool:
        victim = pool.submit(f.sleep_then, 30)
        pid = busy_worker_pid(pool)
        others = [pool.submit(f.square, i) for i in range(10)]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(gilfree.WorkerCrashed) as info:
            victim.result(timeout=5)
        assert time.monotonic() - start < 1.0
        assert info.value.pid == pid and info.value.signal == signal.SIGKILL
        assert "SIGKILL" in str(info.value)
        # Unless the kernel's OOM killer killed something else meanwhile, memory is not blamed.
        if oom_file is None:
            assert info.value.oom_killed is None
        elif oom_kill_counter() == (oom_file, oom_before):
            assert info.value.oom_killed is False
            assert "not by the kernel's OOM killer" in str(info.value)
        assert [o.result() for o in others] == [i * i for i in range(10)]
        assert list(pool.map(f.square, range(1000), chunksize=1)) == [i * i for i in range(1000)]
        assert pool.stats()["restarts"] >= 1


def test_each_sigkilled_worker_takes_one_oom_kill_of_the_kernels_count(monkeypatch):
    # The kernel counted two OOM kills: two workers dying of SIGKILL both read "out of memory",
    # and a third, with no kill left to account for, does not.
    import gilfree.pool

    with gilfree.Pool(2) as pool:
        pool._oom_file, pool._oom_kills = "counted", 10
        monkeypatch.setattr(gilfree.pool, "read_oom_kills", lambda path: 12 if path == "counted" else None)
        crashes = []
        for _ in range(3):
            victim = pool.submit(f.sleep_then, 30)
            os.kill(busy_worker_pid(pool), signal.SIGKILL)
            with pytest.raises(gilfree.WorkerCrashed) as info:
                victim.result(timeout=30)
            crashes.append(info.value)
    assert [c.oom_killed for c in crashes] == [True, True, False]
    assert "out of memory" in str(crashes[1]) and "kill -9" in str(crashes[2])


def test_segfault_is_reported_and_pool_continues():
    with gilfree.Pool(2) as pool:
        with pytest.raises(gilfree.WorkerCrashed, match="SIGSEGV") as info:
            pool.submit(f.segfault).result(timeout=10)
        assert info.value.signal == signal.SIGSEGV
        with pytest.raises(gilfree.WorkerCrashed, match="exited with code 3"):
            pool.submit(f.exit_hard, 3).result(timeout=10)
        assert pool.submit(f.square, 5).result() == 25


def test_task_timeout_kills_and_replaces_worker():
    with gilfree.Pool(2, task_timeout=0.5) as pool:
        stuck = pool.submit(f.spin_forever)
        fine = pool.submit(f.sleep_then, 0.1, "ok")
        with pytest.raises(gilfree.TaskTimeout):
            stuck.result(timeout=10)
        assert isinstance(stuck.exception(), TimeoutError)
        assert fine.result() == "ok"
        assert list(pool.map(f.square, range(50))) == [i * i for i in range(50)]


def test_recycling_by_task_count_loses_nothing():
    with gilfree.Pool(2, max_tasks_per_worker=10) as pool:
        pids = list(pool.map(f.pid, range(200), chunksize=1))
        assert len(pids) == 200
        assert len(set(pids)) >= 200 // 10
        assert pool.stats()["restarts"] >= 10


def test_recycling_by_memory():
    with gilfree.Pool(1, max_memory_per_worker=200 << 20) as pool:
        first = pool.submit(f.grow_memory, 300).result()
        second = pool.submit(f.pid).result()
        assert first != second


def test_initializer_and_preload():
    with gilfree.Pool(2, initializer=f.init_marker, initargs=("ready",), preload=["json"]) as pool:
        assert set(pool.map(f.initialized, range(10))) == {"ready"}


def keep_shared(*objects):
    global SHARED
    SHARED = objects


def count_and_put(i):
    queue, counter, lock = SHARED
    with lock:
        counter.value += 1
    queue.put(i)
    return i


def test_a_managers_queue_value_and_lock_reach_workers_through_initargs():
    # The logging cookbook's QueueHandler pattern: the proxies must carry the manager's authkey.
    # Spawn: a forked manager would inherit this process's threads (the pools' waiters).
    with multiprocessing.get_context("spawn").Manager() as manager:
        queue, counter, lock = manager.Queue(), manager.Value("i", 0), manager.Lock()
        with gilfree.Pool(2, initializer=keep_shared, initargs=(queue, counter, lock)) as pool:
            assert list(pool.map(count_and_put, range(4), chunksize=1)) == [0, 1, 2, 3]
        assert counter.value == 4
        assert sorted(queue.get(timeout=10) for _ in range(4)) == [0, 1, 2, 3]


def put_into(queue, item):
    queue.put(item)
    return item


def test_a_managers_queue_reaches_workers_as_a_task_argument():
    # Workers connect with the parent's authkey, as a spawned child does (they had the template's).
    with multiprocessing.get_context("spawn").Manager() as manager:
        queue = manager.Queue()
        with gilfree.Pool(2) as pool:
            assert pool.submit(put_into, queue, 5).result(timeout=30) == 5
        assert queue.get(timeout=10) == 5


@pytest.mark.parametrize("make", [multiprocessing.Queue, multiprocessing.Lock, multiprocessing.Value])
def test_a_multiprocessing_queue_lock_or_value_in_initargs_is_refused_naming_the_fix(make):
    shared = make("i", 0) if make is multiprocessing.Value else make()
    with pytest.raises(TypeError, match=r"initargs\[1\] .*multiprocessing\.Manager\(\)"):
        gilfree.Pool(1, initializer=keep_shared, initargs=(1, shared))


def test_failing_initializer_breaks_pool_with_clear_error():
    with gilfree.Pool(1, initializer=f.failing_initializer) as pool:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool, match="initializer") as info:
            pool.submit(f.square, 2).result(timeout=30)
    # No worker ran the task ("exited with code 1 while running this task" before).
    assert re.search(r"last: worker \d+ exited with code 1 before its first task$", str(info.value)), info.value


def test_the_default_worker_count_follows_python_cpu_count_where_python_has_it():
    # ProcessPoolExecutor's default on 3.13+ is os.process_cpu_count(), which PYTHON_CPU_COUNT
    # and -X cpu_count override; a Pool took the affinity's CPUs whatever they said.
    code = "import gilfree\nwith gilfree.Pool() as pool: print(len(pool.stats()['workers']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHON_CPU_COUNT="1"))
    expected = 1 if hasattr(os, "process_cpu_count") else len(os.sched_getaffinity(0))
    assert out.stdout.strip() == str(expected), out.stderr


def test_a_failing_initializer_is_logged_on_the_concurrent_futures_logger(tmp_path):
    log = tmp_path / "workers.log"
    with gilfree.Pool(1, initializer=f.log_to_then_fail, initargs=(str(log),)) as pool:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            pool.submit(f.square, 2).result(timeout=60)
    text = log.read_text()
    assert text.startswith("Exception in initializer:") and "the initializer failed on purpose" in text


def test_an_initializer_capping_the_address_space_breaks_the_pool_naming_rlimit_as():
    # The worker maps the pool's shared memory after the initializer: it cannot under 2 GiB.
    with gilfree.Pool(1, initializer=f.limit_address_space, initargs=(2 << 30,)) as pool:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool) as info:
            pool.submit(f.square, 2).result(timeout=30)
    assert "RLIMIT_AS" in str(info.value) and "max_memory_per_worker" in str(info.value)
    assert "initializer's traceback" not in str(info.value)


def test_a_task_capping_its_address_space_gets_memoryerror_and_the_next_task_a_working_worker():
    # As in a ProcessPoolExecutor: the allocation past the cap raises MemoryError. The cap is
    # below the shared memory the worker maps, so it could allocate nothing more: it is
    # replaced, or a crash says why (when even its reply could not be made).
    with gilfree.Pool(1) as pool:
        with pytest.raises((MemoryError, gilfree.WorkerCrashed)) as info:
            pool.submit(f.allocate_under_address_limit, 1 << 30, 2 << 30).result(timeout=60)
        if isinstance(info.value, gilfree.WorkerCrashed):
            assert "RLIMIT_AS" in str(info.value)
        assert pool.submit(f.allocated, 64 << 20).result(timeout=60) == 64 << 20


def test_a_map_item_capping_its_address_space_leaves_the_next_map_a_working_worker():
    # The same in a map: the chunk's MemoryError went back, but the capped worker stayed and
    # failed every later allocation.
    with gilfree.Pool(1) as pool:
        with pytest.raises((MemoryError, gilfree.WorkerCrashed)):
            list(pool.map(f.allocate_under_address_limit, [1 << 30], [2 << 30]))
        assert list(pool.map(f.allocated, [64 << 20] * 3)) == [64 << 20] * 3


def test_a_task_leaving_its_worker_no_address_space_fails_naming_rlimit_as_and_the_pool_goes_on():
    with gilfree.Pool(1) as pool:
        with pytest.raises(gilfree.WorkerCrashed) as info:
            pool.submit(f.exhaust_address_space, 1 << 30).result(timeout=60)
        assert "RLIMIT_AS" in str(info.value) and "max_memory_per_worker" in str(info.value)
        assert pool.submit(f.square, 3).result(timeout=30) == 9


def test_workers_stdin_is_devnull_and_they_start_pools_of_their_own(tmp_path):
    stdin_file = tmp_path / "stdin"
    stdin_file.write_text("input")
    with open(stdin_file) as stdin:
        proc = run_script(
            """
            import os, gilfree, poolfuncs as f
            with gilfree.Pool(2) as pool:
                identities = set(pool.map(f.stdin_identity, range(200), chunksize=1))
                assert len({pid for pid in pool.map(f.pid, range(200), chunksize=1)}) == 2
                devnull = os.stat(os.devnull)
                assert identities == {(devnull.st_dev, devnull.st_ino)}, identities
                assert pool.submit(f.nested_pool_sum, 100).result(timeout=60) == sum(x * x for x in range(100))
            print("ok")
            """,
            stdin=stdin,
        )
        out, err = proc.communicate(timeout=120)
    assert out.strip() == "ok", err
    assert "Traceback" not in err, err


def test_a_thousand_workers_and_the_upper_bound():
    from gilfree import _engine

    # More spawn requests and answers than the control socket holds: in a subprocess, so that
    # a deadlock fails the test instead of hanging the suite.
    proc = run_script(
        """
        import gilfree, poolfuncs as f
        with gilfree.Pool(1000) as pool:
            assert sum(pool.map(f.square, range(3000), chunksize=1)) == sum(x * x for x in range(3000))
            assert len(pool.stats()["workers"]) == 1000
        print("ok")
        """
    )
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "ok", err
    with pytest.raises(ValueError, match=str(_engine.MAX_WORKERS)):
        gilfree.Pool(_engine.MAX_WORKERS + 1)


def test_stats_shape(pool):
    pool.submit(f.square, 2).result()
    stats = pool.stats()
    assert len(stats["workers"]) == 2
    for w in stats["workers"]:
        assert {"pid", "tasks", "busy_s", "idle_s", "bytes_in", "bytes_out", "restarts"} <= set(w)
    assert stats["tasks"] == sum(w["tasks"] for w in stats["workers"]) > 0


# ------------------------------------------------------------------ processes and signals


def test_parent_sigkilled_takes_workers_and_shm_along():
    proc = run_script(
        """
        import sys, time, gilfree, poolfuncs
        pool = gilfree.Pool(2)
        pool.submit(poolfuncs.square, 2).result()
        print(pool._engine.template_pid, *[w["pid"] for w in pool.stats()["workers"]], flush=True)
        time.sleep(60)
        """
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3 and all(alive(p) for p in pids)
    for pid in [proc.pid, *pids]:
        with open(f"/proc/{pid}/maps") as maps:
            mapped = maps.read()
        # The shared memory is an anonymous memfd: it can never outlive its last process.
        assert "/dev/shm/" not in mapped
        assert pid == pids[0] or "memfd:gilfree" in mapped
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 2.0
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(p) for p in pids), [proc_status(p) for p in pids]


def proc_status(pid):
    """pid's state and parent, for a failure message."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return pid, [line.strip() for line in status if line.startswith(("State", "PPid", "SigPnd", "ShdPnd"))]
    except FileNotFoundError:
        return pid, "gone"


def test_ctrl_c_in_a_map_cancels_what_no_worker_took_before_killing_a_worker(monkeypatch):
    """Ctrl-C in an ordered map stops its chunks in flight at once: each one no worker has taken
    is cancelled before the worker of the one it waited for is killed. Killing first let the
    replacement worker take the next chunk, and be killed for it in turn (1 Ctrl-C in 5)."""
    import _thread

    events = []
    with gilfree.Pool(1) as pool:
        results = pool.map(f.sleep_then, [30] * 4, chunksize=1)
        while pool.stats()["running"] < 1:
            time.sleep(0.01)
        engine, cancel = pool._engine, pool._cancel

        class RecordingEngine:
            def __getattr__(self, name):
                return getattr(engine, name)

            def kill_task(self, task_id):
                events.append("kill")
                return engine.kill_task(task_id)

        def recording_cancel(future):
            events.append("cancel")
            return cancel(future)

        monkeypatch.setattr(pool, "_engine", RecordingEngine())
        monkeypatch.setattr(pool, "_cancel", recording_cancel)
        threading.Timer(0.2, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            next(results)
        monkeypatch.undo()
        # Then the map's own cleanup tries the head again, killed but not yet reported dead.
        assert events.count("kill") == 1 and events.index("kill") == 4, events
        assert pool.submit(pow, 2, 5).result(timeout=30) == 32
        assert pool.stats()["restarts"] == 1


CTRL_C_GOES_ON = """
    import concurrent.futures, json, time, gilfree, poolfuncs
    pool = gilfree.Pool(2)
    background = pool.submit(poolfuncs.sleep_then, 1.5, "background")
    long = None
    waited = {begin}
    while pool.stats()["running"] < 2:  # the background task and one waited for
        time.sleep(0.01)
    print("ready", flush=True)
    try:
        {wait}
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    outcome = None
    if long is not None:
        try:
            long.result(timeout=10)
        except concurrent.futures.CancelledError as exc:
            outcome = str(exc)
    print(json.dumps({{
        "outcome": outcome,
        "background": background.result(timeout=10),
        "after": pool.submit(pow, 2, 5).result(timeout=10),
        "restarts": pool.stats()["restarts"],
        "pids": [pool._engine.template_pid] + [w["pid"] for w in pool.stats()["workers"]],
    }}), flush=True)
"""


@pytest.mark.parametrize("begin, wait", [
    ("pool.map(poolfuncs.sleep_then, [30] * 8, chunksize=1)", "list(waited)"),
    ("long = pool.submit(poolfuncs.sleep_then, 30)", "long.result()"),
])
def test_ctrl_c_stops_the_tasks_waited_for_and_the_pool_goes_on(begin, wait):
    # Ctrl-C while waiting stops those tasks only: the busy worker is killed and replaced, the
    # rest of the map is cancelled; other tasks and the pool go on (it was shut down: 'cannot
    # schedule new futures after shutdown', and the other tasks were cancelled). The program
    # ending leaves no process behind.
    proc = run_script(CTRL_C_GOES_ON.format(begin=begin, wait=wait))
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    assert proc.stdout.readline().strip() == "interrupted"
    assert time.monotonic() - start < 1.0
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["background"] == "background" and result["after"] == 32, result
    assert result["restarts"] == 1, result
    if "submit" in begin:
        assert result["outcome"].startswith("stopped by Ctrl-C: worker "), result
    deadline = time.monotonic() + 5.0
    while any(alive(p) for p in result["pids"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(p) for p in result["pids"]), [proc_status(p) for p in result["pids"]]


def test_ctrl_c_during_result_raises_quickly():
    proc = run_script(
        """
        import gilfree, poolfuncs
        with gilfree.Pool(1) as pool:
            print("ready", flush=True)
            pool.submit(poolfuncs.sleep_then, 30).result()
        """
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - start < 1.0
    assert "KeyboardInterrupt" in err


def test_keyboard_interrupt_raised_by_a_task_does_not_stop_the_pool():
    with gilfree.Pool(2) as pool:
        with pytest.raises(KeyboardInterrupt, match="raised by the task"):
            pool.submit(f.raise_keyboard_interrupt).result(timeout=10)
        with pytest.raises(KeyboardInterrupt, match="raised by the task"):
            list(pool.map(f.raise_keyboard_interrupt, range(4)))
        assert pool.submit(f.square, 3).result(timeout=10) == 9
        assert list(pool.map(f.square, range(4))) == [0, 1, 4, 9]
        assert pool.stats()["restarts"] == 0


def test_template_death_breaks_pool_instead_of_hanging():
    pool = gilfree.Pool(2)
    running = pool.submit(f.sleep_then, 30)
    busy_worker_pid(pool)
    os.kill(pool._engine.template_pid, signal.SIGKILL)
    with pytest.raises(concurrent.futures.process.BrokenProcessPool, match="template"):
        running.result(timeout=5)
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
        pool.submit(f.square, 2)
    pool.shutdown()


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr", [_FakeTerminal, io.StringIO], ids=["terminal", "redirected"])
def test_progress_without_tqdm_says_what_to_install(pool, monkeypatch, stderr):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    monkeypatch.setattr(sys, "stderr", stderr())
    with pytest.raises(ImportError, match=re.escape("pip install 'gilfree[progress]'")):
        pool.map(f.square, range(3), progress=True)
    with pytest.raises(ImportError, match=re.escape("pip install 'gilfree[progress]'")):
        pool.starmap(f.add, [(1, 2)], progress=True)


def test_progress_bar_drawn_in_a_jupyter_kernel(pool, monkeypatch):
    # A notebook's stderr is not a terminal, and progress=True showed nothing there.
    import types

    class ZMQInteractiveShell:  # the kernel's shell, as IPython.get_ipython() returns it
        pass

    def widget_bar(*args, **kwargs):  # tqdm.notebook's without ipywidgets
        raise ImportError("IProgress not found. Please update jupyter and ipywidgets.")

    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=ZMQInteractiveShell))
    monkeypatch.setitem(sys.modules, "tqdm.notebook", types.SimpleNamespace(tqdm=widget_bar))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert list(pool.map(f.square, range(50), progress=True)) == [x * x for x in range(50)]
    assert "50/50" in sys.stderr.getvalue()


def test_progress_bar_drawn_with_tqdm():
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *sys.path]))
    code = textwrap.dedent(
        """
        import gilfree, poolfuncs
        with gilfree.Pool(2) as pool:
            assert list(pool.map(poolfuncs.square, range(300), progress=True)) == [
                x * x for x in range(300)]
        print("done")
        """
    )
    drawn = []

    def read_terminal():
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=follower, env=env)
    out, _ = proc.communicate(timeout=60)
    os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    drawn = b"".join(drawn)
    assert out.strip() == b"done"
    assert b"300/300" in drawn


def test_share_handle_travels_without_copying_the_data(pool):
    data = os.urandom(8 << 20)
    handle = pool.share(data)
    assert pool.submit(f.nbytes_and_type, handle).result() == ("memoryview", 8 << 20, data[:4])
    first, first_refs = pool._codec.dumps(((handle,), {}))
    second, second_refs = pool._codec.dumps(((handle,), {}))
    try:
        # A small message referencing the same arena block each time: the data is not copied.
        assert len(first) < 4096 and len(second) < 4096
        assert len(first_refs) == len(second_refs) == 1
        assert first_refs[0][0] == second_refs[0][0] and first_refs[0][2] == 8 << 20
    finally:
        pool._codec.release(first_refs + second_refs)


def test_stats_survive_shutdown():
    pool = gilfree.Pool(1)
    assert list(pool.map(f.square, range(5), chunksize=1)) == [0, 1, 4, 9, 16]
    pool.shutdown()
    stats = pool.stats()
    assert stats["tasks"] >= 5 and len(stats["workers"]) == 1


def run_to_end(code, timeout=60):
    """Runs a script; returns (returncode, stdout, stderr). A hang fails the test."""
    proc = run_script(code)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the script hung\nstdout: {out}\nstderr: {err}")
    return proc.returncode, out, err


def test_shutdown_from_a_done_callback_ends_the_waiter_thread():
    # Callbacks run on the pool's waiter thread: it must not join itself, spin, or crash when
    # the pool is freed afterwards.
    rc, out, err = run_to_end("""
        import gc, os, threading, time
        import gilfree, poolfuncs as f
        for wait in (False, True):
            pool = gilfree.Pool(2)
            done = threading.Event()
            def on_done(fut, pool=pool, wait=wait):
                pool.shutdown(wait=wait)
                done.set()
            pool.submit(f.square, 3).add_done_callback(on_done)
            assert done.wait(10)
            deadline = time.monotonic() + 10
            while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            print("threads", len(os.listdir("/proc/self/task")))
            del pool, on_done
            gc.collect()
        print("survived")
    """)
    assert rc == 0, err
    assert out.split() == ["threads", "1", "threads", "1", "survived"]


def test_pool_dropped_inside_a_callback_is_freed_safely():
    rc, out, err = run_to_end("""
        import os, threading, time, weakref
        import gilfree, poolfuncs as f
        pool = gilfree.Pool(1)
        ref = weakref.ref(pool)
        template = pool._engine.template_pid
        in_callback = threading.Event()

        def slow_callback(fut):
            in_callback.set()
            time.sleep(0.3)

        pool.submit(f.square, 2).add_done_callback(slow_callback)
        in_callback.wait(10)
        del pool  # the last reference goes on the waiter thread, inside the callback
        time.sleep(1.0)  # the waiter goes on after the callback
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{template}") and time.monotonic() < deadline:
            time.sleep(0.01)
        print(ref() is None, os.path.exists(f"/proc/{template}"), len(os.listdir("/proc/self/task")))
    """)
    assert rc == 0, err
    assert out.split() == ["True", "False", "1"]


def test_futures_of_a_dropped_pool_complete_and_an_idle_dropped_pool_ends():
    rc, out, err = run_to_end("""
        import gc, os, threading, time, weakref
        import gilfree, poolfuncs as f
        print(gilfree.Pool(2).submit(f.square, 3).result(timeout=20))
        called = threading.Event()
        gilfree.Pool(1).submit(f.sleep_then, 0.2, 7).add_done_callback(lambda fut: called.set())
        gc.collect()
        print(called.wait(20))
        pool = gilfree.Pool(1)
        template = pool._engine.template_pid
        ref = weakref.ref(pool)
        del pool
        gc.collect()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{template}") and time.monotonic() < deadline:
            time.sleep(0.01)
        print(ref() is None, os.path.exists(f"/proc/{template}"))
    """)
    assert rc == 0, err
    assert out.split() == ["9", "True", "True", "False"]


def test_a_forked_child_leaves_the_parents_pool_working():
    rc, out, err = run_to_end("""
        import multiprocessing, os, sys
        import gilfree, poolfuncs as f
        pool = gilfree.Pool(2)
        print(pool.submit(f.square, 2).result())
        pid = os.fork()
        if pid == 0:
            try:
                pool.submit(f.square, 1)
            except Exception as exc:
                print("child", type(exc).__name__, flush=True)
            sys.exit(0)  # runs the child's atexit: it must not stop the parent's pool
        os.waitpid(pid, 0)
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=print, args=("mp child",))
        child.start()
        child.join()
        print(pool.submit(f.square, 3).result(timeout=10))
        pool.shutdown()
        print("shut down")
    """)
    assert rc == 0, err
    assert out.split("\n")[:-1] == ["4", "child BrokenPool", "mp child", "9", "shut down"]


def test_cancelled_futures_wake_wait_and_as_completed():
    with gilfree.Pool(1) as pool:
        blocker = pool.submit(f.sleep_then, 0.3)
        time.sleep(0.05)
        queued = [pool.submit(f.square, i) for i in range(10)]
        assert queued[-1].cancel()
        done, not_done = concurrent.futures.wait([queued[-1]], timeout=5)
        assert done == {queued[-1]} and not not_done
        assert list(concurrent.futures.as_completed([queued[-1]], timeout=5)) == [queued[-1]]
        blocker.result()


def test_shutdown_without_wait_lets_submitted_tasks_finish():
    pool = gilfree.Pool(2)
    futures = [pool.submit(f.sleep_then, 0.2, i) for i in range(4)]
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        pool.submit(f.square, 1)
    assert [fut.result(timeout=10) for fut in futures] == [0, 1, 2, 3]


def test_map_can_be_read_after_the_pool_shut_down():
    with gilfree.Pool(2) as pool:
        results = pool.map(f.square, range(1000))
        unordered = pool.map(f.square, range(100), ordered=False, chunksize=7)
    assert list(results) == [i * i for i in range(1000)]
    assert sorted(unordered) == [i * i for i in range(100)]

    pool = gilfree.Pool(1)
    stopped = pool.map(f.sleep_then, [0.05] * 200, chunksize=1)
    pool.shutdown(cancel_futures=True)
    with pytest.raises(concurrent.futures.CancelledError):
        list(stopped)  # never a silently shortened sequence


def test_submit_racing_shutdown_raises_only_runtime_error():
    errors = set()

    def submit_until_refused(pool):
        try:
            while True:
                pool.submit(f.square, 2)
        except Exception as exc:
            errors.add(type(exc))

    for _ in range(20):
        pool = gilfree.Pool(2)
        threads = [threading.Thread(target=submit_until_refused, args=(pool,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        pool.shutdown(wait=False)
        for thread in threads:
            thread.join()
    assert errors == {RuntimeError}


def test_task_timeout_applies_to_each_map_item():
    # Fast items grow the chunks; no single item comes near the timeout, whole chunks do.
    with gilfree.Pool(2, task_timeout=0.5) as pool:
        assert list(pool.map(f.sleep_if_slow, range(620))) == list(range(620))


def test_recycling_counts_the_items_of_map_chunks():
    with gilfree.Pool(2, max_tasks_per_worker=10) as pool:
        pids = list(pool.map(f.pid, range(200)))  # chunks sized by the pool
        # A chunk is not split: the one that reaches the count may take a worker past it.
        assert max(collections.Counter(pids).values()) < 2 * 10


def test_recycling_by_memory_ignores_shared_results_the_parent_holds():
    with gilfree.Pool(1, max_memory_per_worker=200 << 20) as pool:
        kept = [pool.submit(f.allocate_shared_result, 50).result() for _ in range(8)]
        assert len({pid for _, pid in kept}) == 1
        assert pool.stats()["restarts"] == 0


@pytest.mark.parametrize("fn", [len, f.boom_quietly])
def test_a_finished_task_keeps_no_hold_on_its_arguments_shared_memory(fn):
    # A worker let go of a task's arguments only when its next task came: an idle pool kept the
    # last large argument in shared memory, the next argument of that size took a second block,
    # and shutdown() could not give either back. Also when the task raised.
    pool = gilfree.Pool(1)
    memfd = os.dup(pool._engine.child_fds()[0])
    try:
        def resident():
            return os.fstat(memfd).st_blocks * 512

        assert pool.submit(len, b"x").result(timeout=60) == 1
        before = resident()
        data = bytes(32 << 20)  # out-of-band: a block of the arena
        for _ in range(3):
            error = pool.submit(fn, data).exception(timeout=60)
            assert (error is None) == (fn is len), error
            assert resident() - before < 40 << 20  # one block, used again each time
        pool.shutdown()
        assert resident() - before < 1 << 20
    finally:
        pool.shutdown()
        os.close(memfd)


NOT_PYTHON = """
import multiprocessing, sys, gilfree
real, sys.executable = sys.executable, sys.argv[1]  # as under uWSGI: its own binary
if sys.argv[2] == "set_executable":
    multiprocessing.set_executable(real)
try:
    with gilfree.Pool(1) as pool:
        print(pool.submit(pow, 2, 10).result(timeout=30))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("executable, how, expected", [
    ("/bin/false", "set_executable", "1024"),
    ("/bin/false", "-", "BrokenPool the pool's template process exited with code 1 before it started a worker (it "
                        "ran /bin/false). The workers run sys.executable; where that is not a Python interpreter"),
    ("/no/such/python", "-", "FileNotFoundError [Errno 2] cannot start the pool's template process: /no/such/python: "
                             "No such file or directory. The workers run sys.executable"),
])
def test_workers_run_multiprocessing_set_executable_where_sys_executable_is_not_python(executable, how, expected):
    # uWSGI's sys.executable is its own binary: every pool broke ("the pool's template process
    # died", or a bare FileNotFoundError), and multiprocessing.set_executable() was not heard.
    out = subprocess.run([sys.executable, "-c", NOT_PYTHON, executable, how], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *sys.path])))
    assert out.stdout.startswith(expected), out.stdout + out.stderr
    assert "set_executable" in out.stdout or how == "set_executable"


def test_a_preload_that_fails_breaks_the_pool_without_blaming_the_interpreter():
    # Its traceback goes to stderr; the pool's error said to set another executable.
    out = subprocess.run(
        [sys.executable, "-c", "import gilfree\ntry:\n    gilfree.Pool(1, preload=['no_such_module_here']).submit(len, '').result(30)\n"
                               "except Exception as exc:\n    print(type(exc).__name__, exc)"],
        capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("BrokenPool the pool's template process exited with code 1 before it started a worker"), out
    assert "set_executable" not in out.stdout and "no_such_module_here" in out.stderr


def test_tasks_do_not_wait_behind_a_worker_whose_initializer_hangs(tmp_path):
    # Tasks handed to a starting worker moved to an idle one only from behind a running task:
    # one stayed behind a hanging initializer for ever, another worker idling.
    with gilfree.Pool(2, initializer=f.hang_if_first, initargs=(str(tmp_path / "first"),)) as pool:
        futures = [pool.submit(f.square, i) for i in range(20)]
        assert [future.result(timeout=30) for future in futures] == [i * i for i in range(20)]


def test_idle_time_counts_the_earlier_workers_of_a_slot():
    with gilfree.Pool(1) as pool:
        pool.submit(f.sleep_then, 0.3).result()
        time.sleep(0.3)
        with pytest.raises(gilfree.WorkerCrashed):
            pool.submit(f.exit_hard, 3).result()
        assert pool.submit(f.square, 2).result() == 4  # the replacement runs
        worker = pool.stats()["workers"][0]
        assert worker["restarts"] == 1
        assert worker["busy_s"] >= 0.3 and worker["idle_s"] >= 0.2


@pytest.mark.parametrize(
    "arr",
    [
        np.array(3.5),
        np.zeros((0, 3)),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        np.array(["2026-11-22", "2026-01-01"], dtype="datetime64[D]"),
        np.asfortranarray(np.arange(12).reshape(3, 4)),
    ],
    ids=["0-d", "empty", "structured", "datetime", "fortran"],
)
def test_share_keeps_dtype_shape_and_values(pool, arr):
    dtype, shape, values = pool.submit(f.shared_array, pool.share(arr)).result()
    assert (dtype, shape, values) == (arr.dtype, arr.shape, arr.tolist())


def test_share_refuses_what_it_cannot_place_faithfully(pool):
    with pytest.raises(TypeError, match="MaskedArray"):
        pool.share(np.ma.masked_array([1, 2], mask=[0, 1]))
    with pytest.raises(TypeError, match="dtype=object"):
        pool.share(np.array([object()]))
    # Not a buffer (a DataFrame, a list): said so, with what to share instead ("memoryview: a
    # bytes-like object is required" before).
    with pytest.raises(TypeError, match=r"share\(\) takes a buffer .* not list: share a pandas object's array"):
        pool.share([1, 2, 3])


def test_a_share_handle_shows_its_size_and_kind(pool):
    assert repr(pool.share(np.zeros((2, 3)))) == "<gilfree.SharedHandle 48 bytes: numpy float64 (2, 3)>"
    assert repr(pool.share(b"x" * 2000)) == "<gilfree.SharedHandle 2,000 bytes: bytes>"


def test_arguments_are_checked_when_the_pool_is_made(pool):
    for bad in ({"max_tasks_per_worker": 0}, {"max_tasks_per_worker": -1}, {"max_memory_per_worker": 0}):
        with pytest.raises(ValueError):
            gilfree.Pool(1, **bad)
    for bad in ({"max_tasks_per_worker": "3"}, {"max_memory_per_worker": "1GB"}, {"initializer": 5}):
        with pytest.raises(TypeError):
            gilfree.Pool(1, **bad)
    with pytest.raises(TypeError):
        pool.map(f.square, range(3), chunksize=2.5)


def test_process_pool_executor_arguments_are_accepted():
    # ProcessPoolExecutor(max_workers, mp_context, initializer, initargs, *, max_tasks_per_child)
    with gilfree.Pool(1, None, f.init_marker, ("ready",)) as pool:
        assert pool.submit(f.initialized).result(timeout=30) == "ready"
    for method in ("spawn", "forkserver"):
        with gilfree.Pool(1, mp_context=multiprocessing.get_context(method)) as pool:
            assert pool.submit(f.square, 3).result(timeout=30) == 9
    with gilfree.Pool(1, max_tasks_per_child=2) as pool:
        pids = [pool.submit(f.pid).result(timeout=30) for _ in range(4)]
        assert pids[0] == pids[1] != pids[2] == pids[3]


def test_a_bad_max_tasks_per_child_is_named_as_passed():
    with pytest.raises(ValueError, match="^max_tasks_per_child must be at least 1"):
        gilfree.Pool(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="^max_tasks_per_worker must be at least 1"):
        gilfree.Pool(1, max_tasks_per_worker=0)


def test_map_without_iterables_yields_nothing_as_executor_map(pool):
    assert list(pool.map(f.square)) == []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        assert list(executor.map(f.square)) == []


def test_process_pool_executor_arguments_gilfree_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="never forks .* mp_context=None"):
        gilfree.Pool(1, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match="alias"):
        gilfree.Pool(1, max_tasks_per_child=2, max_tasks_per_worker=2)
    with pytest.raises(TypeError, match="mp_context"):
        gilfree.Pool(1, "spawn")


def test_help_shows_the_pools_own_signature_and_documentation():
    parameters = inspect.signature(gilfree.Pool).parameters
    assert list(parameters)[:4] == ["max_workers", "mp_context", "initializer", "initargs"]
    assert {"max_tasks_per_child", "task_timeout", "max_tasks_per_worker", "max_memory_per_worker",
            "preload", "cluster"} <= parameters.keys()
    for name in ("max_workers", "task_timeout", "preload", "cluster"):
        assert name in gilfree.Pool.__doc__
    for option in ("chunksize", "ordered", "timeout", "progress"):
        assert option in gilfree.Pool.map.__doc__
    for method in ("submit", "map", "starmap", "shutdown", "run", "amap"):
        # Its own, not concurrent.futures.Executor's.
        assert getattr(gilfree.Pool, method).__doc__ != getattr(concurrent.futures.Executor, method, None).__doc__


def test_initargs_of_any_size():
    blob = os.urandom(4 << 20)  # far over the 128 KiB a single command-line argument may have
    with gilfree.Pool(1, initializer=f.init_marker, initargs=(blob,)) as pool:
        assert pool.submit(f.initialized).result() == blob


def test_pool_under_an_address_space_limit():
    rc, out, err = run_to_end("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
        import gilfree, poolfuncs as f
        with gilfree.Pool(2) as pool:
            print(sum(pool.map(f.square, range(100))), len(pool.submit(f.echo, bytes(200 << 20)).result()))
    """)
    assert rc == 0, err
    assert out.split() == [str(sum(x * x for x in range(100))), str(200 << 20)]


def test_import_hooks_installed_at_start_up_reach_workers(tmp_path):
    # What an editable install's .pth file does: a finder installed while site runs.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import importlib.abc, importlib.util, sys

        class Virtual(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                return importlib.util.spec_from_loader(name, self) if name == "virtualmod" else None
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                module.VALUE = 42

        sys.meta_path.append(Virtual())
    """))
    proc = subprocess.run(
        [sys.executable, "-c", "import gilfree, poolfuncs as f\n"
         "with gilfree.Pool(1) as pool: print(pool.submit(f.worker_imports, 'virtualmod').result())"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), HERE, *sys.path])),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.split() == ["42"], proc.stderr


def test_short_tasks_do_not_wait_behind_a_long_one():
    with gilfree.Pool(2) as pool:
        list(pool.map(f.square, range(2000), chunksize=1))  # microsecond tasks: rings run deep
        for _ in range(2):
            long = pool.submit(f.sleep_then, 2.0)
            short = [pool.submit(f.square, i) for i in range(300)]
            done, _ = concurrent.futures.wait(short, timeout=60)
            assert len(done) == 300 and not long.done()
            long.result()


# ------------------------------------------------------------------ maps, shutdown and signals


def test_shutdown_leaves_an_unfinished_map_over_an_endless_input_readable():
    # The map goes on reading its input lazily after shutdown: shutdown neither submits an
    # endless input nor waits for it, and the pool ends once the map is dropped (or at exit).
    rc, out, err = run_to_end("""
        import itertools, os, time
        import gilfree, poolfuncs as f

        def numbers():
            for i in itertools.count():
                if i > 10**6:
                    os._exit(3)  # read far beyond what the reader asked for
                yield i

        with gilfree.Pool(2) as pool:
            template = pool._engine.template_pid
            results = pool.map(f.square, numbers())
            for value in results:
                if value > 100:
                    break
        print("shut down")
        print(next(results), sum(itertools.islice(results, 1000)) == sum(i * i for i in range(13, 1013)))
        del results
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{template}") and time.monotonic() < deadline:
            time.sleep(0.01)
        print("ended", not os.path.exists(f"/proc/{template}"))

        pool = gilfree.Pool(1)
        kept = pool.map(f.square, numbers())  # still referenced at exit, never read again
        print(next(kept))
        pool.shutdown()
        print("exiting")
    """)
    assert rc == 0, err
    assert out.split("\n")[:-1] == ["shut down", "144 True", "ended True", "0", "exiting"]


def test_map_read_after_shutdown_reads_its_generator_to_the_end():
    with gilfree.Pool(2) as pool:
        results = pool.map(f.square, (i for i in range(20000)))
        assert next(results) == 0
    assert list(results) == [i * i for i in range(1, 20000)]
    with pytest.raises(RuntimeError):
        pool.map(f.square, range(3))


def test_shutdown_from_another_thread_while_a_map_reads_a_generator():
    pool = gilfree.Pool(2)
    template = pool._engine.template_pid

    inside = threading.Event()

    def numbers():
        for i in range(1500):
            if i == 300:
                inside.set()
                time.sleep(0.5)  # the reader is in the generator while shutdown runs
            yield i

    got, errors = [], []

    def read():
        try:
            for value in pool.map(f.square, numbers()):
                got.append(value)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert inside.wait(30)
    pool.shutdown(wait=True)
    reader.join(60)
    assert not reader.is_alive() and not errors
    assert got == [i * i for i in range(1500)]
    deadline = time.monotonic() + 20
    while alive(template) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(template)


def test_map_yields_every_result_before_its_input_fails(pool):
    def numbers():
        yield from range(5000)
        raise f.Boom("the input broke")

    for ordered in (True, False):
        got = []
        with pytest.raises(f.Boom, match="the input broke"):
            for value in pool.map(f.square, numbers(), ordered=ordered):
                got.append(value)
        assert sorted(got) == [i * i for i in range(5000)]

    async def read_amap():
        got = []
        with pytest.raises(f.Boom, match="the input broke"):
            async for value in pool.amap(f.square, numbers()):
                got.append(value)
        return got

    assert asyncio.run(read_amap()) == [i * i for i in range(5000)]


def test_a_signal_handler_raising_while_results_are_collected_loses_no_result():
    # The "signal.alarm timeout" idiom: the handler's exception reaches the caller, and every
    # future still completes with its own result.
    rc, out, err = run_to_end("""
        import os, signal
        import gilfree, poolfuncs as f

        class Tick(Exception):
            pass

        armed = False

        def handler(signum, frame):
            global armed
            if armed:
                armed = False
                raise Tick()

        signal.signal(signal.SIGALRM, handler)
        pool = gilfree.Pool(2)
        futures = [pool.submit(f.echo, i) for i in range(20000)]
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        ticks = 0
        for i, future in enumerate(futures):
            while True:
                armed = True
                try:
                    value = future.result(timeout=10)
                except Tick:
                    ticks += 1
                    continue
                except RuntimeError as exc:
                    if "un-acquired lock" in str(exc):
                        continue  # CPython's Condition.wait interrupted: not the pool's doing
                    print("failed", i, exc, flush=True)
                    os._exit(1)
                except TimeoutError:
                    print("never completed", i, flush=True)
                    os._exit(1)
                finally:
                    armed = False
                if value != i:
                    print("wrong result", i, value, flush=True)
                    os._exit(1)
                break
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        pool.shutdown()
        print("ok", ticks > 0)
    """, timeout=180)
    assert rc == 0 and out.split() == ["ok", "True"], out + err


def test_a_callback_raising_base_exception_loses_no_other_future():
    rc, out, err = run_to_end("""
        import concurrent.futures
        import gilfree, poolfuncs as f

        def exits(future):
            raise SystemExit("from a done-callback")

        pool = gilfree.Pool(2)
        list(pool.map(f.square, range(3000), chunksize=1))  # rings run deep: results in batches
        futures = [pool.submit(f.square, i) for i in range(3000)]
        for future in futures[::7]:
            try:
                future.add_done_callback(exits)
            except SystemExit:
                pass  # it was done already: the callback ran here
        done, not_done = concurrent.futures.wait(futures, timeout=30)
        print(len(not_done))
        print(not not_done and [fut.result() for fut in futures] == [i * i for i in range(3000)])
        pool.shutdown()
    """)
    assert rc == 0, err
    assert out.split() == ["0", "True"], out + err


def test_stats_count_as_running_the_tasks_workers_run(tmp_path):
    gate = tmp_path / "go"

    def blocked(i):
        while not os.path.exists(gate):
            time.sleep(0.005)
        return i

    with gilfree.Pool(2) as pool:
        list(pool.map(f.square, range(2000), chunksize=1))  # microsecond tasks: rings run deep
        futures = [pool.submit(blocked, i) for i in range(6)]
        try:
            deadline = time.monotonic() + 30
            while pool.stats()["busy_workers"] < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            stats = pool.stats()
        finally:
            gate.touch()
        assert stats["running"] == stats["busy_workers"] == 2
        assert stats["queued"] == 4  # in the parent's queue or behind a running task in a ring
        assert [future.result(timeout=30) for future in futures] == list(range(6))
        stats = pool.stats()
        assert stats["running"] == stats["queued"] == 0


# ------------------------------------------------------------------ asyncio: Ctrl-C, async with, amap

ASYNCIO_CTRL_C = """
    import asyncio, gilfree, poolfuncs
    MODE = {mode!r}

    async def ready(pool):
        while pool.stats()["running"] < 2:
            await asyncio.sleep(0.01)
        pids = [w["pid"] for w in pool.stats()["workers"]] + [pool._engine.template_pid]
        print("ready", *pids, flush=True)

    async def tasks(pool):
        waiting = asyncio.gather(*[pool.run(poolfuncs.sleep_then, 30) for _ in range(4)])
        await ready(pool)
        await waiting

    async def items(pool):
        async def read():
            async for _ in pool.amap(poolfuncs.sleep_then, [30] * 6, chunksize=1):
                pass
        reading = asyncio.ensure_future(read())
        await ready(pool)
        await reading

    async def main():
        pool = gilfree.Pool(2)
        if MODE == "with":
            with pool:
                await tasks(pool)
        elif MODE == "async with":
            async with pool:
                await tasks(pool)
        elif MODE == "amap":
            with pool:
                await items(pool)
        else:  # never closed
            await tasks(pool)

    asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["with", "async with", "amap", "never closed"])
def test_ctrl_c_under_asyncio_run_exits_at_once_and_leaves_no_processes(mode):
    # asyncio.run turns Ctrl-C into cancelling its main task, then raises KeyboardInterrupt:
    # the pool's block must not wait for the 30 s tasks, nor must the exit.
    proc = run_script(ASYNCIO_CTRL_C.format(mode=mode))
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], proc.communicate()[1]
    pids = [int(pid) for pid in line[1:]]
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)  # half the tasks' time
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running 15 s after Ctrl-C\n{err}")
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 2.0
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(p) for p in pids), [proc_status(p) for p in pids]


def test_async_with_waits_for_the_tasks_without_blocking_the_loop():
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        async with gilfree.Pool(1) as pool:
            assert isinstance(pool, gilfree.Pool)
            future = pool.submit(f.sleep_then, 0.5, "done")
            before = ticks
        during = ticks - before
        ticker.cancel()
        return pool, future, during

    pool, future, during = asyncio.run(main())
    assert future.done() and future.result() == "done"  # __aexit__ waited for it
    assert during >= 2  # while the loop ran other tasks
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(f.square, 2)


@pytest.mark.parametrize("block", ["with", "async with", "async with, cancelled in its exit"])
def test_leaving_a_pool_block_on_cancellation_does_not_wait_for_running_tasks(block):
    pool = gilfree.Pool(1)
    queued = []

    async def use():
        if block == "with":
            with pool:
                running = pool.run(f.sleep_then, 10)
                queued.append(pool.submit(f.square, 3))
                await running
        elif block == "async with":
            async with pool:
                running = pool.run(f.sleep_then, 10)
                queued.append(pool.submit(f.square, 3))
                await running
        else:  # the block ends, and its __aexit__ waits for the task when the timeout comes
            async with pool:
                pool.submit(f.sleep_then, 10)
                queued.append(pool.submit(f.square, 3))

    async def main():
        async with asyncio.timeout(0.5):
            await use()

    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            asyncio.run(main())
        assert time.monotonic() - start < 5  # well before the 10 s task would end
        assert queued[0].cancelled()  # no worker had started it
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(f.square, 2)
    finally:
        pool._interrupted()  # not the test's subject: the 10 s task need not finish


def test_amap_ended_by_an_error_leaves_no_unretrieved_future_exception():
    async def main():
        reported = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        pool = gilfree.Pool(2)
        try:
            # Both workers die: item 1's crash ends the amap, item 2's chunk is running.
            with pytest.raises(gilfree.WorkerCrashed):
                async for _ in pool.amap(f.exit_hard, [1, 2, 3], chunksize=1):
                    pass
            while pool.stats()["running"] or pool.stats()["queued"]:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)  # the wrapped futures' outcomes reach the loop
            gc.collect()
        finally:
            pool.shutdown()
        return reported

    reported = asyncio.run(main())
    assert not reported, [context.get("message") for context in reported]


def test_a_forked_childs_map_and_starmap_raise_broken_pool_naming_the_parent():
    rc, out, err = run_to_end("""
        import os
        import gilfree, poolfuncs as f
        pool = gilfree.Pool(1)
        pool.submit(f.square, 1).result()
        pid = os.fork()
        if pid == 0:
            for call in (lambda: pool.map(f.square, [1]), lambda: pool.starmap(f.add, [(1, 2)]),
                         lambda: pool.submit(f.square, 1)):
                try:
                    call()
                except Exception as exc:
                    print(type(exc).__name__, "forked this one: create a pool in this process" in str(exc), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        pool.shutdown()
    """)
    assert rc == 0, err
    assert out.split("\n")[:-1] == ["BrokenPool True"] * 3


def test_a_child_forked_while_another_thread_imports_cloudpickle_can_send_by_value():
    # The import holds cloudpickle's module lock; a child forked meanwhile would wait for it
    # forever at its first by-value pickle. The loader below keeps the import going for 1 s.
    rc, out, err = run_to_end("""
        import importlib.util, os, signal, sys, threading, time
        import gilfree
        started = threading.Event()

        class SlowCloudpickle:
            def find_spec(self, name, path, target=None):
                if name != "cloudpickle":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                real = spec.loader

                class Loader:
                    def create_module(self, spec):
                        return real.create_module(spec)

                    def exec_module(self, module):
                        started.set()
                        time.sleep(1)
                        real.exec_module(module)

                spec.loader = Loader()
                return spec

        sys.meta_path.insert(0, SlowCloudpickle())
        pool = gilfree.Pool(1)
        sender = threading.Thread(target=lambda: pool.submit(lambda: 1).result())
        sender.start()
        started.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a hang ends the child
            with gilfree.Pool(1) as own:
                os._exit(0 if own.submit(lambda: 2).result(10) == 2 else 1)
        print("child", os.waitpid(pid, 0)[1], flush=True)
        sender.join()
        pool.shutdown()
    """, timeout=30)
    assert rc == 0, err
    assert out == "child 0\n"


def test_a_pool_cannot_be_pickled_or_sent_to_a_task(pool):
    with pytest.raises(TypeError, match="cannot be sent to another process"):
        pickle.dumps(pool)
    with pytest.raises(TypeError, match="cannot be sent to another process"):
        pool.submit(f.echo, pool)
    assert pool.submit(f.square, 3).result() == 9


# gilfree.pool imported before the exit (its exit hook ran), or first in the atexit handler
# (importing gilfree imported threading, so the exit ran threading's shutdown all the same).
@pytest.mark.parametrize("imports", ["gilfree, gilfree.pool", "gilfree"])
def test_a_pool_cannot_be_created_after_the_exit_hook_shut_pools_down(imports):
    # As concurrent.futures refuses: nothing would wait for the pool's tasks any more.
    rc, out, err = run_to_end(f"""
        import atexit
        import {imports}, poolfuncs as f

        def late():
            try:
                gilfree.Pool(1).submit(f.square, 2)
                print("created", flush=True)
            except RuntimeError as exc:
                print("RuntimeError", "shutdown" in str(exc), flush=True)

        atexit.register(late)
    """)
    assert rc == 0, err
    assert out == "RuntimeError True\n"


@pytest.mark.parametrize("in_thread", [False, True])
def test_run_outside_an_event_loop_raises_before_submitting(in_thread):
    pool = gilfree.Pool(1)
    raised = []

    def call():
        try:
            pool.run(f.square, 2)
        except RuntimeError as exc:
            raised.append(str(exc))

    if in_thread:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    else:
        call()
    pool.shutdown(wait=True)
    assert raised and "event loop" in raised[0]
    assert pool.stats()["tasks"] == 0


def test_signals_without_a_name_are_described_by_number():
    from gilfree.errors import WorkerCrashed, signal_name

    assert signal_name(signal.SIGKILL) == "SIGKILL"
    assert signal_name(signal.SIGRTMIN + 6) == f"signal {signal.SIGRTMIN + 6}"
    assert f"killed by signal {signal.SIGRTMIN + 6}" in str(WorkerCrashed(pid=7, signal=signal.SIGRTMIN + 6))
    # Pickled (a Dask worker's, a pool in a task's): the OOM verdict and the text travel.
    crash = pickle.loads(pickle.dumps(WorkerCrashed(pid=7, signal=signal.SIGKILL, oom_killed=True)))
    assert crash.oom_killed is True and "out of memory" in str(crash)
