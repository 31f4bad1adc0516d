"""gilfree.Pool under faults from outside the pool: the user's program forks while a pool is
open, a task forks, a task closes or replaces the worker's inherited descriptors, the shared
memory for arguments or results fills up, the kernel's OOM killer ends a worker."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings

import numpy as np
import pytest

import gilfree

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")


def run_script(code, timeout=120, args=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, HERE]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=HERE,
    )


# Tasks. The worker imports this module by name (tests/py is on the workers' sys.path).


def ones(n):
    return np.ones(n, dtype=np.uint8)


def filled(n, value):
    return bytes([value]) * n


def zeros_pair(n):
    # In an object: no container scan finds the arrays, plain pickle meets them one by one.
    return types.SimpleNamespace(a=np.zeros(n, np.uint8), b=np.zeros(n, np.uint8))


def a_bytearray(n):
    return bytearray(n)  # pickled in-band: a message of n bytes


def a_memoryview(n):
    return memoryview(bytearray(b"z" * n))


def close_inherited(_=None):
    os.closerange(3, 1024)
    return "closed"


def slow_pid(_=None):
    time.sleep(0.05)  # long enough for the parent to stop spinning and sleep: the doorbell rings
    return os.getpid()


def replace_with_file(numbers, path):
    """Closes the inherited descriptors and opens the user's file at each of `numbers` (the
    pool's memfd and doorbell), as a long-lived log file would take a freed number."""
    os.closerange(3, 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"log line\n")
    for number in numbers:
        if number != fd:
            os.dup2(fd, number)
    return "replaced"


def fork_and_return(data, child_ends_with):
    """Forks; the child drops its copy of data's view, then leaves the task (it returns or
    raises). The worker returns data, its pid and the child's exit code."""
    child = os.fork()
    if child == 0:
        del data
        if child_ends_with == "return":
            return "from the child"
        raise SystemExit(child_ends_with)
    _, status = os.waitpid(child, 0)
    return data, os.getpid(), os.waitstatus_to_exitcode(status)


def length_and_sum(data):
    time.sleep(0.05)
    return len(data), sum(data[:: 1 << 16])


def nbytes_once(path, data):
    """Holds data (an argument in the arena) until path exists."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return data.nbytes


# Forks.

FORK_CHILD = """
    import gc, multiprocessing, os, sys
    from concurrent.futures.process import BrokenProcessPool
    import numpy as np
    import gilfree
    import test_pool_faults as t

    def total(r):
        return int(r.sum() if isinstance(r, np.ndarray) else np.frombuffer(r, np.uint8).sum())

    def child_reads(results, expect):
        ok = [total(r) for r in results] == expect
        try:
            pool.submit(abs, 1)
            ok = False
        except BrokenProcessPool:
            pass
        del results[:]
        gc.collect()
        return ok

    if __name__ == "__main__":
        pool = gilfree.Pool(1)
        results = [
            pool.submit(t.ones, 1 << 20).result(timeout=60),             # numpy, a view
            pool.submit(t.a_memoryview, 1 << 20).result(timeout=60),     # memoryview, a view
            pool.submit(t.filled, 8 << 20, 1).result(timeout=60),        # bytes, mapped
            pool.submit(t.filled, 1 << 20, 1).result(timeout=60),        # bytes, copied
            pool.share(np.arange(1 << 16)).get(),                        # share() handle
        ]
        expect = [1 << 20, ord("z") << 20, 8 << 20, 1 << 20, sum(range(1 << 16))]
        {how}
        # The child's drops gave back none of the parent's references: the blocks are not
        # reused for the next results.
        more = [pool.submit(t.filled, 8 << 20, 2).result(timeout=60),
                pool.submit(t.ones, 1 << 20).result(timeout=60) * 3]
        assert [total(r) for r in results] == expect, "the parent's data changed"
        assert pool.submit(abs, -3).result(timeout=60) == 3
        pool.shutdown()
        print("parent ok")
"""

WITH_OS_FORK = """
        pid = os.fork()
        if pid == 0:
            os._exit(0 if child_reads(results, expect) else 3)
        _, status = os.waitpid(pid, 0)
        print("child", status, flush=True)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
"""

WITH_MP_FORK = """
        proc = multiprocessing.get_context("fork").Process(
            target=lambda: sys.exit(0 if child_reads(results, expect) else 3))
        proc.start()
        proc.join()
        print("child", proc.exitcode, flush=True)
        assert proc.exitcode == 0, proc.exitcode
"""


def check_fork(how):
    proc = run_script(FORK_CHILD.format(how=textwrap.indent(textwrap.dedent(how), " " * 8)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parent ok" in proc.stdout


def test_os_fork_child_reads_the_results_of_an_open_pool():
    check_fork(WITH_OS_FORK)


def test_multiprocessing_fork_child_reads_the_results_of_an_open_pool():
    check_fork(WITH_MP_FORK)


# Descriptors a task closes.


def test_task_closing_inherited_descriptors_never_hangs_later_results():
    with gilfree.Pool(1) as pool:
        assert pool.submit(close_inherited).result(timeout=30) == "closed"
        for _ in range(5):
            # The parent sleeps while each runs: its worker must wake it, or be replaced.
            assert pool.submit(slow_pid).result(timeout=30) > 0
        assert pool.stats()["restarts"] >= 1  # the worker without its doorbell was replaced
        assert list(pool.map(abs, range(-50, 0))) == list(range(50, 0, -1))


def test_task_putting_a_file_at_the_pools_descriptors_gets_no_write_into_it(tmp_path):
    path = str(tmp_path / "worker.log")
    with gilfree.Pool(1) as pool:
        memfd, doorbell, _ = pool._engine.child_fds()
        assert pool.submit(replace_with_file, (memfd, doorbell), path).result(timeout=30)
        # Arguments of 4 MiB and more are mapped from the memfd: never from the file.
        big = bytes(range(256)) * (5 << 12)
        for _ in range(3):
            assert pool.submit(length_and_sum, big).result(timeout=30) == (
                len(big),
                sum(big[:: 1 << 16]),
            )
        assert pool.submit(abs, -7).result(timeout=30) == 7
    with open(path, "rb") as file:
        assert file.read() == b"log line\n"


def test_a_process_forked_by_a_task_ends_there_and_leaves_the_pool_alone():
    # 4 MiB: travels in shared memory and arrives as a view of it
    big = np.frombuffer(bytes(range(256)) * (1 << 14), np.uint8).copy()
    with gilfree.Pool(1) as pool:
        for ends_with, code in (("return", 0), (7, 7), ("a message", 1)):
            data, worker, exit_code = pool.submit(fork_and_return, big, ends_with).result(timeout=30)
            assert exit_code == code
            assert np.array_equal(data, big)
            # The child neither answered for the worker nor dropped the worker's references to
            # its blocks: new traffic through the arena leaves the result intact.
            for value in range(4):
                other = np.full(len(big), value, np.uint8)
                assert pool.submit(length_and_sum, other).result(timeout=30) == (len(big), value * 64)
                assert np.array_equal(pool.submit(np.copy, other).result(timeout=30), other)
            assert np.array_equal(data, big)
            assert pool.submit(os.getpid).result(timeout=30) == worker
        assert list(pool.map(abs, range(-300, 0))) == list(range(300, 0, -1))
        assert pool.stats()["restarts"] == 0


# Full shared memory. Under an address-space limit of 4 GiB the arena is 1 GiB: 512 MiB for
# the parent's arguments, 512 MiB for the one worker's results.

ARENA_FULL = """
    import gc, os, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import numpy as np
    import gilfree
    import test_pool_faults as t

    MiB = 1 << 20
    if __name__ == "__main__":
        release = sys.argv[1]
        with gilfree.Pool(1) as pool:
            a = np.ones(100 * MiB, np.uint8)
            futures = []
            try:
                for _ in range(8):  # each copied into the arena up front, held until `release`
                    futures.append(pool.submit(t.nbytes_once, release, a))
            except MemoryError as exc:
                print("submit", len(futures), exc, flush=True)
            finally:
                open(release, "w").close()
            assert [f.result(timeout=60) for f in futures] == [100 * MiB] * len(futures)
            del futures
            assert pool.submit(t.nbytes_once, release, a).result(timeout=60) == 100 * MiB

            held = []  # results stay in the worker's arena while the parent references them
            for _ in range(8):
                try:
                    held.append(pool.submit(t.ones, 100 * MiB).result(timeout=60))
                except MemoryError as exc:
                    print("result", len(held), exc, flush=True)
                    break
            del held
            gc.collect()
            assert int(pool.submit(t.ones, 100 * MiB).result(timeout=60).sum()) == 100 * MiB
            print("pool ok", flush=True)
"""


def test_full_arena_raises_memoryerror_and_the_pool_recovers(tmp_path):
    proc = run_script(ARENA_FULL, args=[str(tmp_path / "release")])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Five 100 MiB arguments fit in 512 MiB; the sixth submit is refused, nothing is queued.
    assert "submit 5 gilfree.Pool: the shared memory for task arguments is full (511 MiB, " \
        "held by the arguments of tasks not finished yet and by pool.share() data; 100 MiB more " \
        "do not fit)" in out
    assert "wait for results before submitting more, or pass data that many tasks use once " \
        "with pool.share()" in out
    # The sixth result held by the parent fails its own task only.
    assert "result 5 gilfree.Pool: a worker's shared memory for results is full (" in out
    assert "drop the results (and arrays or views of them) you no longer need" in out
    assert "pool ok" in out


# Under a limit of 2 GiB: 255 MiB for the parent's arguments, 256 MiB for the worker's results.

PART_PLACED = """
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    import numpy as np
    import gilfree
    import test_pool_faults as t

    n = 150 << 20  # one fits, two do not
    if __name__ == "__main__":
        with gilfree.Pool(1) as pool:
            try:
                pool.submit(vars, t.zeros_pair(n))
            except MemoryError as exc:
                print("submit", exc, flush=True)
            # The first array's block was freed: another one fits.
            assert pool.submit(len, np.zeros(n, np.uint8)).result(timeout=60) == n
            try:
                pool.submit(t.zeros_pair, n).result(timeout=60)
            except MemoryError as exc:
                print("result", exc, flush=True)
            assert pool.submit(np.zeros, n, np.uint8).result(timeout=60).nbytes == n
            print("pool ok", flush=True)
"""


def test_a_message_whose_buffers_do_not_all_fit_frees_those_placed_before():
    proc = run_script(PART_PLACED)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "submit gilfree.Pool: the shared memory for task arguments is full" in out
    assert "result gilfree.Pool: a worker's shared memory for results is full" in out
    assert "pool ok" in out


BIG_PICKLE = """
    import os, resource
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    import gilfree
    import test_pool_faults as t

    if __name__ == "__main__":
        with gilfree.Pool(1) as pool:
            worker = pool.submit(os.getpid).result(timeout=60)
            try:
                pool.submit(t.a_bytearray, 300 << 20).result(timeout=60)
            except MemoryError as exc:
                print("result", exc, flush=True)
            assert pool.submit(os.getpid).result(timeout=60) == worker
            assert pool.stats()["restarts"] == 0
            print("pool ok", flush=True)
"""


def test_a_result_whose_pickle_does_not_fit_fails_its_task_only():
    proc = run_script(BIG_PICKLE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The results region (256 MiB under this limit) is smaller than the pickle: holding fewer
    # results would not help ("full (256 MiB, held by its results that the parent still
    # references ...)" before).
    assert "result gilfree.Pool: a worker's shared memory for results (256 MiB in all) cannot hold a buffer " \
        "of 301 MiB: it is sized to a quarter of the address-space limit (ulimit -v) set before Pool(); " \
        "raise the limit, or send less at once" in out, out
    assert "pool ok" in out


# The template and workers killed together with the parent (a systemd stop signals the whole
# group): shutdown, entered before the parent heard of the deaths, must not wait forever.

GROUP_KILLED = """
import concurrent.futures.process, os, signal, sys, time
import gilfree
from test_pool_faults import sleep_long

def children(pid):
    return [int(c) for t in os.listdir(f"/proc/{{pid}}/task")
            for c in open(f"/proc/{{pid}}/task/{{t}}/children").read().split()]

def outcome(future):
    try:
        return type(future.exception()).__name__
    except concurrent.futures.CancelledError:
        return "cancelled"

if __name__ == "__main__":
    pool = gilfree.Pool(2)
    futures = [pool.submit(sleep_long) for _ in range(4)]
    results = pool.map(sleep_long, range(4), chunksize=1)
    while sum(f.running() for f in futures) < 2:
        time.sleep(0.01)

    def stop(*_):
{stop}
        print("outcomes", *[outcome(f) for f in futures], flush=True)
        if "{how}" == "map":
            try:
                list(results)
            except concurrent.futures.process.BrokenProcessPool:
                print("map broken", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    (template,) = children(os.getpid())
    for pid in [template, *children(template)]:
        os.kill(pid, signal.SIGKILL)
    {end}
"""

STOPS = {
    "wait": "pool.shutdown(wait=True)",
    "no_wait": "pool.shutdown(wait=False)",
    "cancel": "pool.shutdown(wait=True, cancel_futures=True)",
    "map": "pool.shutdown(wait=True)",
    # Nothing in the handler: the program ends and the exit hook shuts the pool down.
    "exit": "",
}


def sleep_long(_=None):
    time.sleep(60)


@pytest.mark.parametrize("how", sorted(STOPS))
def test_shutdown_returns_when_the_template_and_workers_die_with_the_parent(how):
    end = "sys.exit(0)" if how == "exit" else "os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)"
    stop = textwrap.indent(STOPS[how] or "return", " " * 8)
    code = GROUP_KILLED.format(stop=stop, how=how, end=end)
    proc = run_script(code, timeout=30)  # the bug: shutdown waited for the futures forever
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if how == "exit":
        return
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("outcomes")]
    outcomes = line.split()[1:]
    # The two running tasks failed; the queued ones too, or were cancelled when asked.
    assert outcomes.count("BrokenPool") >= 2, proc.stdout
    assert set(outcomes) <= ({"BrokenPool", "cancelled"} if how == "cancel" else {"BrokenPool"})
    if how == "map":
        assert "map broken" in proc.stdout, proc.stdout + proc.stderr


def _block_refs(engine, blocks):
    """The cross-process reference counts of the parent's arena blocks (read through the memfd:
    the block header's magic, then its count)."""
    import struct

    memfd = engine.child_fds()[0]
    seg_size = struct.unpack("Q", os.pread(memfd, 8, 8))[0]
    return [struct.unpack("II", os.pread(memfd, 8, seg_size + b))[1] for b in blocks]


@pytest.mark.parametrize("bad_at", [None, 10])
def test_a_submit_with_too_many_or_bad_buffers_releases_every_one(bad_at):
    # Engine.submit takes over the references of its buffers also when it fails: with more than
    # a message holds (4095), or with a malformed entry, not one block may stay referenced.
    with gilfree.Pool(1) as pool:
        engine = pool._engine
        n = 4096 if bad_at is None else 20
        refs = [engine.export(memoryview(bytes([i % 251]) * 64)) for i in range(n)]
        blocks = [r[0] for r in refs]
        assert set(_block_refs(engine, blocks)) == {1}
        sent = list(refs)
        if bad_at is not None:
            engine.release(sent[bad_at][0])  # the malformed entry's own block: freed here
            sent[bad_at] = ("not", "a", "tuple", 0)
        with pytest.raises(ValueError if bad_at is None else TypeError) as info:
            engine.submit(10**9, False, None, b"x", sent)
        assert set(_block_refs(engine, blocks)) == {0}
        if bad_at is None:
            assert "too many out-of-band buffers in one message (4096; at most 4095)" in str(
                info.value
            )
        assert pool.submit(len, "abc").result(timeout=60) == 3


def test_a_result_with_too_many_buffers_fails_its_task_only():
    from poolfuncs import many_buffers

    with gilfree.Pool(1) as pool:
        worker = pool.submit(os.getpid).result(timeout=60)
        for _ in range(2):  # the first one's blocks were released: the second fits as well
            with pytest.raises(ValueError, match="too many out-of-band buffers in one message"):
                pool.submit(many_buffers, 4100).result(timeout=60)
        assert len(pool.submit(many_buffers, 4095).result(timeout=60)) == 4095
        assert pool.submit(os.getpid).result(timeout=60) == worker
        assert pool.stats()["restarts"] == 0


def test_close_waits_for_a_thread_collecting_without_the_gil():
    # Future.result() collects in its own thread with the GIL released; closing the engine
    # (Ctrl-C, shutdown from another thread, the waiter's own close) frees what that collect
    # uses, so it must wait until the collect is out of the engine.
    import threading

    pool = gilfree.Pool(1)
    engine = pool._engine
    entered, out = threading.Event(), []

    def collect():
        entered.set()
        out.append(engine.collect(False, 1.0))  # nothing is out: spins the whole second

    t = threading.Thread(target=collect)
    t.start()
    entered.wait()
    time.sleep(0.1)
    started = time.monotonic()
    pool.shutdown()
    waited = time.monotonic() - started
    t.join()
    assert out == [[]]
    assert waited > 0.5, f"close returned after {waited:.3f} s, with a collect still inside"
    with pytest.raises(RuntimeError, match="closed"):
        engine.collect(False, 0.0)


def memfd_backed_bytes():
    """Bytes backed by pages in the memfds this process maps (the pools' arenas), each once."""
    backed = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:"):
                try:
                    backed[fields[4]] = os.stat(f"/proc/self/map_files/{fields[0]}").st_blocks * 512
                except OSError:  # unmapped meanwhile
                    pass
    return sum(backed.values())


def test_a_result_kept_after_shutdown_holds_its_own_pages_not_the_pools():
    before = memfd_backed_bytes()
    with gilfree.Pool(2) as pool:
        for _ in range(4):
            big = pool.submit(np.ones, 5 << 20).result()  # 40 MiB, dropped
            del big
        kept = pool.submit(np.full, 16384, 7.0).result()  # 128 KiB, a view of shared memory
    assert not kept.flags.writeable
    # The arena stays mapped while the view lives; its free blocks and warm pages went back.
    assert memfd_backed_bytes() - before < 4 << 20
    assert (kept == 7.0).all()


def test_tasks_queued_to_a_worker_stopped_between_tasks_go_to_another_after_task_timeout():
    with gilfree.Pool(2, task_timeout=1) as pool:
        # Both ready: a starting worker's tasks go to an idle one, never timing out. Two at a
        # time, so that each worker gets one.
        while not all(w["tasks"] for w in pool.stats()["workers"]):
            [f.result(timeout=30) for f in [pool.submit(pow, 2, 2) for _ in range(2)]]
        # The scheduler gives the first of equally loaded slots the next task.
        victim = next(w["pid"] for w in pool.stats()["workers"] if w["slot"] == 0)
        os.kill(victim, signal.SIGSTOP)
        try:
            futures = [pool.submit(pow, 2, i) for i in range(8)]
            assert [f.result(timeout=20) for f in futures] == [2**i for i in range(8)]
            assert pool.stats()["restarts"] == 1  # killed for not starting them, then replaced
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_tasks_never_started_before_a_ctrl_c_give_their_arguments_pages_back():
    before = memfd_backed_bytes()
    with pytest.raises(KeyboardInterrupt):
        with gilfree.Pool(1) as pool:
            kept = pool.submit(np.full, 16384, 7.0).result()
            pool.submit(time.sleep, 30)
            for _ in range(4):
                pool.submit(len, np.ones(1 << 20))  # 8 MiB each, queued behind the sleep
            raise KeyboardInterrupt  # the with block kills the workers and drops the queue
    deadline = time.monotonic() + 10
    while memfd_backed_bytes() - before >= 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)  # the pool closes in the background after the kill
    assert memfd_backed_bytes() - before < 4 << 20
    assert (kept == 7.0).all()


def filled_bytes(n):
    return len(b"\x01" * n)  # every page written, unlike bytearray(n)'s calloc


@contextlib.contextmanager
def memory_limited_cgroup(limit):
    """Yields the cgroup.procs path of a new memory cgroup limited to `limit` bytes, under this
    process's own (v1's memory hierarchy or v2's); skips where none can be made (not root, a
    read-only or delegated-away hierarchy)."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    with open("/proc/swaps") as f:
        swap = len(f.read().splitlines()) > 1
    candidates = []  # (parent, memory limit file, swap limit file and its value)
    if "memory" in paths:
        candidates.append((f"/sys/fs/cgroup/memory{paths['memory']}", "memory.limit_in_bytes",
                           ("memory.memsw.limit_in_bytes", limit)))
    if "" in paths:
        candidates += [(f"{root}{paths['']}", "memory.max", ("memory.swap.max", 0))
                       for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")]
    for parent, limit_file, (swap_file, swap_limit) in candidates:
        group = os.path.join(parent, f"gilfree-test-{os.getpid()}")
        try:
            os.mkdir(group)
        except OSError:
            continue
        try:
            with open(os.path.join(group, limit_file), "w") as f:
                f.write(str(limit))
            if swap:  # else the task would swap out rather than be killed
                with open(os.path.join(group, swap_file), "w") as f:
                    f.write(str(swap_limit))
        except OSError:
            os.rmdir(group)
            continue
        try:
            yield os.path.join(group, "cgroup.procs")
        finally:
            for _ in range(100):  # its last processes may still be exiting
                try:
                    os.rmdir(group)
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                warnings.warn(f"could not remove the test's cgroup {group}")
        return
    pytest.skip("no memory cgroup can be made here (it takes root and a writable cgroup hierarchy)")


def test_a_worker_the_oom_killer_ends_fails_its_task_saying_out_of_memory():
    # A real OOM kill: the pool runs in a process of a cgroup limited to 400 MB, and its task
    # writes 1 GiB. The pool goes on with a new worker.
    with memory_limited_cgroup(400 << 20) as procs:
        result = run_script(
            """
            import json, os, sys
            import gilfree, test_pool_faults as t
            with open(sys.argv[1], "w") as f:
                f.write(str(os.getpid()))
            with gilfree.Pool(1) as pool:
                try:
                    pool.submit(t.filled_bytes, 1 << 30).result(timeout=120)
                    print(json.dumps({"crash": None}))
                except gilfree.WorkerCrashed as crash:
                    print(json.dumps({"crash": str(crash), "oom_killed": crash.oom_killed}))
                print(json.dumps({"next": pool.submit(t.filled_bytes, 1 << 20).result(timeout=60)}))
            """,
            args=(procs,),
        )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr
    assert lines[0]["crash"] is not None, "the task was not killed: the cgroup's limit did not hold"
    assert lines[0]["oom_killed"] is True, lines[0]
    assert "SIGKILL" in lines[0]["crash"] and "out of memory" in lines[0]["crash"], lines[0]
    assert lines[1] == {"next": 1 << 20}
