"""Task functions for the pool tests, importable by workers (they pickle by reference)."""
import ctypes
import os
import time


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def echo(x):
    return x


def pid(_=None):
    return os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def spin_forever():
    while True:
        pass


def segfault():
    ctypes.string_at(0)


def exit_hard(code):
    os._exit(code)


class Boom(ValueError):
    pass


def boom(x):
    raise Boom(f"boom {x}")


def boom_quietly(_):
    raise Boom("boom")


def fail_on(x, bad):
    if x == bad:
        raise Boom(f"bad item {x}")
    return x


def nbytes_and_type(buf):
    return type(buf).__name__, len(memoryview(buf).cast("B")), bytes(memoryview(buf).cast("B")[:4])


def array_sum(arr):
    return type(arr).__name__, int(arr.sum()), arr.flags.writeable


def grow_memory(mb):
    global _hog
    _hog = bytearray(mb << 20)
    return os.getpid()


_initialized = None


def init_marker(value):
    global _initialized
    _initialized = value


def hang_if_first(flag):
    """An initializer that hangs in the first worker to run it (a connect without a timeout)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    time.sleep(3600)


def initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


def stdin_identity(_=None):
    """(device, inode) of this process's descriptor 0."""
    st = os.fstat(0)
    return st.st_dev, st.st_ino


def nested_pool_sum(n):
    import gilfree

    with gilfree.Pool(2) as inner:
        return sum(inner.map(square, range(n)))


def raise_keyboard_interrupt(_=None):
    raise KeyboardInterrupt("raised by the task")


def sleep_if_slow(x):
    time.sleep(0.001 if x < 600 else 0.1)
    return x


def shared_array(handle):
    """The worker's view of a shared numpy array: (dtype, shape, values as a list)."""
    arr = handle.get() if hasattr(handle, "get") else handle
    return arr.dtype, arr.shape, arr.tolist()


def allocate_shared_result(mb):
    return bytes(mb << 20), os.getpid()


def worker_imports(name):
    import importlib

    return importlib.import_module(name).VALUE


def limit_address_space(nbytes):
    """An initializer capping the worker's address space (RLIMIT_AS), as ProcessPoolExecutor
    code caps a worker's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def allocated(nbytes):
    return len(bytearray(nbytes))


def allocate_under_address_limit(limit, nbytes):
    limit_address_space(limit)
    return allocated(nbytes)


_held = []


def exhaust_address_space(limit):
    """Caps RLIMIT_AS at limit, below what the worker has mapped, then holds every byte it can
    still allocate: nothing is left for the reply, as after a task that hit the cap."""
    limit_address_space(limit)
    try:
        while True:
            _held.append(bytearray(64))
    except MemoryError:
        pass
    return "done"


def many_buffers(n):
    """n distinct 64 KiB bytes: each goes out-of-band, by its own block."""
    return [os.urandom(16) * 4096 for _ in range(n)]


class Box:
    """A result that can be watched with a weakref."""

    def __init__(self, value):
        self.value = value


def boxed(x):
    return Box(x)


def log_to_then_fail(path):
    """An initializer that sends concurrent.futures' log to a file, then fails."""
    import logging

    logging.getLogger("concurrent.futures").addHandler(logging.FileHandler(path))
    raise ValueError("the initializer failed on purpose")
