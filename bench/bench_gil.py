"""gilfree.gil against ground truth, gil_load and py-spy; and its overhead.

Prints two tables:
1. What each tool reports on controlled workloads, beside the ground truth the workloads
   measure themselves (held = fraction of the wall time the GIL was held; wait = the named
   thread's fraction of the wall time spent waiting for it).
2. The overhead of accounting: wall time with gilfree.gil.monitor() on / off (median of runs,
   alternated), as a ratio against the unmonitored anchor of the same run.

Each measurement runs in a fresh interpreter: `python bench/bench_gil.py --run WORKLOAD MODE`.
gil_load needs LD_PRELOAD (`python -m gil_load`), py-spy samples from outside (`py-spy record`).
"""
import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)


# -- workloads: each returns (wall seconds, ground truth dict) --------------------------------

NAMES = {}  # ident and native id -> thread name, kept after the threads end (for gil_load)


def register():
    NAMES[threading.get_ident()] = NAMES[threading.get_native_id()] = threading.current_thread().name


def cpu_loop(total_s, running):
    """Pure Python for total_s, appending the stretches it ran (stalls over 200 us split them)."""
    register()
    start = last = since = time.perf_counter()
    while last - start < total_s:
        now = time.perf_counter()
        if now - last > 200e-6:
            running.append((since, last))
            since = now
        last = now
    running.append((since, last))


def overlap(spans, others):
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in spans for c, d in others)


def cpu2():
    """Two CPU-bound threads. Truth of cpu0's wait: at least the time it stalled while cpu1 ran,
    at most all its stalls (the OS on a shared machine also stalls it)."""
    running = [[], []]
    threads = [threading.Thread(target=cpu_loop, args=(0.8, running[i]), name=f"cpu{i}") for i in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    gaps = [(a[1], b[0]) for a, b in zip(running[0], running[0][1:])]
    low, high = overlap(gaps, running[1]) / wall, sum(b - a for a, b in gaps) / wall
    return wall, {"held": 1.0, "thread": "cpu0", "wait": (low, high)}


def duty():
    """One thread: busy 3 ms (holding the GIL), sleep 7 ms, for 1 s. Truth: its measured busy time."""
    held = [0.0]

    def run():
        register()
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.003:
                pass
            held[0] += time.perf_counter() - t0
            time.sleep(0.007)

    t = threading.Thread(target=run, name="duty")
    start = time.perf_counter()
    t.start()
    t.join()
    wall = time.perf_counter() - start
    return wall, {"held": held[0] / wall, "thread": "duty", "wait": 0.0}


def _echo_client(sock, count, pause):
    for _ in range(count):
        sock.sendall(struct.pack("=d", time.monotonic()))
        got = b""
        while len(got) < 8:
            got += sock.recv(8 - len(got))
        if pause:
            time.sleep(pause)
    sock.sendall(struct.pack("=d", -1.0))


def _echo_server(sock, waits):
    register()
    while True:
        before = time.monotonic()
        data = b""
        while len(data) < 8:
            data += sock.recv(8 - len(data))
        after = time.monotonic()
        (stamp,) = struct.unpack("=d", data)
        if stamp < 0:
            return
        waits.append(after - max(stamp, before))
        before = time.monotonic()
        sock.sendall(data)
        waits.append(time.monotonic() - before)


def cpu_echo():
    """A CPU thread beside an echo server thread; the client is another process (1 ms pause).
    Truth for the echo thread's wait: from its data's arrival (client stamp) to recv's return,
    and its sends (an upper bound: includes the socket's own microseconds)."""
    server, client = socket.socketpair()
    proc = subprocess.Popen([sys.executable, HERE, "--client", str(client.fileno()), "300", "0.001"], pass_fds=[client.fileno()])
    client.close()
    waits, stop = [], threading.Event()

    def cpu():
        register()
        while not stop.is_set():
            pass

    c = threading.Thread(target=cpu, name="cpu")
    e = threading.Thread(target=_echo_server, args=(server, waits), name="echo")
    start = time.perf_counter()
    c.start()
    e.start()
    e.join()
    stop.set()
    c.join()
    wall = time.perf_counter() - start
    proc.wait()
    return wall, {"held": None, "thread": "echo", "wait": sum(waits) / wall}


def countdown(n):
    while n > 0:
        n -= 1


def countdown2():
    """Overhead only: the seeds' two-thread countdown, 2 x 4,000,000."""
    threads = [threading.Thread(target=countdown, args=(4_000_000,)) for _ in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, {}


def echo_server():
    """Overhead only: an echo server thread answering 20,000 messages from a client process."""
    server, client = socket.socketpair()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, HERE, "--client", str(client.fileno()), "20000", "0"], pass_fds=[client.fileno()])
    client.close()
    t = threading.Thread(target=_echo_server, args=(server, []), name="echo")
    t.start()
    t.join()
    wall = time.perf_counter() - start
    proc.wait()
    return wall, {}


def ping_pong():
    """Overhead, worst case: 20,000 round trips between two threads of one process (four GIL
    hand-overs per message, nothing else)."""
    a, b = socket.socketpair()
    t = threading.Thread(target=_echo_server, args=(b, []), name="echo")
    start = time.perf_counter()
    t.start()
    _echo_client(a, 20_000, 0)
    t.join()
    return time.perf_counter() - start, {}


WORKLOADS = {"cpu2": cpu2, "duty": duty, "cpu_echo": cpu_echo, "countdown2": countdown2, "echo_server": echo_server, "ping_pong": ping_pong}


def run_one(workload, mode):
    """Runs a workload in this process under `mode`; prints one JSON line."""
    fn = WORKLOADS[workload]
    out = {}
    if mode == "gilfree":
        from gilfree import gil

        with gil.monitor() as m:
            wall, truth = fn()
        r = m.report()
        out["held"] = r.held_fraction
        out["acquisitions"] = sum(t.acquisitions for t in r.threads)
        out["waits"] = {t.name: t.wait_s / r.wall_s for t in r.threads}
    elif mode == "gil_load":
        import gil_load

        gil_load.init()
        gil_load.start()
        wall, truth = fn()
        gil_load.stop()
        total, per_thread = gil_load.get()
        out["held"] = total["held"]
        out["waits"] = {NAMES.get(tid, str(tid)): s["wait"] for tid, s in per_thread.items()}
        out["gil_load_wait_total"] = total["wait"]
    else:
        wall, truth = fn()
    out.update(wall=wall, truth=truth)
    print(json.dumps(out))


# -- the driver --------------------------------------------------------------------------------

def measure(workload, mode, prefix=()):
    cmd = [*prefix, sys.executable, HERE, "--run", workload, "plain" if mode == "py-spy" else mode]
    if mode == "gil_load":
        cmd = [sys.executable, "-m", "gil_load", HERE, "--run", workload, mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(lines[-1])


WORKLOAD_FRAMES = ("countdown (", "cpu_loop (", "duty.<locals>.run (", "cpu_echo.<locals>.cpu (", "_echo_server (")


def py_spy(workload, pyspy):
    """py-spy samples the GIL holder from outside: held ~ samples of the workload's threads
    taken holding the GIL / sampling ticks of the workload. It cannot see waiting."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.txt")
        rate = 200
        result = measure(workload, "py-spy", prefix=[pyspy, "record", "--gil", "--rate", str(rate), "--format", "raw", "--nonblocking", "-o", raw, "--"])
        samples = 0
        with open(raw) as f:
            for line in f:
                if any(frame in line for frame in WORKLOAD_FRAMES):
                    samples += int(line.rsplit(" ", 1)[1])
        result["held"] = samples / (rate * result["wall"])
        result["waits"] = {}
        return result


def fmt(x):
    if isinstance(x, (list, tuple)):
        return f"{x[0] * 100:.0f}-{x[1] * 100:.0f}%"
    return "   n/a" if x is None else f"{x * 100:5.1f}%"


def accuracy_table():
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    print("Accuracy: GIL held (fraction of wall) and the named thread's wait (fraction of wall)")
    print(f"{'workload':<10} {'tool':<10} {'held':>7} {'truth':>7} {'wait':>7} {'truth':>8}  note")
    for workload in ("cpu2", "duty", "cpu_echo"):
        for tool in ("gilfree", "gil_load", "py-spy"):
            try:
                r = py_spy(workload, pyspy) if tool == "py-spy" else measure(workload, tool)
            except Exception as exc:  # a tool that does not run here is reported, not hidden
                print(f"{workload:<10} {tool:<10} {'':>7} {'':>7} {'':>7} {'':>7}  does not run: {str(exc)[:70]}")
                continue
            truth = r["truth"]
            wait = r["waits"].get(truth["thread"]) if r["waits"] else None
            note = "cannot see waiting" if tool == "py-spy" else ""
            if tool == "gil_load":
                note = "samples every 5 ms (LD_PRELOAD)"
            print(f"{workload:<10} {tool:<10} {fmt(r['held']):>7} {fmt(truth['held']):>7} {fmt(wait):>7} {fmt(truth['wait']):>8}  {note}")


def hook_cost_ns(runs=7, n=100_000):
    """Cost the hooks add to one GIL release + take (os.fstat releases the GIL): best of runs,
    off and on alternated so a shared machine's load drifts into both."""
    from gilfree import gil

    fd = os.open("/dev/null", os.O_RDONLY)

    def per_call():
        stat = os.fstat
        start = time.perf_counter()
        for _ in range(n):
            stat(fd)
        return (time.perf_counter() - start) / n * 1e9

    off, on = [], []
    for _ in range(runs):
        off.append(per_call())
        with gil.monitor():
            on.append(per_call())
    os.close(fd)
    return min(off), min(on)


def overhead_table(runs=5):
    off_ns, on_ns = hook_cost_ns()
    cost = max(0.0, on_ns - off_ns)
    print("\nOverhead of gilfree.gil.monitor()")
    print(f"per GIL release+take (os.fstat loop, best of 7): {off_ns:.0f} ns off, {on_ns:.0f} ns on: +{cost:.0f} ns")
    print(f"wall times: best of {runs} alternated runs, anchor = the same workload unmonitored; 'implied' = "
          f"GIL takes per second x the per-take cost (robust to a shared machine's noise)")
    print(f"{'workload':<12} {'off s':>8} {'on s':>8} {'ratio':>7} {'takes/s':>9} {'implied':>8}")
    for workload in ("countdown2", "echo_server", "ping_pong"):
        off, on, takes = [], [], 0
        for _ in range(runs):
            off.append(measure(workload, "plain")["wall"])
            r = measure(workload, "gilfree")
            on.append(r["wall"])
            takes = r["acquisitions"] / r["wall"]
        a, b = min(off), min(on)
        print(f"{workload:<12} {a:8.3f} {b:8.3f} {b / a:7.3f} {takes:9.0f} {takes * cost * 1e-9:8.2%}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", nargs=2, metavar=("WORKLOAD", "MODE"))
    parser.add_argument("--client", nargs=3, metavar=("FD", "COUNT", "PAUSE"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.client:
        _echo_client(socket.socket(fileno=int(args.client[0])), int(args.client[1]), float(args.client[2]))
    elif args.run:
        run_one(*args.run)
    else:
        print(f"bench_gil on Python {sys.version.split()[0]}, {os.cpu_count()} CPUs (machine shared: timings are noisy)\n")
        accuracy_table()
        overhead_table(args.runs)


if __name__ == "__main__":
    main()
