"""Demo step: Beazley's messaging experiment (seed 003), 2,000 messages, with gilfree.priority.

One CPU-bound thread makes a Python echo server several times slower, because every I/O call
gives the GIL away and taking it back costs a switch interval; scenario 3 runs that thread in
``gilfree.priority.background()``. The experiment itself is bench/beazley.py.
"""
import importlib.util
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "beazley.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("beazley", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print("== Beazley's messaging experiment (seed 003): an echo server beside a CPU-bound thread")
    sys.exit(load_bench().main(["--messages", "2000"]))
