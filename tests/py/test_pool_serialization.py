"""How tasks, functions, results and errors travel between the parent and the workers."""
import array
import functools
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import gilfree
import poolfuncs as f
import serfuncs as sf
from test_pool import run_script


@pytest.fixture(scope="module")
def pool():
    with gilfree.Pool(1) as p:  # one worker: every task sees what earlier ones left behind
        yield p


def run_ok(code, stdin_text=None):
    """Runs a script (its functions come from __main__, so they travel by value), with
    stdin_text on a pipe as its input if given, and returns what it printed; the script must
    succeed."""
    proc = run_script(code, stdin=None if stdin_text is None else subprocess.PIPE)
    out, err = proc.communicate(stdin_text, timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_functions_by_value_share_their_module_globals_in_a_worker():
    # As in a ProcessPoolExecutor worker, where __main__ is one module: what the initializer or a
    # task sets is what the next function reads, whichever pickle brought it.
    out = run_ok(
        """
        import gilfree
        CONFIG = None
        CACHE = {}
        def init(value):
            global CONFIG
            CONFIG = value
        def config():
            return CONFIG
        def via_helper():
            return config()
        def calling(fn):
            return lambda: fn()
        def remember(key):
            CACHE[key] = True
        def remembered():
            return sorted(CACHE)
        if __name__ == "__main__":
            with gilfree.Pool(1, initializer=init, initargs=("configured",)) as pool:
                got = [pool.submit(fn).result() for fn in (config, via_helper, lambda: CONFIG, calling(config))]
                pool.submit(remember, "a").result()
                got.append(pool.submit(remembered).result())
                print(got)
        """
    )
    assert out == str(["configured"] * 4 + [["a"]])


def test_a_function_by_value_is_pickled_again_when_what_it_captured_was_rebound():
    # Pickled once per function and cached, but a later pool sees the parent's new values.
    out = run_ok(
        """
        import gilfree
        SCALE = 1
        def helper():
            return SCALE
        def scaled(x, offset=0):
            return x * SCALE + offset
        def via_helper(x):
            return x * helper()
        def make(k):
            return lambda x: x * k * SCALE
        times = make(2)
        def run():
            with gilfree.Pool(1) as pool:
                return [pool.submit(fn, 10).result() for fn in (scaled, via_helper, times)] + list(
                    pool.map(scaled, [1])
                )
        print(run())
        SCALE = 1000
        print(run())
        def helper():
            return -1
        scaled.__defaults__ = (5,)
        times.__closure__[0].cell_contents = 3
        print(run())
        """
    )
    assert out.splitlines() == ["[10, 10, 20, 1]", "[10000, 10000, 20000, 1000]", "[10005, -10, 30000, 1005]"]


def test_the_same_pool_sees_a_global_rebound_between_submits():
    out = run_ok(
        """
        import gilfree
        SCALE = 10
        def scaled(x):
            return x * SCALE
        with gilfree.Pool(1) as pool:
            before = pool.submit(scaled, 1).result()
            SCALE = 1000
            print(before, pool.submit(scaled, 1).result(), list(pool.map(scaled, [1, 2])))
        """
    )
    assert out.strip() == "10 1000 [1000, 2000]"


def test_a_worker_takes_the_parents_rebound_globals_but_keeps_its_own_otherwise():
    # The worker side in one process: functions by value share their module's globals; a new
    # pickle of a function replaces the values the parent rebound since, and only those.
    out = run_ok(
        """
        from gilfree import _serialize as s
        SCALE, OFFSET = 1, 0
        def scaled(x):
            return x * SCALE + OFFSET
        def set_offset(value):
            global OFFSET
            OFFSET = value
        first = s.load_function(s.function_blob(scaled))
        s.load_function(s.function_blob(set_offset))(5)  # a task in the worker sets OFFSET
        SCALE = 1000
        again = s.load_function(s.function_blob(scaled))
        print(first(10), again(10))
        """
    )
    assert out == "10005 10005"


def test_a_new_function_takes_a_global_changed_in_place_whichever_function_came_first():
    # A global changed in place (not rebound) goes with the next function pickled: a new one.
    # A function already sent is not pickled again for it: its blob holds the value it had.
    out = run_ok(
        """
        import gilfree
        CFG = {"k": 1}
        def r1():
            return CFG["k"]
        with gilfree.Pool(1) as pool:
            first = pool.submit(r1).result()
            CFG["k"] = 2
            def r2():
                return CFG["k"]
            print(first, pool.submit(r2).result(), pool.submit(r1).result())
        with gilfree.Pool(1) as pool:  # the newer value is kept, not the one r1's blob holds
            print(pool.submit(r2).result(), pool.submit(r1).result())
        with gilfree.Pool(1) as pool:
            print(pool.submit(r1).result(), pool.submit(r2).result(), pool.submit(r1).result())
        """
    )
    assert out.splitlines() == ["1 2 2", "2 2", "1 2 2"]


def test_a_worker_keeps_its_own_global_until_the_parents_changes_in_content():
    # Set by the initializer: a new function using it, the parent's value unchanged in content
    # (written again in place), leaves it; a change in place goes with the next new function.
    out = run_ok(
        """
        import gilfree
        SETTINGS = {"mode": "parent"}
        def init():
            SETTINGS["mode"] = "worker"
        def mode():
            return SETTINGS["mode"]
        with gilfree.Pool(1, initializer=init) as pool:
            got = [pool.submit(mode).result()]
            SETTINGS.clear()
            SETTINGS["mode"] = "parent"
            got.append(pool.submit(lambda: SETTINGS["mode"]).result())
            SETTINGS["mode"] = "changed"
            got.append(pool.submit(lambda: SETTINGS["mode"]).result())
            got.append(pool.submit(mode).result())
            print(got)
        """
    )
    assert out == str(["worker", "worker", "changed", "changed"])


def test_an_lru_cached_main_function_goes_by_value_with_a_cache_in_each_worker():
    # As with ProcessPoolExecutor: the worker's cache lasts from task to task.
    out = run_ok(
        """
        import functools, os
        import gilfree
        CALLS = []
        @functools.lru_cache
        def double(x):
            CALLS.append(x)
            return 2 * x
        @functools.lru_cache(maxsize=4, typed=True)
        def kind(x):
            CALLS.append(x)
            return type(x).__name__
        @functools.cache
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        basename = functools.lru_cache(os.path.basename)  # an importable function, by name
        class Box:
            @functools.lru_cache
            def value(self):
                return 42
        def calls():
            return len(CALLS), fib.cache_info().currsize, kind.cache_parameters()
        if __name__ == "__main__":
            with gilfree.Pool(1) as pool:
                got = [pool.submit(double, 3).result() for _ in range(3)]
                got += [pool.submit(kind, x).result() for x in (1, 1.0, 1)]
                got += [pool.submit(fib, 80).result(), pool.submit(basename, "/a/b").result()]
                got += [pool.submit(Box().value).result(), pool.submit(calls).result()]
                print(got)
                print(CALLS, fib.cache_info().currsize)
        """
    )
    fib_80 = 23416728348467685
    assert out.splitlines() == [
        str([6, 6, 6, "int", "float", "int", fib_80, "b", 42, (3, 81, {"maxsize": 4, "typed": True})]),
        "[] 0",
    ]


def test_a_main_singleton_pickling_by_name_is_the_one_the_initializer_made_in_the_worker():
    # The per-process singleton idiom: __reduce__ returns the global's name, so a function using
    # it by value finds the worker's own instance in the worker's __main__, as set up by the
    # initializer; it is not refused at submit.
    out = run_ok(
        """
        import functools, os
        import gilfree
        class Registry:
            def __init__(self, where):
                self.where = where
            def __reduce__(self):
                return "REGISTRY"
        REGISTRY = Registry("parent")
        def init():
            import sys
            sys.modules["__main__"].REGISTRY = Registry(f"worker {os.getpid()}")
        def where(registry=None):
            return (registry or REGISTRY).where.split()[0]
        if __name__ == "__main__":
            with gilfree.Pool(1, initializer=init) as pool:
                print(pool.submit(where).result(), pool.submit(functools.partial(where)).result(),
                      pool.submit(lambda: REGISTRY.where.split()[0]).result(), pool.submit(where, REGISTRY).result())
        """
    )
    assert out == "worker worker worker worker"


def test_a_digest_compares_functions_classes_and_large_buffers_by_identity():
    # A function pickled anew digests the globals it copies to see a change in place; functions
    # and classes are followed through their own globals, and hashing a large buffer would cost
    # as much as copying it: those are compared by identity only.
    from gilfree import _serialize as s

    np = pytest.importorskip("numpy")
    assert s._digest(sf.Scaler) == s._digest(len) == s._digest(functools.lru_cache(len)) == b""
    assert s._digest(lambda: 0) == b""
    assert s._digest(np.zeros(1 << 17)) == s._digest({"big": [np.zeros(1 << 17)], "k": 1}) == b""
    assert s._digest(memoryview(bytearray(1 << 17))) == b""
    small = {"k": [1, 2], "a": np.zeros(4)}
    before = s._digest(small)
    assert before and s._digest(small) == before
    small["k"].append(3)
    assert s._digest(small) != before
    assert s._digest({"f": lambda: 0}) not in (None, b"")  # by cloudpickle


def test_callables_with_state_travel_with_their_state_at_each_submit(pool):
    scaler = sf.Scaler(1)
    assert pool.submit(scaler, 2).result() == 2
    scaler.factor = 10
    assert pool.submit(scaler, 2).result() == 20
    method = scaler.apply
    assert pool.submit(method, 2).result() == 20
    scaler.factor = 100
    assert pool.submit(method, 2).result() == 200
    assert list(pool.map(scaler, [1, 2])) == [100, 200]
    add_to = functools.partial(f.add, 1)
    assert pool.submit(add_to, 2).result() == 3
    add_to.keywords["b"] = 5
    assert pool.submit(add_to).result() == 6


def test_each_task_gets_its_own_copy_of_a_callable_instance(pool):
    counter = sf.Counter()
    assert [pool.submit(counter).result() for _ in range(3)] == [1, 1, 1]


def test_an_exception_that_cannot_be_unpickled_arrives_as_its_type_and_message(pool):
    with pytest.raises(RuntimeError, match=r"^serfuncs\.CodedError: 3: disk full \(") as info:
        pool.submit(sf.coded_error_on, 3, 3).result()
    assert "in coded_error_on" in str(info.value.__cause__)
    got = []
    with pytest.raises(RuntimeError, match=r"^serfuncs\.CodedError: 3: disk full \("):
        for value in pool.map(sf.coded_error_on, range(10), [3] * 10, chunksize=5):
            got.append(value)
    assert got == [0, 1, 2]
    assert pool.submit(f.square, 3).result() == 9


@pytest.mark.parametrize("mode", ["r", "w"])
def test_an_open_text_file_argument_is_refused_as_pickle_refuses_it(pool, tmp_path, mode):
    # cloudpickle would send a file opened for reading as a copy of its contents.
    (tmp_path / "notes.txt").write_text("notes")
    with open(tmp_path / "notes.txt", mode) as notes:
        with pytest.raises(TypeError, match="cannot pickle '_io.TextIOWrapper' object"):
            pool.submit(f.echo, notes)
        with pytest.raises(TypeError, match="cannot pickle '_io.TextIOWrapper' object"):
            pool.submit(lambda file: file, notes)


def test_a_result_that_cannot_be_unpickled_is_a_clear_error(pool):
    with pytest.raises(RuntimeError, match=r"result cannot be unpickled.*Pair\.__init__"):
        pool.submit(sf.pair, 1).result()
    assert pool.submit(f.square, 3).result() == 9


def test_a_result_whose_unpickling_raises_systemexit_fails_its_future_and_the_pool_goes_on(pool):
    with pytest.raises(RuntimeError, match="result cannot be unpickled") as info:
        pool.submit(sf.exit_on_load).result(timeout=60)
    assert type(info.value.__cause__) is SystemExit
    assert pool.submit(f.square, 3).result(timeout=60) == 9


def test_map_yields_the_results_before_an_unpicklable_one_in_its_chunk(pool):
    got = []
    with pytest.raises(TypeError, match="pickle"):
        for value in pool.map(sf.lock_on, range(30), [13] * 30, chunksize=10):
            got.append(value)
    assert got == list(range(13))


@pytest.mark.parametrize("size", [256 << 10, 4 << 20])  # copied on arrival / mapped
def test_a_large_bytes_referenced_many_times_travels_once_and_arrives_as_one_object(pool, size):
    big = b"a" * size
    before = pool.stats()
    assert pool.submit(sf.distinct, [big] * 40).result() == (40, 1)
    got = pool.submit(sf.repeated, size, 40).result()
    after = pool.stats()
    assert len(got) == 40 and len({id(item) for item in got}) == 1 and got[0] == b"r" * size
    assert after["bytes_in"] - before["bytes_in"] < 2 * size
    assert after["bytes_out"] - before["bytes_out"] < 2 * size


def test_workers_do_not_read_the_parents_stdin():
    out = run_ok(
        """
        import sys, gilfree, serfuncs as sf
        with gilfree.Pool(1) as pool:
            print(pool.submit(sf.stdin_reads).result())
        print(repr(sys.stdin.read()))
        """,
        stdin_text="hello world",
    )
    assert out.splitlines() == [str(("", b"", True)), repr("hello world")]


def test_stats_count_the_bytes_copied_not_a_shared_buffer_passed_by_reference(pool):
    size = 4 << 20
    handle = pool.share(bytearray(size))
    before = pool.stats()
    for _ in range(5):
        back = pool.submit(f.echo, handle).result()  # the worker's view goes back by reference
    after = pool.stats()
    assert len(back) == size
    assert after["bytes_in"] - before["bytes_in"] < size
    assert after["bytes_out"] - before["bytes_out"] < size
    pool.submit(f.echo, bytearray(size)).result()  # copied both ways: counted
    final = pool.stats()
    assert final["bytes_in"] - after["bytes_in"] >= size
    assert final["bytes_out"] - after["bytes_out"] >= size


@pytest.mark.parametrize("size", [1000, 256 << 10])  # in-band / out-of-band
@pytest.mark.parametrize("source", [bytearray, bytes])
def test_a_pickle_buffer_arrives_usable_and_can_be_returned(pool, size, source):
    sent = pickle.PickleBuffer(source(b"x" * (size - 3) + b"end"))
    assert pool.submit(sf.buffer_summary, sent).result() == (size, ord("x"), b"end")
    back = pool.submit(f.echo, sent).result()
    assert bytes(back) == bytes(sent)


def doubles(count, shape):
    """A memoryview of count doubles (i + 0.5) with the given shape."""
    return memoryview(array.array("d", [i + 0.5 for i in range(count)])).cast("B").cast("d", shape)


@pytest.mark.parametrize("count", [12, 12_000])  # in-band / out-of-band (96 KB)
def test_a_memoryview_arrives_and_comes_back_with_its_format_and_shape(pool, count):
    view = doubles(count, (count // 4, 4))
    expected = ("d", (count // 4, 4), 8, view.tolist())
    assert pool.submit(sf.view_summary, view).result() == expected
    assert sf.view_summary(pool.submit(f.echo, view).result()) == expected
    # A lambda beside it: the message goes by value (cloudpickle), both ways.
    assert sf.view_summary(pool.submit(f.echo, [lambda: 0, view]).result()[1]) == expected
    strided = doubles(count, (count,))[::3]
    back = pool.submit(f.echo, strided).result()
    assert back.c_contiguous and sf.view_summary(back) == sf.view_summary(strided)


@pytest.mark.parametrize("count", [12, 12_000])
def test_a_memoryview_cast_cannot_rebuild_arrives_as_the_bytes_of_its_contents(pool, count):
    np = pytest.importorskip("numpy")
    for data in (np.arange(count, dtype=">f8"), np.zeros(count, dtype="i4,f8"), np.zeros((0, 3))):
        view = memoryview(data)
        got = pool.submit(f.echo, view).result()
        assert type(got) is bytes and got == view.tobytes()


def test_a_share_handle_held_by_the_callable_goes_by_reference(pool):
    data = bytes(range(256)) * 4096  # 1 MiB
    handle = pool.share(data)
    callables = [
        functools.partial(sf.byte_at, handle),
        sf.ByteAt(handle),
        lambda i: sf.byte_at(handle, i),  # in a closure cell, by value
    ]
    for fn in callables:
        before = pool.stats()["bytes_in"]
        assert [pool.submit(fn, i).result() for i in range(3)] == [0, 1, 2]
        assert list(pool.map(fn, range(3, 6), chunksize=1)) == [3, 4, 5]
        assert pool.stats()["bytes_in"] - before < len(data)  # never copied into a task


def test_a_share_handle_in_a_main_global_goes_by_reference_and_can_be_rebound():
    out = run_ok(
        """
        import gilfree

        def byte_at(i):
            return HANDLE[i]

        if __name__ == "__main__":
            with gilfree.Pool(1) as pool:
                HANDLE = pool.share(bytes(range(256)) * 4096)
                before = pool.stats()["bytes_in"]
                print([pool.submit(byte_at, i).result() for i in range(3)])
                print(pool.stats()["bytes_in"] - before < HANDLE.nbytes)
                HANDLE = pool.share(bytes([7]) * (1 << 20))
                print(pool.submit(byte_at, 0).result())
        """
    )
    assert out.splitlines() == ["[0, 1, 2]", "True", "7"]


def test_arrays_from_64_kib_arrive_read_only_both_ways_smaller_ones_writable(pool):
    # The rule the Pool docstring and README state (zero-copy views of shared memory).
    np = pytest.importorskip("numpy")
    small, large = np.zeros(8191), np.zeros(8192)  # 65528 and 65536 bytes
    assert pool.submit(sf.writable, small).result()
    assert pool.submit(f.echo, small).result().flags.writeable
    assert not pool.submit(sf.writable, large).result()
    assert not pool.submit(f.echo, large).result().flags.writeable
    assert pool.submit(sf.writable, np.zeros(20000)[::2]).result()  # numpy pickles it in-band


def test_what_the_parents_main_defines_pickles_again_in_a_task(tmp_path):
    # As in a ProcessPoolExecutor worker, a task's __main__ holds what the script defines: a
    # class pickles again by name (the class rebound in the parent too), and a spawned process
    # (which runs the script as its __main__) gets a function by name.
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import concurrent.futures, dataclasses, multiprocessing, pickle
            import gilfree
            @dataclasses.dataclass
            class Point:
                x: int
            def square(x):
                return x * x
            def again(i):
                return repr(pickle.loads(pickle.dumps(Point(i))))
            def fan_out(n):
                spawn = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as inner:
                    return sum(inner.map(square, range(n)))
            if __name__ == "__main__":
                with gilfree.Pool(1) as pool:
                    got = [pool.submit(again, 3).result(), pool.submit(fan_out, 4).result()]
                    @dataclasses.dataclass
                    class Point:
                        x: int
                        y: int = 0
                    got.append(pool.submit(again, 5).result())
                print(got)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(["Point(x=3)", 14, "Point(x=5, y=0)"])


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_main_scripts_functions_and_classes_go_by_value_from_a_spawned_child(tmp_path, method):
    # There the main script is __mp_main__, a module gilfree's workers do not have.
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, sys
        import gilfree

        class Box:
            def __init__(self, value):
                self.value = value

        def unbox_squared(box):
            return box.value ** 2

        def child(queue):
            with gilfree.Pool(1) as pool:
                queue.put(pool.submit(unbox_squared, Box(9)).result(20))

        if __name__ == "__main__":
            ctx = multiprocessing.get_context(sys.argv[1])
            queue = ctx.Queue()
            process = ctx.Process(target=child, args=(queue,))
            process.start()
            print(queue.get(timeout=60))
            process.join(30)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "81\n"


@pytest.mark.parametrize("made, kind", [("threading.Lock()", "lock"), ("open(os.devnull)", "TextIOWrapper")])
def test_a_main_function_with_an_unpicklable_global_is_refused_naming_both(made, kind):
    out = run_ok(
        f"""
        import os
        import threading
        import gilfree
        LOCK = {made}

        def locked_double(x):
            with LOCK:
                return 2 * x

        with gilfree.Pool(1) as pool:
            try:
                pool.submit(locked_double, 2)
            except TypeError as exc:
                print(exc)
        """
    )
    assert "__main__.locked_double" in out
    assert f"global 'LOCK' ({kind})" in out
    assert "module the workers can import" in out
