"""`python -m gilfree diagnose [--trace OUT.json] [--svg OUT.svg] [--sample-hz N] (script.py | -m module) [args...]`

Runs a program under exact GIL accounting (like ``python -m cProfile``) and prints the GIL
report and its verdict to stderr when the program ends: normally, by sys.exit, by an exception
or on Ctrl-C, once its non-daemon threads have finished; on SIGTERM (timeout, docker stop,
systemd), unless the program handles it, at once, and the process then dies of the signal.
Where accounting is impossible the program still runs, unmeasured.

The program runs as under ``python``: its own ``__main__`` module (also ``__mp_main__``, for
multiprocessing), ``sys.argv``, ``sys.path[0]``, ``__file__``, ``sys.excepthook`` and exit status.
"""
import _signal  # built in: `import signal` would take the name from a program with a signal.py
import argparse
import builtins
import importlib
import io
import os
import runpy
import sys
import threading
import types
from importlib.machinery import SourceFileLoader
from pkgutil import get_importer

from . import gil

# Imported before the program only when asked for: after it, `import json` could find its own
# json.py. Anything else imported here is one module name fewer for the program (docs/gil.md).
WRITERS_IMPORT = {"--trace": ("json",), "--svg": ("html", "textwrap")}

USAGE = "%(prog)s [--trace OUT.json] [--svg OUT.svg] [--sample-hz N] (script.py | -m module) [args...]"
MAX_SAMPLE_HZ = 1000.0
MIN_SAMPLE_HZ = 0.01  # the sampler waits 1/rate s between samples: slower never samples a run


def _parse(argv):
    # As in cProfile's main: options end at the script or module name, the rest is the program's.
    # argparse, not optparse: optparse imports textwrap, a name the program may use for its own.
    parser = argparse.ArgumentParser(usage=USAGE, prog="python -m gilfree diagnose")
    parser.add_argument("--trace", metavar="OUT.json", help="write the timeline as Chrome trace JSON (Perfetto)")
    parser.add_argument("--svg", metavar="OUT.svg", help="draw the timeline (held green, waiting red, free grey)")
    parser.add_argument("--sample-hz", type=float, default=20.0, metavar="N",
                        help=f"stack samples of the GIL holder per second, 0 (off) or {MIN_SAMPLE_HZ:g} to {MAX_SAMPLE_HZ:g} (default 20)")
    parser.add_argument("-m", dest="module", action="store_true", default=False, help="run a library module as a script")
    parser.add_argument("target", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    target = options.target[1:] if options.target[:1] == ["--"] else options.target  # kept by some versions
    if not target:
        parser.error("give a script or -m module")
    if options.sample_hz != 0 and not MIN_SAMPLE_HZ <= options.sample_hz <= MAX_SAMPLE_HZ:  # also refuses nan
        parser.error(f"--sample-hz: 0 (off) or {MIN_SAMPLE_HZ:g} to {MAX_SAMPLE_HZ:g}, not {options.sample_hz}")
    return options, target


def _writable(path):
    """The absolute path (the program may chdir); raises OSError now if it cannot be written."""
    path = os.path.abspath(path)
    existed = os.path.exists(path)
    with open(path, "a"):
        pass
    if not existed:
        os.remove(path)
    return path


def _put_first(entry, even_safe=False):
    # python puts the program's location first; here that slot holds gilfree's own launcher
    # entry, unless -P / PYTHONSAFEPATH kept python from adding one.
    if not sys.flags.safe_path:
        sys.path[0] = entry
    elif even_safe:
        sys.path.insert(0, entry)


def _locate(is_module, name):
    """The program's (code, spec), found as `python` finds it, sys.path[0] set on the way; if it
    cannot be found, exits with python's message and status."""
    try:
        if is_module:
            _put_first(os.getcwd())
            _, spec, code = runpy._get_module_details(name, runpy._Error)
            return code, spec
        path = os.path.join(os.getcwd(), name)  # python's __file__: absolute, as typed otherwise
        if get_importer(path) is not None:  # a directory or zip file: python runs its __main__ module
            _put_first(path, even_safe=True)
            _, spec, code = runpy._get_main_module_details(runpy._Error)
            return code, spec
        _put_first(os.path.dirname(os.path.realpath(path)))
        try:
            with io.open_code(path) as f:
                source = f.read()
        except OSError as exc:
            print(f"{sys.orig_argv[0]}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}", file=sys.stderr)
            sys.exit(2)
        return compile(source, path, "exec", dont_inherit=True), None
    except runpy._Error as exc:
        sys.exit(f"{sys.executable}: {exc}")  # as runpy._run_module_as_main, which python -m runs
    except SyntaxError as exc:
        sys.excepthook(type(exc), exc.with_traceback(None), None)  # python shows no traceback for it
        sys.exit(1)


def _report_then_die(report):
    """A SIGTERM handler: report() (the GIL report), then death by the signal, running none of
    the program's clean-up (finally blocks, with blocks, exit hooks), as under python."""
    pid = os.getpid()

    def on_sigterm(signum, frame):
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        if os.getpid() == pid:  # not a child forked with this handler: it only dies
            report()
        os.kill(os.getpid(), _signal.SIGTERM)

    return on_sigterm


def _exit_status(exc):
    """The exit status python gives a SystemExit, printing its message if it is not a number."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    try:
        print(exc.code, file=sys.stderr)
    except (OSError, ValueError):  # python ignores a stderr it cannot write to
        pass
    return 1


def _run(code, spec, main):
    """Runs the program in module `main`; returns its exit status, having shown its error as python would."""
    try:
        if spec is None:
            main.__file__, main.__cached__ = code.co_filename, None
            main.__loader__ = SourceFileLoader("__main__", code.co_filename)
            exec(code, vars(main))
        else:
            runpy._run_code(code, vars(main), None, "__main__", spec)
    except SystemExit as exc:
        return _exit_status(exc)
    except BaseException as exc:
        # Cut diagnose's and runpy's frames: python shows none above the program's.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code is not code:
            tb = tb.tb_next
        exc.__traceback__ = tb or exc.__traceback__
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _end_threads():
    # What the interpreter does once the main module has finished: threading's atexit callbacks
    # (concurrent.futures' executors), the main thread marked finished, non-daemon threads joined.
    try:
        threading._shutdown()
    except KeyboardInterrupt as exc:  # a second Ctrl-C stops the wait; python reports it so
        import traceback

        print(f"Exception ignored in: {threading!r}", file=sys.stderr)
        traceback.print_exception(exc.with_traceback(exc.__traceback__.tb_next))


def _real_stderr():
    """The process's stderr, even if the program closed or replaced sys.stderr (None if fd 2 is closed)."""
    if sys.__stderr__ is not None and not sys.__stderr__.closed:
        return sys.__stderr__
    try:
        return open(2, "w", errors="backslashreplace", closefd=False)
    except OSError:
        return None


def _tell(err, text):
    # With stderr closed (2>&-, os.close(2)) the report is lost; the exit status stays the program's.
    if err is not None:
        try:
            print(text, file=err, flush=True)
        except (OSError, ValueError):
            pass


def main(argv):
    options, target = _parse(argv)
    outputs = {}
    for flag, path in (("--trace", options.trace), ("--svg", options.svg)):
        if path is not None:
            try:
                outputs[flag] = _writable(path)
            except OSError as exc:
                print(f"gilfree diagnose: cannot write {flag} {path}: {exc.strerror}", file=sys.stderr)
                return 2
    for flag in outputs:
        for name in WRITERS_IMPORT[flag]:
            importlib.import_module(name)
    # The program gets a fresh __main__ that stays until the process ends, as under python, so
    # its classes pickle also from threads still running after its body; multiprocessing's
    # __mp_main__ alias (set when gilfree imported it) must point there too.
    main_module = types.ModuleType("__main__")
    main_module.__builtins__ = builtins
    main_module.__annotations__ = {}  # python's __main__ has it, annotations or not
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main_module
    sys.argv = ["-m" if options.module else target[0], *target[1:]]  # python's argv while it looks for a module
    code, spec = _locate(options.module, target[0])
    if options.module:
        sys.argv[0] = spec.origin
    try:
        m = gil.monitor(trace=True, sample_hz=options.sample_hz).__enter__()
    except gil.UnsupportedInterpreter as exc:  # looked up (gilfree.errors imported) only if one is raised
        skipped = f"; {' and '.join(outputs)} not written" if outputs else ""
        print(f"gilfree diagnose: exact GIL accounting is unavailable here: {exc}\n"
              f"gilfree diagnose: running the program unmeasured{skipped}.", file=sys.stderr)
        m = None
    pid = os.getpid()
    on_sigterm = None
    # A program that handles SIGTERM itself replaces this handler when it sets its own.
    if m is not None and _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
        on_sigterm = _report_then_die(lambda: _report(m, outputs))
        _signal.signal(_signal.SIGTERM, on_sigterm)
    status = _run(code, spec, main_module)
    _end_threads()
    if on_sigterm is not None and _signal.getsignal(_signal.SIGTERM) is on_sigterm:
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    if m is None or os.getpid() != pid:  # a child the program forked ends without a report
        return status
    _report(m, outputs)
    return status


def _report(m, outputs):
    """Ends the monitor m and prints its report, and writes the --trace and --svg outputs."""
    m.__exit__(None, None, None)
    err = _real_stderr()
    _tell(err, "\n" + str(m.report()))
    for flag, write, what in (("--trace", m.write_trace, "timeline written to {} (open in https://ui.perfetto.dev)"),
                              ("--svg", m.write_svg, "picture written to {}")):
        if flag in outputs:
            try:
                write(outputs[flag])
                _tell(err, "gilfree diagnose: " + what.format(outputs[flag]))
            except OSError as exc:
                _tell(err, f"gilfree diagnose: cannot write {flag} {outputs[flag]}: {exc.strerror}")
