"""gilfree.Pool against ProcessPoolExecutor, multiprocessing.Pool, loky and mpire (where they
install), 2 workers, one run. Each measurement runs in a fresh process so that peak RSS and
start-up belong to one pool alone. Prints one table; ratios are against ProcessPoolExecutor
(or serial / the target where the issue says so).

    python bench/bench_pool.py [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchtasks import countdown, first_byte, noop  # noqa: E402

WORKERS = 2
SETTLE_S = 3.0  # pause before each isolated measurement (see run_isolated)


# ---------------------------------------------------------------- contenders


class Contender:
    """Uniform face over the pools: submit/result, map, close."""

    def __init__(self, name):
        self.name = name
        self._apply_style = name in ("multiprocessing.Pool", "mpire")
        start = time.perf_counter()
        self.pool = self._make()
        self.result(self.submit(noop, 0))  # ready = can run a task
        self.ready_s = time.perf_counter() - start
        # Every worker up before anything is timed (pools may start workers lazily).
        for handle in [self.submit(noop, i) for i in range(20 * WORKERS)]:
            self.result(handle)

    def _make(self):
        if self.name == "gilfree":
            import gilfree

            return gilfree.Pool(WORKERS)
        if self.name == "ProcessPoolExecutor":
            from concurrent.futures import ProcessPoolExecutor

            return ProcessPoolExecutor(WORKERS)
        if self.name == "multiprocessing.Pool":
            import multiprocessing

            return multiprocessing.Pool(WORKERS)
        if self.name == "loky":
            import loky

            return loky.get_reusable_executor(max_workers=WORKERS)
        if self.name == "mpire":
            import mpire

            pool = mpire.WorkerPool(n_jobs=WORKERS)
            pool.__enter__()
            return pool
        raise ValueError(self.name)

    def submit(self, fn, *args):
        if self._apply_style:
            return self.pool.apply_async(fn, args)
        return self.pool.submit(fn, *args)

    def result(self, handle):
        # By name, not hasattr: a failed attribute lookup costs about a microsecond per call.
        return handle.get() if self._apply_style else handle.result()

    def map(self, fn, items):
        if self.name == "multiprocessing.Pool":
            return self.pool.map(fn, items)  # its own chunking: len / (4 * workers)
        if self.name == "mpire":
            import mpire

            # mpire's map fails on a pool that already ran apply_async: a fresh pool, whose
            # start-up (about 0.1 s) is then part of its time.
            with mpire.WorkerPool(n_jobs=WORKERS) as fresh:
                return fresh.map(fn, items)
        if self.name == "gilfree":
            return self.pool.map(fn, items)
        return self.pool.map(fn, items, chunksize=10_000)

    def close(self):
        start = time.perf_counter()
        if self.name == "multiprocessing.Pool":
            self.pool.close()
            self.pool.join()
        elif self.name == "mpire":
            self.pool.__exit__(None, None, None)
        elif self.name == "loky":
            self.pool.shutdown(wait=True, kill_workers=True)
        else:
            self.pool.shutdown(wait=True)
        return time.perf_counter() - start


def round_trip_s(c, fn, arg, n):
    """Seconds per submit(fn, arg).result(), after a warm-up."""
    for _ in range(200):
        c.result(c.submit(fn, arg))
    start = time.perf_counter()
    for _ in range(n):
        c.result(c.submit(fn, arg))
    return (time.perf_counter() - start) / n


def measure(name, which, quick):
    """Runs one benchmark for one contender; returns a dict of numbers."""
    import resource

    import numpy as np

    c = Contender(name)
    out = {}
    if which == "roundtrip":
        out["us"] = round_trip_s(c, noop, 0, 500 if quick else 3000) * 1e6
    elif which == "burst":
        n = 20_000
        start = time.perf_counter()
        handles = [c.submit(noop, i) for i in range(n)]
        for h in handles:
            c.result(h)
        out["tasks_s"] = n / (time.perf_counter() - start)
    elif which == "map":
        n = 200_000 if quick else 2_000_000
        items = range(n) if name == "gilfree" else list(range(n))
        start = time.perf_counter()
        count = sum(1 for _ in c.map(noop, items))
        assert count == n
        out["items_s"] = n / (time.perf_counter() - start)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elif which in ("bytes100", "numpy100"):
        size = 100 << 20
        data = os.urandom(size) if which == "bytes100" else np.frombuffer(os.urandom(size), np.uint8)
        rounds = 2 if quick else 5
        c.result(c.submit(noop, data))
        start = time.perf_counter()
        for _ in range(rounds):
            back = c.result(c.submit(noop, data))
        out["ms"] = (time.perf_counter() - start) / rounds * 1e3
        assert len(back) == size
    elif which == "share":
        data = os.urandom(100 << 20)
        out["ms"] = round_trip_s(c, first_byte, c.pool.share(data), 200) * 1e3
    elif which == "countdown":
        total = 50_000_000
        start = time.perf_counter()
        handles = [c.submit(countdown, total // WORKERS) for _ in range(WORKERS)]
        for h in handles:
            c.result(h)
        out["s"] = time.perf_counter() - start
    out["ready_ms"] = c.ready_s * 1e3
    out["shutdown_ms"] = c.close() * 1e3
    return out


def run_isolated(name, which, quick):
    # The machine settles first: right after a measurement that freed gigabytes (the 100 MB
    # rounds), the next one ran about 10% slower on this machine (countdown 0.68-0.70 s against
    # 0.61-0.63 s after a pause), and every group starts with the same contender.
    time.sleep(SETTLE_S)
    proc = subprocess.run(
        [sys.executable, __file__, "--one", name, which] + (["--quick"] if quick else []),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serial_countdown():
    """The seeds' single-threaded countdown, the anchor of benchmark 5.

    The loop's speed depends on where CPython's allocator puts its ints: on this machine
    countdown(5M) took 0.62 s in a process and 0.41 s in the same process once 7 more small
    ints were alive, in a pool worker as in the serial parent. multiprocessing.Pool's workers
    are forks of this process and share its heap, hence its speed; other pools' workers
    (gilfree's template children, loky's) draw their own."""
    start = time.perf_counter()
    countdown(50_000_000)
    return time.perf_counter() - start


def available(name):
    module = {"loky": "loky", "mpire": "mpire"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.quick)))
        return

    names = [n for n in ("gilfree", "ProcessPoolExecutor", "multiprocessing.Pool", "loky", "mpire") if available(n)]
    print(f"# bench_pool: {WORKERS} workers, CPython {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    rows = {}
    # The countdown goes first: after the 100 MB rounds free gigabytes, CPU-bound work on this
    # machine ran about 10% slower for a while, longer than SETTLE_S.
    for which in ("countdown", "roundtrip", "burst", "map", "bytes100", "numpy100"):
        for name in names:
            rows[(which, name)] = run_isolated(name, which, args.quick)
    rows[("share", "gilfree")] = run_isolated("gilfree", "share", args.quick)
    serial = serial_countdown()

    def cell(which, name, key, fmt):
        r = rows.get((which, name), {})
        return fmt.format(r[key]) if key in r else r.get("error", "-")[:18]

    def ratio(which, key, better="lower"):
        g, p = rows[(which, "gilfree")].get(key), rows[(which, "ProcessPoolExecutor")].get(key)
        if g is None or p is None:
            return "-"
        return f"{(p / g if better == 'lower' else g / p):.1f}x"

    table = [
        ("1. submit().result() round trip (us)", "roundtrip", "us", "{:.1f}", "lower", "15x, <=10 us"),
        ("2. 20,000 submits then results (tasks/s)", "burst", "tasks_s", "{:,.0f}", "higher", "20x"),
        ("3. map of 2,000,000 trivial items (items/s)", "map", "items_s", "{:,.0f}", "higher", ">= mp.Pool"),
        ("3. map peak RSS (MB)", "map", "peak_rss_mb", "{:.0f}", "lower", "bounded"),
        ("4. 100 MB bytes arg returned (ms)", "bytes100", "ms", "{:.1f}", "lower", "30x"),
        ("4. 100 MB numpy arg returned (ms)", "numpy100", "ms", "{:.1f}", "lower", "30x"),
        ("5. countdown 50M over 2 workers (s)", "countdown", "s", "{:.2f}", "lower", "1.9x serial"),
        ("6. pool ready, 2 workers (ms)", "roundtrip", "ready_ms", "{:.0f}", "lower", "<100 ms"),
        ("6. pool shutdown (ms)", "roundtrip", "shutdown_ms", "{:.0f}", "lower", "<100 ms"),
    ]
    header = ["benchmark", *names, "gilfree vs PPE", "goal"]
    lines = [header]
    for label, which, key, fmt, better, goal in table:
        lines.append([label, *[cell(which, n, key, fmt) for n in names], ratio(which, key, better), goal])
    share = rows[("share", "gilfree")]
    lines.append(["4. share(): task reaching 100 MB (ms)", f"{share.get('ms', float('nan')):.3f}",
                  *["n/a"] * (len(names) - 1), "-", "<1 ms"])
    cd = rows[("countdown", "gilfree")].get("s")
    lines.append(["5. countdown serial (s) / gilfree speed-up", f"{serial:.2f}",
                  *["" for _ in names[1:]], f"{serial / cd:.2f}x" if cd else "-", ">=1.9x"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    for i, row in enumerate(lines):
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
