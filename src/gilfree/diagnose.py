"""`python -m gilfree diagnose [--trace OUT.json] [--svg OUT.svg] (script.py | -m module) [args...]`

Runs a program under exact GIL accounting (like ``python -m cProfile``) and prints the GIL
report and its verdict to stderr when the program ends: normally, by sys.exit, by an exception
or on Ctrl-C. Where accounting is impossible the program still runs, unmeasured.
"""
import argparse
import os
import runpy
import sys
import threading

from . import gil
from .errors import UnsupportedInterpreter

USAGE = "python -m gilfree diagnose [--trace OUT.json] [--svg OUT.svg] [--sample-hz N] (script.py | -m module) [args...]"


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m gilfree diagnose", usage=USAGE)
    parser.add_argument("--trace", metavar="OUT.json", help="write the timeline as Chrome trace JSON (Perfetto)")
    parser.add_argument("--svg", metavar="OUT.svg", help="draw the timeline (held green, waiting red, free grey)")
    parser.add_argument("--sample-hz", type=float, default=20.0, help="stack samples of the GIL holder per second (0: off)")
    parser.add_argument("-m", dest="module", help="run a library module as a script")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args...] or module args")
    args = parser.parse_args(argv)
    if args.module is None and not args.target:
        parser.error("give a script or -m module")
    return args


def _run(args):
    """Runs the program the way `python script.py` / `python -m module` would."""
    if args.module is not None:
        sys.argv = [args.module, *args.target]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script, *rest = args.target
        sys.argv = [script, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


def _join_non_daemon_threads():
    # The interpreter would wait for them before exiting: they belong to the run.
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()


def main(argv):
    args = _parse(argv)
    try:
        m = gil.monitor(trace=True, sample_hz=args.sample_hz).__enter__()
    except UnsupportedInterpreter as exc:
        print(f"gilfree diagnose: exact GIL accounting is unavailable here: {exc}\n"
              f"gilfree diagnose: running the program unmeasured.", file=sys.stderr)
        m = None
    code = 0
    try:
        _run(args)
        _join_non_daemon_threads()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        print("gilfree diagnose: interrupted", file=sys.stderr)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        if m is not None:
            m.__exit__(None, None, None)
            report = m.report()
            print("\n" + str(report), file=sys.stderr)
            if args.trace:
                m.write_trace(args.trace)
                print(f"gilfree diagnose: timeline written to {args.trace} (open in https://ui.perfetto.dev)", file=sys.stderr)
            if args.svg:
                m.write_svg(args.svg)
                print(f"gilfree diagnose: picture written to {args.svg}", file=sys.stderr)
    return code
