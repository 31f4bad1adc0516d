"""Seeds 002 and 004: the countdown experiment. One CPU-bound job of 50,000,000 decrements, run
serially, on 2 threads (the GIL lets only one run at a time), with multiprocessing.Pool, and
with gilfree.Pool. Prints one table with speed-ups against serial."""
import multiprocessing
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import gilfree  # noqa: E402
from benchtasks import countdown  # noqa: E402

COUNT = 50_000_000
PARTS = 2


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def serial():
    countdown(COUNT)


def threads():
    workers = [threading.Thread(target=countdown, args=(COUNT // PARTS,)) for _ in range(PARTS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def mp_pool():
    with multiprocessing.Pool(PARTS) as pool:
        pool.map(countdown, [COUNT // PARTS] * PARTS)


def gilfree_pool():
    with gilfree.Pool(PARTS) as pool:
        list(pool.map(countdown, [COUNT // PARTS] * PARTS, chunksize=1))


def main():
    cpus = len(os.sched_getaffinity(0))
    print(f"\n== Countdown of {COUNT:,} (seeds 002/004), {PARTS} parts, {cpus} CPUs, "
          f"CPython {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f} at start")
    rows = [("serial", timed(serial))]
    rows.append((f"{PARTS} threads", timed(threads)))
    rows.append((f"multiprocessing.Pool({PARTS})", timed(mp_pool)))
    rows.append((f"gilfree.Pool({PARTS})", timed(gilfree_pool)))
    base = rows[0][1]
    print(f"{'how':<26} {'seconds':>8} {'speed-up':>9}")
    for name, seconds in rows:
        print(f"{name:<26} {seconds:>8.2f} {base / seconds:>8.2f}x")
    speedups = {name: base / seconds for name, seconds in rows}
    processes = min(speedups[f"multiprocessing.Pool({PARTS})"], speedups[f"gilfree.Pool({PARTS})"])
    print(f"Threads: {speedups[f'{PARTS} threads']:.2f}x, one GIL for both. Processes, each with its own GIL: "
          f"{processes:.2f}x or more, each pool's start-up and shutdown included.")
    if processes < 0.8 * min(PARTS, cpus):
        print(f"Processes gained less than the {min(PARTS, cpus)} CPUs allow: other work took CPU meanwhile "
              f"(load average {os.getloadavg()[0]:.2f} at end).")


if __name__ == "__main__":
    main()
