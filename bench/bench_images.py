"""Seed 000 measured: the image service on gilfree.Pool against threads, multiprocessing.Pool and thumbor.

Setup (once, as root): ``apt-get install -y wrk``. The script makes the rest itself: photo-like 2K
JPEGs in a temporary directory, and thumbor in its own virtual environment ``.venv/thumbor``
(thumbor pins Pillow<13, which must not replace the project's Pillow).

Load: wrk at concurrency 2 x cores on loopback, one connection per request slot, images cycled so
consecutive requests differ. Meanwhile a probe process GETs the health endpoint every 20 ms on its
own connection, and another probes an idle server the same way (the "idle ctl" column: the
machine's own scheduling delay). CPU use is the server's process tree (front + workers) CPU
seconds over wall seconds.

Workloads: (a) thumbnail, fit into 512x512, JPEG q=85; (b) full-size re-encode, JPEG q=85.

    python bench/bench_images.py [--duration 15] [--rounds 3] [--images 24]
                                 [--systems pool,pool/POST,threads,threads/POST,mp,thumbor]
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gilfree.images import samples

REPO = Path(__file__).resolve().parent.parent
THUMBOR_VENV = REPO / ".venv" / "thumbor"
THUMBOR_REQUIREMENT = "thumbor==7.8.0"
CORES = os.cpu_count() or 1
WORKLOADS = {
    "thumbnail": {"ours": "w=512&h=512&fit=inside&format=jpeg&quality=85",
                  "thumbor": "fit-in/512x512/filters:quality(85):format(jpeg)"},
    "re-encode": {"ours": "format=jpeg&quality=85", "thumbor": "filters:quality(85):format(jpeg)"},
}
# name -> (server kind, how the image reaches it)
SYSTEMS = {
    "pool": ("pool", "GET"), "pool/POST": ("pool", "POST"),
    "threads": ("threads", "GET"), "threads/POST": ("threads", "POST"),
    "mp": ("mp", "GET"), "thumbor": ("thumbor", "GET"),
}
LABELS = {"pool": "gilfree.Pool", "pool/POST": "gilfree.Pool, POST body", "threads": "--executor threads",
          "threads/POST": "--executor threads, POST body", "mp": "multiprocessing.Pool", "thumbor": "thumbor"}


def make_images(root, count):
    names = []
    for seed in range(count):
        name = f"photo_{seed:03d}.jpg"
        (root / name).write_bytes(samples.photo_jpeg(1000 + seed))
        names.append(name)
    return names


def ensure_thumbor():
    """Returns (thumbor executable, None) or (None, the reason it cannot run here)."""
    exe = THUMBOR_VENV / "bin" / "thumbor"
    if exe.exists():
        return exe, None
    python = shutil.which("python3.11") or sys.executable
    steps = ([python, "-m", "venv", str(THUMBOR_VENV)],
             [str(THUMBOR_VENV / "bin" / "pip"), "install", "-q", THUMBOR_REQUIREMENT])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            return None, f"{' '.join(step)} failed: {(done.stderr or done.stdout).strip()[-600:]}"
    return exe, None


class Server:
    """A server subprocess in its own process group; knows its health URL and its CPU use."""

    def __init__(self, kind, root, port, thumbor_exe=None, workdir=None):
        self.kind, self.port = kind, port
        if kind == "thumbor":
            conf = Path(workdir) / "thumbor.conf"
            conf.write_text(f"LOADER = 'thumbor.loaders.file_loader'\nFILE_LOADER_ROOT_PATH = {str(root)!r}\n"
                            "STORAGE = 'thumbor.storages.no_storage'\nRESULT_STORAGE = None\n"
                            "ALLOW_UNSAFE_URL = True\nQUALITY = 85\n"
                            # Baseline JPEG like the others' output (thumbor's default is progressive);
                            # thumbor's Huffman optimisation pass stays, it has no switch.
                            "PROGRESSIVE_JPEG = False\n")
            # --processes 0: one thumbor process per core, thumbor's own way to use every core.
            cmd = [str(thumbor_exe), "-i", "127.0.0.1", "-p", str(port), "-c", str(conf), "--processes", "0",
                   "-l", "error"]
            self.health_path = "/healthcheck"
        else:
            cmd = [sys.executable, "-m", "gilfree.images", "--host", "127.0.0.1", "--port", str(port),
                   "--executor", kind, "--workers", str(CORES), "--root", str(root)]
            self.health_path = "/health"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", self.health_path)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{kind} did not answer {self.health_path} within 60 s")

    def cpu_seconds(self):
        """utime+stime of the server and every live descendant."""
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields))
        total, todo = 0, [self.proc.pid]
        own = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(own[11]) + int(own[12])
        while todo:
            for pid, fields in children.get(todo.pop(), ()):
                total += int(fields[11]) + int(fields[12])
                todo.append(pid)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# The probe loop, run in a process of its own: two probe threads in one Python process would
# wait for each other's GIL (up to the 5 ms switch interval) and measure that instead.
PROBE_CODE = r"""
import http.client, json, select, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
latencies, failures = [], 0
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
while not select.select([sys.stdin], [], [], 0.02)[0]:
    started = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise OSError(response.status)
        latencies.append((time.perf_counter() - started) * 1000)
    except (OSError, http.client.HTTPException):
        failures += 1
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


class HealthProbe:
    """GET the health path every 20 ms on one keep-alive connection, from its own process;
    latencies in ms."""

    def __init__(self, port, path):
        self.port, self.path = port, path
        self.latencies, self.failures = [], 0

    def start(self):
        self._proc = subprocess.Popen([sys.executable, "-c", PROBE_CODE, str(self.port), self.path],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self):
        out, _ = self._proc.communicate("stop\n", timeout=60)
        result = json.loads(out)
        self.latencies, self.failures = result["latencies"], result["failures"]


def lua_script(path, method, urls, root, latency_out):
    """A wrk script cycling through urls (GET) or posting each image's bytes in turn (POST); at the
    end it writes wrk's raw latency histogram (microseconds, count) to latency_out."""
    if method == "GET":
        body = "local urls = {%s}\n" % ", ".join(json.dumps(u) for u in urls)
        body += ("local i = 0\nrequest = function()\n  i = i + 1\n"
                 "  return wrk.format('GET', urls[(i % #urls) + 1])\nend\n")
    else:
        files = ", ".join(json.dumps(str(root / u.split("?")[0].rsplit("/", 1)[1])) for u in urls)
        query = urls[0].split("?", 1)[1]
        body = (f"local files = {{{files}}}\nlocal bodies = {{}}\n"
                "for k, name in ipairs(files) do local f = io.open(name, 'rb'); bodies[k] = f:read('*a'); f:close() end\n"
                "local i = 0\nrequest = function()\n  i = i + 1\n"
                f"  return wrk.format('POST', '/v1/transform?{query}', "
                "{['Content-Type'] = 'image/jpeg'}, bodies[(i % #bodies) + 1])\nend\n")
    body += (f"done = function(summary, latency, requests)\n  local f = io.open({json.dumps(str(latency_out))}, 'w')\n"
             "  for k = 1, #latency do local v, c = latency(k); f:write(v .. ' ' .. c .. '\\n') end\n"
             "  f:close()\nend\n")
    Path(path).write_text(body)


def run_wrk(port, script, latency_out, duration, connections):
    """One wrk run: requests, seconds, errors and the latency samples (ms, count)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "-s", str(script),
           f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests, seconds, unit = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out).groups()
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    latencies = [(int(v) / 1000, int(c)) for v, c in (line.split() for line in Path(latency_out).read_text().splitlines())]
    return {"requests": int(requests), "seconds": float(seconds) * {"ms": 1e-3, "s": 1, "m": 60}[unit],
            "errors": (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
            "latencies": latencies}


def percentile(weighted, fraction):
    """weighted: (value, count) pairs."""
    ordered = sorted(weighted)
    total = sum(count for _, count in ordered)
    if not total:
        return float("nan")
    rank, seen = fraction * total, 0
    for value, count in ordered:
        seen += count
        if seen >= rank:
            return value
    return ordered[-1][0]


class Load:
    """One (system, workload): its wrk script, and what every round of it measured."""

    def __init__(self, system, workload, server, control, names, root, workdir):
        kind, self.method = SYSTEMS[system]
        self.system, self.workload, self.server, self.control = system, workload, server, control
        self.script = Path(workdir) / f"{system.replace('/', '_')}_{workload}.lua"
        self.latency_out = self.script.with_suffix(".lat")
        lua_script(self.script, self.method, urls_for(kind, workload, names), root, self.latency_out)
        self.runs, self.health, self.control_health, self.health_failures, self.cpu, self.wall = [], [], [], 0, 0.0, 0.0

    def warm_up(self, connections):
        run_wrk(self.server.port, self.script, self.latency_out, 2, connections)

    def round(self, duration, connections):
        probe = HealthProbe(self.server.port, self.server.health_path)
        control = HealthProbe(self.control.port, self.control.health_path)
        cpu_before, wall_before = self.server.cpu_seconds(), time.monotonic()
        probe.start()
        control.start()
        self.runs.append(run_wrk(self.server.port, self.script, self.latency_out, duration, connections))
        probe.stop()
        control.stop()
        self.cpu += self.server.cpu_seconds() - cpu_before
        self.wall += time.monotonic() - wall_before
        self.health += probe.latencies
        self.control_health += control.latencies
        self.health_failures += probe.failures

    def result(self):
        latencies = [sample for run in self.runs for sample in run["latencies"]]
        health = [(ms, 1) for ms in self.health]
        return {"rps": sum(r["requests"] for r in self.runs) / sum(r["seconds"] for r in self.runs),
                "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
                "errors": sum(r["errors"] for r in self.runs), "cpu_cores": self.cpu / self.wall,
                "health_p99_ms": percentile(health, 0.99), "health_median_ms": percentile(health, 0.5),
                "control_health_p99_ms": percentile([(ms, 1) for ms in self.control_health], 0.99),
                "health_failures": self.health_failures, "rounds": len(self.runs)}


def urls_for(kind, workload, names):
    if kind == "thumbor":
        return [f"/unsafe/{WORKLOADS[workload]['thumbor']}/{name}" for name in names]
    return [f"/v1/transform/{name}?{WORKLOADS[workload]['ours']}" for name in names]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per system and workload")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the duration is split into rounds, interleaved across systems, so that other "
                             "load on a shared machine falls on every system alike")
    parser.add_argument("--images", type=int, default=24, help="distinct 2K photos (at least 20)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("bench_images: wrk is missing; install it with: apt-get install -y wrk")
    systems = args.systems.split(",")
    connections = 2 * CORES
    notes = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir) / "images"
        root.mkdir()
        print(f"making {args.images} photo-like {samples.SIZE_2K[0]}x{samples.SIZE_2K[1]} JPEGs ...", flush=True)
        names = make_images(root, args.images)
        thumbor_exe = None
        if "thumbor" in systems:
            thumbor_exe, why = ensure_thumbor()
            if why:
                notes.append(f"thumbor not measured: {why}")
                systems.remove("thumbor")
        servers = {}
        try:
            # Control: an idle server probed during every round; its /health p99 is what the
            # machine's scheduling alone costs under that load.
            control = servers["control"] = Server("threads", root, free_port())
            # Every server runs from the start (idle ones cost nothing) so the rounds can interleave.
            for system in systems:
                kind = SYSTEMS[system][0]
                if kind not in servers:
                    servers[kind] = Server(kind, root, free_port(), thumbor_exe, workdir)
            loads = [Load(system, workload, servers[SYSTEMS[system][0]], control, names, root, workdir)
                     for workload in WORKLOADS for system in systems]
            for load in loads:
                load.warm_up(connections)  # workers started, code and files warm
            seconds = max(1, round(args.duration / args.rounds))
            for number in range(args.rounds):
                print(f"round {number + 1}/{args.rounds} ({len(loads)} loads of {seconds} s)", flush=True)
                for load in loads:
                    load.round(seconds, connections)
        finally:
            for server in servers.values():
                server.stop()
    notes.append(f"1-minute load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after it "
                 "(the benchmark's own load included)")
    report({(load.system, load.workload): load.result() for load in loads}, notes, connections, args)


def report(results, notes, connections, args):
    print(f"\nbench_images: {CORES} cores, concurrency {connections} (wrk), {args.duration} s per system and "
          f"workload in {args.rounds} interleaved rounds, {args.images} distinct 2K photos; machine shared, one run")
    header = (f"{'workload':10} {'system':32} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU':>5} "
              f"{'health p99':>10} {'(idle ctl)':>10} {'errors':>6} {'vs threads':>10} {'vs thumbor':>10}")
    print(header)
    print("-" * len(header))
    for workload in WORKLOADS:
        threads = results.get(("threads", workload))
        thumbor = results.get(("thumbor", workload))
        for (system, wl), r in results.items():
            if wl != workload:
                continue
            ratio = lambda anchor: f"{r['rps'] / anchor['rps']:.2f}x" if anchor and anchor["rps"] else "-"  # noqa: E731
            print(f"{workload:10} {LABELS[system]:32} {r['rps']:7.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
                  f"{r['cpu_cores']:5.2f} {r['health_p99_ms']:8.2f}ms {r['control_health_p99_ms']:8.2f}ms "
                  f"{r['errors']:6d} {ratio(threads):>10} "
                  f"{ratio(thumbor):>10}")
    print("CPU: cores busy in the server's process tree (front + workers). health p99: the loaded server's; "
          "(idle ctl): an idle server's, probed at the same time (the machine's own scheduling delay).")
    print("Published for context only (another 2-vCPU machine, DIV2K, concurrency = CPUs): "
          "thumbor 51.6 req/s, imgproxy 79.6 req/s on the thumbnail workload.")
    goals(results)
    for note in notes:
        print("NOTE:", note)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}|{w}": r for (s, w), r in results.items()}, indent=1))


def goals(results):
    def get(system, workload):
        return results.get((system, workload))

    checks = []
    pool_a, threads_a, thumbor_a = get("pool", "thumbnail"), get("threads", "thumbnail"), get("thumbor", "thumbnail")
    pool_b, threads_b = get("pool", "re-encode"), get("threads", "re-encode")
    if pool_a and threads_a:
        checks.append(("(a) thumbnail: pool >= threads", pool_a["rps"] >= threads_a["rps"]))
    if pool_a and thumbor_a:
        checks.append(("(a) thumbnail: pool >= 1.3x thumbor", pool_a["rps"] >= 1.3 * thumbor_a["rps"]))
    if pool_b and threads_b:
        checks.append(("(b) re-encode: pool >= 1.7x threads", pool_b["rps"] >= 1.7 * threads_b["rps"]))
    for workload, pool, threads in (("thumbnail", pool_a, threads_a), ("re-encode", pool_b, threads_b)):
        if pool:
            checks.append((f"{workload}: /health p99 < 5 ms under load", pool["health_p99_ms"] < 5))
        if pool and threads:
            checks.append((f"{workload}: /health p99 <= 1/3 of threads'",
                           pool["health_p99_ms"] <= threads["health_p99_ms"] / 3))
    for text, ok in checks:
        print(f"goal {'met   ' if ok else 'MISSED'} {text}")


if __name__ == "__main__":
    main()
