"""`python -m gilfree diagnose`: the program behaves as under plain `python`, plus the report."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], **{"capture_output": True, "text": True, "timeout": 60, **kwargs})


def diagnose(*args, **kwargs):
    return run("-m", "gilfree", "diagnose", "--sample-hz", "0", *args, **kwargs)


def write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# --- command line


PRINTS_ARGV = "import sys\nprint(sys.argv[1:])\n"


@pytest.mark.parametrize("args, program_args", [
    (["-m", "prog", "--svg", "x.svg", "a"], ["--svg", "x.svg", "a"]),
    (["-m", "prog", "--sort-keys"], ["--sort-keys"]),
    (["-m", "prog", "-n", "10"], ["-n", "10"]),
    (["-m", "prog", "-h"], ["-h"]),
    (["--", "prog.py", "-h", "a"], ["-h", "a"]),
])
def test_everything_after_the_program_is_the_programs(tmp_path, args, program_args):
    write(tmp_path / "prog.py", PRINTS_ARGV)
    out = diagnose(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{program_args}\n"
    assert "verdict:" in out.stderr
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.parametrize("args, status", [([], 2), (["nosuch"], 2), (["--help"], 0)])
def test_a_missing_or_unknown_command_is_a_usage_error(args, status):
    out = run("-m", "gilfree", *args)
    assert out.returncode == status
    assert "usage: python -m gilfree <command>" in (out.stderr if status else out.stdout)
    assert (out.stdout if status else out.stderr) == ""


@pytest.mark.parametrize("rate", ["-1", "nan", "inf", "1e9"])
def test_sample_rate_must_be_zero_or_a_sane_positive_number(tmp_path, rate):
    script = write(tmp_path / "prog.py", "print('ran')\n")
    out = diagnose("--sample-hz", rate, str(script))
    assert out.returncode == 2
    assert "--sample-hz" in out.stderr and out.stdout == ""


@pytest.mark.parametrize("flag", ["--trace", "--svg"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(tmp_path, flag):
    script = write(tmp_path / "prog.py", "print('ran')\n")
    out = diagnose(flag, str(tmp_path / "missing" / "out"), str(script))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and flag in out.stderr, out.stderr


def test_outputs_are_resolved_before_the_program_changes_directory(tmp_path):
    write(tmp_path / "elsewhere" / ".keep", "")
    script = write(tmp_path / "prog.py", "import os\nos.chdir('elsewhere')\n")
    out = diagnose("--svg", "g.svg", "--trace", "t.json", str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "g.svg").exists() and (tmp_path / "t.json").exists()
    assert sorted(os.listdir(tmp_path / "elsewhere")) == [".keep"]


def test_an_output_failing_after_the_run_keeps_the_exit_status_and_the_other_output(tmp_path):
    script = write(tmp_path / "prog.py", "import shutil, sys\nshutil.rmtree('gone')\nsys.exit(3)\n")
    (tmp_path / "gone").mkdir()
    out = diagnose("--trace", "gone/t.json", "--svg", "g.svg", str(script), cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "verdict:" in out.stderr and "gone/t.json" in out.stderr
    assert (tmp_path / "g.svg").read_text().startswith("<svg")


def test_unmeasured_run_says_outputs_are_skipped(tmp_path):
    script = write(tmp_path / "prog.py", "print('ran')\n")
    # gilfree._gilhook failing to import is what an unsupported interpreter looks like.
    launcher = "import sys; sys.modules['gilfree._gilhook'] = None; from gilfree.__main__ import main; sys.exit(main())"
    out = run("-c", launcher, "diagnose", "--svg", str(tmp_path / "g.svg"), str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ran\n"
    assert "unmeasured" in out.stderr and "--svg" in out.stderr and "not written" in out.stderr
    assert not (tmp_path / "g.svg").exists()


# --- the end of the run: as the interpreter ends it (threading._shutdown), then the report


def test_an_executor_left_running_ends_as_under_python(tmp_path):
    """A library's module-level executor, never shut down: threading's atexit callback stops it."""
    write(tmp_path / "lib.py", """
        from concurrent.futures import ThreadPoolExecutor
        EXECUTOR = ThreadPoolExecutor(2)
    """)
    script = write(tmp_path / "app.py", "import lib\nprint(lib.EXECUTOR.submit(pow, 2, 10).result())\n")
    out = diagnose(str(script), timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1024\n"
    assert "verdict:" in out.stderr


def test_a_thread_waiting_for_the_main_thread_to_finish_ends(tmp_path):
    script = write(tmp_path / "watchdog.py", """
        import threading, time
        def watchdog():
            while threading.main_thread().is_alive():
                time.sleep(0.01)
            print("watchdog: main finished", flush=True)
        threading.Thread(target=watchdog).start()
        print("main done", flush=True)
    """)
    out = diagnose(str(script), timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "main done\nwatchdog: main finished\n"


@pytest.mark.parametrize("ending, status", [("sys.exit(3)", 3), ("raise ValueError('boom')", 1)])
def test_the_report_waits_for_threads_still_running_after_an_exit(tmp_path, ending, status):
    script = write(tmp_path / "exits.py", f"""
        import sys, threading, time
        def work():
            time.sleep(0.3)
            print("worker finished", flush=True)
        threading.Thread(target=work).start()
        {ending}
    """)
    out = diagnose(str(script), stderr=subprocess.STDOUT, capture_output=False, stdout=subprocess.PIPE)
    assert out.returncode == status
    assert "worker finished" in out.stdout and "GIL report" in out.stdout
    assert out.stdout.index("worker finished") < out.stdout.index("GIL report"), out.stdout


def test_a_forked_child_ends_without_a_report(tmp_path):
    script = write(tmp_path / "forks.py", """
        import os, sys
        pid = os.fork()
        if pid == 0:
            print("child", flush=True)
            sys.exit(5)   # runs to the end of the program, as a child of os.fork may
        print("parent saw", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """)
    out = diagnose("--svg", str(tmp_path / "g.svg"), str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "child\nparent saw 5\n"
    assert out.stderr.count("GIL report") == 1 and out.stderr.count("picture written") == 1, out.stderr


# --- the program sees what python gives it


SHOWS = """
import builtins, multiprocessing, sys
print(sys.argv, __file__, __name__, __package__, __spec__ and __spec__.name, type(__loader__).__name__)
print(sys.path)
print(__builtins__ is builtins, sys.modules["__main__"].__dict__ is globals(), sys.modules["__mp_main__"] is sys.modules["__main__"])
"""


@pytest.mark.parametrize("target", [["./app/shows.py", "a"], ["-m", "shows", "a"], ["app", "a"]])
def test_program_sees_argv_path_and_main_as_under_python(tmp_path, target):
    write(tmp_path / "app" / "shows.py", SHOWS)
    write(tmp_path / "app" / "__main__.py", SHOWS)
    write(tmp_path / "shows.py", SHOWS)
    write(tmp_path / "colorsys.py", "print('the cwd shadowed the standard library')\n")  # in diagnose's own sys.path[0]
    plain = run(*target, cwd=tmp_path)
    out = diagnose(*target, cwd=tmp_path)
    assert plain.returncode == out.returncode == 0, out.stderr
    assert out.stdout == plain.stdout


def test_script_directory_replaces_the_cwd_on_sys_path(tmp_path):
    write(tmp_path / "cwd" / "colorsys.py", "print('the cwd shadowed the standard library')\n")
    script = write(tmp_path / "app" / "prog.py", "import colorsys, sys\nprint(sys.path[0])\n")
    out = diagnose(str(script), cwd=tmp_path / "cwd")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{tmp_path / 'app'}\n"


def test_main_classes_pickle_from_threads_running_after_the_body(tmp_path):
    script = write(tmp_path / "prog.py", """
        import pickle, threading, time
        class Point:
            def __init__(self, x): self.x = x
        def late():
            time.sleep(0.2)
            print(pickle.loads(pickle.dumps(Point(4))).x, pickle.loads(pickle.dumps(late)) is late, flush=True)
        threading.Thread(target=late).start()
    """)
    out = diagnose(str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "4 True\n"


def test_spawned_workers_return_objects_of_main_classes(tmp_path):
    script = write(tmp_path / "prog.py", """
        import multiprocessing as mp
        class Box:
            pass
        def make(_):
            return Box()
        if __name__ == "__main__":
            with mp.get_context("spawn").Pool(1) as pool:
                print(type(pool.apply_async(make, (0,)).get(timeout=20)).__name__)
    """)
    out = diagnose(str(script), timeout=40)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Box\n"


def test_uncaught_exception_is_shown_as_python_shows_it(tmp_path):
    script = write(tmp_path / "boom.py", "def f():\n    raise ValueError('boom')\nf()\n")
    plain = run(str(script))
    out = diagnose(str(script))
    assert out.returncode == plain.returncode == 1
    assert out.stderr.startswith(plain.stderr), out.stderr
    assert "verdict:" in out.stderr


def test_the_programs_excepthook_handles_its_exception(tmp_path):
    script = write(tmp_path / "hook.py", """
        import sys
        sys.excepthook = lambda t, v, tb: print("custom hook:", v, file=sys.stderr)
        raise RuntimeError("x")
    """)
    out = diagnose(str(script))
    assert out.returncode == 1
    assert out.stderr.startswith("custom hook: x\n"), out.stderr
    assert "Traceback" not in out.stderr


def test_ctrl_c_shows_the_programs_keyboard_interrupt(tmp_path):
    script = write(tmp_path / "waits.py", """
        import time
        print("ready", flush=True)
        time.sleep(30)
    """)
    # A terminal program's SIGINT, also when this suite runs as a background job (which ignores it).
    proc = subprocess.Popen([sys.executable, "-m", "gilfree", "diagnose", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    # The program's own frame (line 4, or 3 if the signal lands as print returns), no diagnose's.
    assert re.match(rf'Traceback \(most recent call last\):\n  File "{re.escape(str(script))}", line [34], in <module>\n', err), err
    assert "KeyboardInterrupt" in err and "verdict:" in err


@pytest.mark.parametrize("handled", [False, True])
def test_sigterm_prints_the_report_then_the_process_dies_of_it(tmp_path, handled):
    # A service stopped by timeout, docker stop or systemd lost the whole measurement. A
    # non-daemon thread spinning forever is not waited for, as under python. A program with its
    # own SIGTERM handler keeps it.
    script = write(tmp_path / "service.py", f"""
        import concurrent.futures, signal, sys, threading, time
        if {handled}:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        threading.Thread(target=lambda: [None for _ in iter(int, 1)], name="spinner", daemon={handled}).start()
        with concurrent.futures.ThreadPoolExecutor() as executor:  # python would not wait for it
            executor.submit(time.sleep, 0 if {handled} else 20)
            print("ready", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "gilfree", "diagnose", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == (7 if handled else -signal.SIGTERM), err
    assert "spinner" in err and "verdict:" in err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("mischief", ["sys.stderr.close()", "sys.stderr = io.StringIO()"])
def test_report_reaches_the_real_stderr_whatever_the_program_did_to_sys_stderr(tmp_path, mischief):
    script = write(tmp_path / "prog.py", f"import io, sys\n{mischief}\nsys.exit(4)\n")
    out = diagnose(str(script))
    assert out.returncode == 4
    assert "verdict:" in out.stderr


@pytest.mark.parametrize("target", [["missing.py"], ["-m", "no_such_module_here"]])
def test_a_program_that_cannot_be_found_fails_as_under_python(tmp_path, target):
    plain = run(*target, cwd=tmp_path)
    out = diagnose(*target, cwd=tmp_path)
    assert out.returncode == plain.returncode != 0
    assert out.stderr == plain.stderr
    assert out.stdout == ""


# --- verdicts of programs that wait on I/O or on other processes


SLOW_SERVER = """
import sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class Slow(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.05)   # a slow backend
        body = b"x" * 2000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

FETCHES = """
import sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url = f"http://127.0.0.1:{sys.argv[1]}/"
def fetch(i):
    with urllib.request.urlopen(url) as r:
        return len(r.read())
with ThreadPoolExecutor(8) as ex:
    print(sum(ex.map(fetch, range(160))))
"""

SLEEPS = """
import threading, time
def worker():
    for _ in range(200):
        time.sleep(0.002)                    # stands in for a database call
        sum(i * i for i in range(300))       # a little Python per call (~20 us)
ts = [threading.Thread(target=worker) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
"""


def verdict_line(stderr):
    (line,) = [line for line in stderr.splitlines() if line.startswith("verdict: ")]
    return line


def test_an_http_client_waiting_on_a_slow_server_is_io_bound(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        out = run("-m", "gilfree", "diagnose", str(write(tmp_path / "fetch.py", FETCHES)), port)
    finally:
        server.kill()
        server.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "320000\n"
    assert verdict_line(out.stderr).startswith("verdict: Not GIL-bound: I/O-bound"), out.stderr


def test_threads_sleeping_between_bits_of_python_are_not_gil_bound(tmp_path):
    out = diagnose(str(write(tmp_path / "sleeps.py", SLEEPS)))
    assert out.returncode == 0, out.stderr
    assert verdict_line(out.stderr).startswith(("verdict: Not GIL-bound: I/O-bound", "verdict: Not GIL-bound: mostly idle")), out.stderr
    assert re.search(r"^process used \d\.\d\d of \d+ cores? \(CPU [\d.]+ s over [\d.]+ s wall\)", out.stderr, re.M), out.stderr


def test_the_report_counts_the_cpu_time_of_the_programs_pool_workers(tmp_path):
    """The work runs in gilfree.Pool's workers (children of its template, itself the program's
    child): the program's own threads idle, and the report says where the CPU time went."""
    script = write(tmp_path / "pool.py", """
        import gilfree
        def spin(n):
            while n:
                n -= 1
            return n
        if __name__ == "__main__":
            with gilfree.Pool(2) as pool:
                print(sum(pool.map(spin, [3_000_000] * 4)))
    """)
    out = diagnose(str(script), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0\n"
    usage = re.search(r"child processes: CPU ([\d.]+) s", out.stderr)
    assert usage and float(usage.group(1)) >= 0.2, out.stderr


def test_the_programs_modules_named_like_standard_ones_are_its_own(tmp_path):
    """diagnose imports little before the program (docs/gil.md lists it): a script's queue.py,
    textwrap.py, json.py, ... are what it imports, as under python."""
    names = ["queue", "textwrap", "json", "socket", "signal", "logging", "random", "subprocess", "html"]
    for name in names:
        write(tmp_path / f"{name}.py", "WHO = 'own'\n")
    script = write(tmp_path / "app.py", f"import {', '.join(names)}\n"
                                        f"print([getattr(m, 'WHO', 'stdlib') for m in ({', '.join(names)})])\n")
    out = diagnose(str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{['own'] * len(names)}\n"
    assert "verdict:" in out.stderr


def test_a_closed_stderr_loses_the_report_but_not_the_exit_status(tmp_path):
    script = write(tmp_path / "closes.py", "import os\nos.close(2)\nprint('ok')\n")
    out = diagnose("--trace", str(tmp_path / "t.json"), str(script))
    assert (out.returncode, out.stdout) == (0, "ok\n")
    assert (tmp_path / "t.json").stat().st_size > 0  # the outputs are still written


def test_main_has_annotations_as_under_python(tmp_path):
    out = diagnose(str(write(tmp_path / "ann.py", "print(__annotations__)\n")))
    assert (out.returncode, out.stdout) == (0, "{}\n"), out.stderr
