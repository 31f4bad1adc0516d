"""Task callables for the serialization tests, importable by workers."""
import os
import sys
import threading


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

    def apply(self, x):
        return x * self.factor


class Counter:
    """Counts its calls: a task that finds a count left by an earlier task got a reused copy."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.calls


class CodedError(Exception):
    """Pickles, but cannot be unpickled: its __init__ takes other arguments than its args."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


def coded_error_on(x, bad):
    if x == bad:
        raise CodedError(x, "disk full")
    return x


class Pair:
    """Pickles, but cannot be unpickled (as CodedError)."""

    def __init__(self, first, second):
        self.args = (first,)

    def __reduce__(self):
        return Pair, self.args


def pair(first):
    return Pair(first, first)


def lock_on(x, bad):
    """x, or an unpicklable result for the item bad."""
    return threading.Lock() if x == bad else x


def stdin_reads():
    """What a task reads from its standard input (sys.stdin, then descriptor 0), and whether
    descriptor 0 is /dev/null."""
    return sys.stdin.read(5), os.read(0, 5), os.path.samestat(os.fstat(0), os.stat(os.devnull))


def raise_on(x, bad, exc_type):
    """x, or exc_type raised for the item bad."""
    if x == bad:
        raise exc_type(x)
    return x


def distinct(items):
    """How many items, and how many distinct objects among them."""
    return len(items), len({id(item) for item in items})


def repeated(size, count):
    """One bytes object of size bytes, count times in a list."""
    return [b"r" * size] * count


def buffer_summary(buf):
    """What a task can do with a buffer it was given: its length, first item, last bytes."""
    return len(buf), buf[0], bytes(buf[-3:])


def view_summary(view):
    """A memoryview as a task sees it: format, shape, item size, values."""
    return view.format, view.shape, view.itemsize, view.tolist()


def byte_at(buf, i):
    """buf[i], for a share() handle's data (a memoryview in the task)."""
    return buf[i]


class ByteAt:
    """A callable instance holding a buffer: calls return buf[i]."""

    def __init__(self, buf):
        self.buf = buf

    def __call__(self, i):
        return self.buf[i]


def writable(arr):
    """Whether a task may write into the array it was given."""
    return arr.flags.writeable


def process_identity():
    """What a task sees of its process: multiprocessing's name for it and its parent, argv."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    alive = parent is not None and parent.is_alive()
    return multiprocessing.current_process().name, parent and parent.pid, alive, sys.argv


def _exit_on_load():
    sys.exit(3)


class ExitOnLoad:
    """Unpickling it raises SystemExit (CPython's test_exit_during_result_unpickle_in_result_handler)."""

    def __reduce__(self):
        return _exit_on_load, ()


def exit_on_load():
    return ExitOnLoad()
