"""`python -m gilfree diagnose [--trace OUT.json] [--svg OUT.svg] (script.py | -m module) [args...]`

Runs a program under exact GIL accounting (like ``python -m cProfile``) and prints the GIL
report and its verdict to stderr when the program ends: normally, by sys.exit, by an exception
or on Ctrl-C, once its non-daemon threads have finished. Where accounting is impossible the
program still runs, unmeasured.
"""
import optparse
import os
import runpy
import sys
import threading
import traceback

from . import gil
from .errors import UnsupportedInterpreter

USAGE = "%prog [--trace OUT.json] [--svg OUT.svg] [--sample-hz N] (script.py | -m module) [args...]"
MAX_SAMPLE_HZ = 1000.0
MIN_SAMPLE_HZ = 0.01  # the sampler waits 1/rate s between samples: slower never samples a run


def _parse(argv):
    # As in cProfile's main: options end at the script or module name, the rest is the program's.
    parser = optparse.OptionParser(usage=USAGE, prog="python -m gilfree diagnose")
    parser.allow_interspersed_args = False
    parser.add_option("--trace", metavar="OUT.json", help="write the timeline as Chrome trace JSON (Perfetto)")
    parser.add_option("--svg", metavar="OUT.svg", help="draw the timeline (held green, waiting red, free grey)")
    parser.add_option("--sample-hz", type="float", default=20.0, metavar="N",
                      help=f"stack samples of the GIL holder per second, 0 (off) or {MIN_SAMPLE_HZ:g} to {MAX_SAMPLE_HZ:g} (default 20)")
    parser.add_option("-m", dest="module", action="store_true", default=False, help="run a library module as a script")
    options, target = parser.parse_args(argv)
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


def _run(is_module, target):
    """Runs the program the way `python script.py` / `python -m module` would."""
    sys.argv = list(target)
    if is_module:
        sys.path.insert(0, os.getcwd())
        runpy.run_module(target[0], run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
        runpy.run_path(target[0], run_name="__main__")


def _end_threads():
    # What the interpreter does once the main module has finished: threading's atexit callbacks
    # (concurrent.futures' executors), the main thread marked finished, non-daemon threads joined.
    try:
        threading._shutdown()
    except KeyboardInterrupt as exc:  # a second Ctrl-C stops the wait; python reports it so
        print(f"Exception ignored in: {threading!r}", file=sys.stderr)
        traceback.print_exception(exc.with_traceback(exc.__traceback__.tb_next))


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
    try:
        m = gil.monitor(trace=True, sample_hz=options.sample_hz).__enter__()
    except UnsupportedInterpreter as exc:
        skipped = f"; {' and '.join(outputs)} not written" if outputs else ""
        print(f"gilfree diagnose: exact GIL accounting is unavailable here: {exc}\n"
              f"gilfree diagnose: running the program unmeasured{skipped}.", file=sys.stderr)
        m = None
    pid = os.getpid()
    code = 0
    try:
        _run(options.module, target)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        print("gilfree diagnose: interrupted", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    _end_threads()
    if m is None or os.getpid() != pid:  # a child the program forked ends without a report
        return code
    m.__exit__(None, None, None)
    print("\n" + str(m.report()), file=sys.stderr)
    for flag, write, what in (("--trace", m.write_trace, "timeline written to {} (open in https://ui.perfetto.dev)"),
                              ("--svg", m.write_svg, "picture written to {}")):
        if flag in outputs:
            try:
                write(outputs[flag])
                print("gilfree diagnose: " + what.format(outputs[flag]), file=sys.stderr)
            except OSError as exc:
                print(f"gilfree diagnose: cannot write {flag} {outputs[flag]}: {exc.strerror}", file=sys.stderr)
    return code
