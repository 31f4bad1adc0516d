"""The template process and the worker loop.

The parent starts the template with ``python -c "...template_main()" memfd doorbell ctl nslots
config_fd *sys_path``; config_fd is a memfd holding the pickled WorkerConfig (no size limit,
unlike an argument). The template imports what the pool preloads and then serves fork requests
(``_engine.serve_template``, in C); each forked child returns from it with its slot number and
runs ``worker_main``.
"""
import importlib
import os
# _pickle, not pickle: the pure-Python module pulls in `re`, slowing worker start-up.
import _pickle as pickle
import signal
import sys
import time

from . import _engine
from ._serialize import (
    Codec,
    install_main,
    load_function,
    round_trip,
    share_module_globals,
    unpickled_function,
)

# A worker that just finished a task polls briefly for the next one before sleeping.
NEXT_TASK_SPIN_S = 50e-6
# A worker's exit code when an address-space limit (RLIMIT_AS, ulimit -v) below what the pool's
# shared memory takes in it leaves it unable to map that memory or to send a reply: the parent
# names the limit instead of reporting a failing initializer or a bare crash.
EXIT_ADDRESS_SPACE = 86


class WorkerConfig:
    """What every worker of a pool is started with."""

    def __init__(self, initializer, initargs, max_tasks, max_memory, preload, task_timeout):
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.preload = preload
        self.task_timeout = task_timeout
        # Made in the parent at Pool() time: what a worker presents as its program and parent.
        self.argv = list(sys.argv)
        self.parent_pid = os.getpid()
        process = sys.modules.get("multiprocessing.process")
        self.parent_name = process.current_process().name if process else "MainProcess"
        # A Manager() proxy a task receives connects with this key, as in a spawned child.
        self.parent_authkey = bytes(process.current_process().authkey) if process else None
        self.main_file = getattr(sys.modules.get("__main__"), "__file__", None)


def template_main():
    memfd, doorbell, ctl, nslots, config_fd = (int(x) for x in sys.argv[1:6])
    with open(config_fd, "rb") as file:
        config = pickle.load(file)
    sys.argv = config.argv
    install_main(config.main_file)
    # Before the fork: every worker starts with the initializer on its module's shared globals.
    config.initializer = share_module_globals(config.initializer)
    # The template runs in its own session; Ctrl-C belongs to the user's program.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stdin_from_devnull((memfd, doorbell, ctl))
    _stdout_line_buffered()
    _present_as("gilfree-template", config)
    _preload(config.preload, ctl)
    slot = _engine.serve_template(ctl, nslots)
    if slot is None:
        _exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _present_as(f"gilfree-worker-{slot}", config)
    _exit(worker_main(memfd, slot, config))


def _exit(code):
    """Ends the process on purpose: os._exit skips the flush of Python's stream buffers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed, broken or replaced by None: nothing more to say
            pass
    os._exit(code)


def _stdout_line_buffered():
    """A pipe or file stdout is block-buffered, and the template kills idle workers with SIGKILL
    at shutdown: each line goes out when printed, as on a terminal, at no cost to tasks that do
    not print (stderr is line-buffered already)."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:  # None, or replaced by something without reconfigure
        pass


# (name, the parent's pid, its multiprocessing name, a pidfd of it or None, its authkey or None)
# for _apply_identity.
_identity = []


def _present_as(name, config):
    """multiprocessing sees this process as a child named name of the pool's parent, as in a
    ProcessPoolExecutor worker (not as 'MainProcess', which code guards "main process only"
    work with). Applied when multiprocessing is imported: importing it here would add
    milliseconds to every pool's start."""
    if not _identity:
        try:
            pidfd = os.pidfd_open(config.parent_pid)
        except (AttributeError, OSError):  # before Linux 5.3: no sentinel, no parent_process()
            pidfd = None
        if pidfd is not None and os.getppid() != config.parent_pid:  # its pid was reused
            os.close(pidfd)
            pidfd = None
        _identity[:] = [name, config.parent_pid, config.parent_name, pidfd, config.parent_authkey]
    _identity[0] = name
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        _apply_identity(process)
    elif not any(type(finder) is _ImportHook for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def _apply_identity(process):
    name, parent_pid, parent_name, pidfd, authkey = _identity
    process.current_process().name = name
    process.current_process()._parent_pid = parent_pid
    if authkey is not None:
        process.current_process().authkey = authkey
    if pidfd is not None:  # readable once the parent dies, as multiprocessing's sentinels
        process._parent_process = process._ParentProcess(parent_name, parent_pid, pidfd)


class _ImportHook:
    """Applies _identity when multiprocessing.process is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "multiprocessing.process":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None:
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                _apply_identity(module)

            spec.loader.exec_module = run
        return spec


def _preload(modules, ctl):
    """Imports modules, exiting if the parent closes the control socket meanwhile (it died, or
    closed the pool): serve_template, which watches it afterwards, may be a long import away.
    A thread watches (the template is single-threaded again before it forks); not
    PR_SET_PDEATHSIG, which follows the parent's thread that started the template."""
    if not modules:
        return
    import _thread
    import select

    stop_r, stop_w = os.pipe()
    stopped = _thread.allocate_lock()
    stopped.acquire()

    def watch():
        try:
            poller = select.poll()
            poller.register(ctl, select.POLLRDHUP)  # a hang-up only: spawn requests wait
            poller.register(stop_r, select.POLLIN)
            if any(fd == ctl for fd, _ in poller.poll()):
                os._exit(1)
        finally:
            stopped.release()

    _thread.start_new_thread(watch, ())
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        os.write(stop_w, b"x")
        stopped.acquire()
        os.close(stop_r)
        os.close(stop_w)


def _stdin_from_devnull(pool_fds):
    """Workers read /dev/null: the user's input is the parent's (as in multiprocessing).
    Descriptor 0 stays open, or a pool started in a worker would get it for its memfd; it is
    left alone when it is one of this pool's (the parent had no stdin)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 0 and 0 not in pool_fds:
        os.dup2(fd, 0)
        os.close(fd)
        fd = 0
    sys.stdin = open(fd, encoding="utf-8", closefd=False)


def _error(exc):
    """(exception, traceback text) for the caller. An exception that does not survive pickling
    and unpickling (say its __init__ takes other arguments than its args) would reach the caller
    as that failure: a RuntimeError naming it, with its message, goes instead."""
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        round_trip(exc)
    except Exception as problem:
        what = "".join(traceback.format_exception_only(exc)).strip()
        exc = RuntimeError(
            f"{what} (the exception cannot travel back to this process: "
            f"{type(problem).__name__}: {problem})"
        )
    return exc, text


def worker_main(memfd, slot, config):
    if config.initializer is not None:
        try:
            config.initializer(*config.initargs)
        except BaseException:
            import logging

            # As a ProcessPoolExecutor worker: a handler the initializer installed gets it.
            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            return 1
    try:
        worker = _engine.Worker(memfd, slot)
    except OSError as exc:
        import errno

        if exc.errno != errno.ENOMEM:
            raise
        return _out_of_address_space(memfd, "map the pool's shared memory")
    try:
        return _serve(worker, memfd, config)
    except (MemoryError, SystemError):
        # Not a task's (it goes back as its error): its reply could not be made or sent. Out of
        # address space, 3.13 may raise a SystemError instead (formatting the task's traceback).
        if _address_space_limit() is None:
            raise
        return _out_of_address_space(memfd, "send a task's outcome")


def _address_space_limit():
    """This process's RLIMIT_AS soft limit in bytes, or None when there is none (or resource
    cannot be imported: address space exhausted)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except Exception:
        return None
    return None if limit == resource.RLIM_INFINITY else limit


def _below_shared_memory(memfd):
    """True when the address-space limit is below what the pool's shared memory takes."""
    limit = _address_space_limit()
    return limit is not None and limit < os.fstat(memfd).st_size


def _out_of_address_space(memfd, what):
    """Says on stderr that the address-space limit keeps this worker from working; returns the
    exit code that tells the parent so."""
    try:
        limit = _address_space_limit()
        needed = os.fstat(memfd).st_size
        print(
            f"gilfree worker {os.getpid()}: cannot {what} under its address-space limit "
            f"(RLIMIT_AS, ulimit -v{'' if limit is None else f' = {limit >> 20} MiB'}): the "
            f"pool's shared memory takes {needed >> 20} MiB of address space (not memory) in "
            "every worker. Cap a worker's memory with Pool(max_memory_per_worker=...) instead",
            file=sys.stderr,
        )
    except Exception:  # no memory left to say it: the parent's error says it
        pass
    return EXIT_ADDRESS_SPACE


def _serve(worker, memfd, config):
    codec = Codec(worker)
    on_item = worker.item_started if config.task_timeout else None  # per-item deadlines
    pid = os.getpid()
    done = 0
    while True:
        task = worker.next(NEXT_TASK_SPIN_S)
        if task is None:
            return 0  # the template is gone
        task_id, (kind, head, body, views) = task
        del task  # else its views keep the arguments' blocks until the next task
        count = 1
        out_of_memory = False  # the task (or a chunk's item) raised MemoryError
        try:
            if head is None:  # the function came with the arguments: see function_blob
                args = Codec.loads(body, views)
                fn = unpickled_function(args[2])
            else:
                fn = load_function(head)
                args = Codec.loads(body, views)
            del body, views
            if kind == _engine.MSG_CHUNK:
                count = len(args[0])
                result = run_chunk(fn, args[0], args[1], on_item)
                out_of_memory = result[1] is not None and isinstance(result[1][0], MemoryError)
            else:
                result = fn(*args[0], **args[1])
            del fn, args
            if os.getpid() != pid:
                _end_forked_child(None)
            try:
                data, refs = codec.dumps(result)
                ok = True
            except Exception as exc:
                ok = kind == _engine.MSG_CHUNK  # a chunk's error travels in its result
                if ok:
                    data, refs = codec.dumps(_cut_chunk(codec, result, exc))
                else:
                    data, refs = codec.dumps(_error(exc))
            del result
        except BaseException as exc:
            body = views = fn = args = result = None  # let the arguments go now, as on success
            if os.getpid() != pid:
                _end_forked_child(exc)
            data, refs = codec.dumps(_error(exc))
            ok = False
            out_of_memory = isinstance(exc, MemoryError)
            exc.__traceback__ = None  # its frames hold the arguments (and the task's locals)
            del exc
        # Unmaps the arguments' bytes that nothing holds now, before the parent hears the task
        # is done: its next argument can then take their block.
        worker.scan()
        try:
            worker.reply(task_id, ok, data, refs)
        except (MemoryError, ValueError) as exc:
            # The pickle itself did not fit in the arena, or the result holds more out-of-band
            # buffers than a message can (reply released the buffers it had): the task fails
            # with that error, and the worker goes on.
            data, refs = codec.dumps(_error(exc))
            worker.reply(task_id, False, data, refs)
        del data, refs
        if out_of_memory and _below_shared_memory(memfd):
            # The task capped RLIMIT_AS below what is mapped: this worker cannot allocate
            # anything more. It has replied; a fresh one takes its place.
            worker.retire()
            return 0
        done += count  # a map chunk counts its items
        if (config.max_tasks and done >= config.max_tasks) or (
            config.max_memory and _engine.rss() > config.max_memory
        ):
            worker.retire()
            return 0


def _end_forked_child(exc):
    """In a process a task forked (os.fork) that came back out of the task: the rings and the
    task are the worker's, so it ends here, as a script would with exc (None: returned)."""
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    elif exc is not None:
        import traceback

        traceback.print_exception(exc)
        code = 1
    _exit(code or 0)


def _cut_chunk(codec, chunk, exc):
    """A chunk whose results do not pickle (exc): the results before the first that does not,
    then its error, as a map over single items ends."""
    results, _, elapsed = chunk
    for i, value in enumerate(results):
        try:
            codec.release(codec.dumps(value)[1])
        except Exception as item_exc:
            return results[:i], _error(item_exc), elapsed
    return [], _error(exc), elapsed  # each pickles alone (too deep together, say)


def run_chunk(fn, items, star, on_item=None):
    """Runs fn over items in order (fn(*item) when star), calling on_item() before each one.
    Returns (results, error, elapsed): error is None or (exception, traceback text) for the
    first item that raised: any exception, as in a single task (SystemExit, KeyboardInterrupt
    raised by fn; a Ctrl-C never reaches workers, which ignore SIGINT)."""
    results = []
    append = results.append
    start = time.perf_counter()
    try:
        if on_item is not None:
            for item in items:
                on_item()
                append(fn(*item) if star else fn(item))
        elif star:
            for item in items:
                append(fn(*item))
        else:
            for item in items:
                append(fn(item))
    except BaseException as exc:
        return results, _error(exc), time.perf_counter() - start
    return results, None, time.perf_counter() - start
