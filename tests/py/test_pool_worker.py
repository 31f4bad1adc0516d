"""The worker loop and the template process: what tasks may raise or leave behind, and how the
processes end."""
import os
import signal
import subprocess
import sys
import time

import pytest

import gilfree
import serfuncs as sf
from test_pool import alive


@pytest.fixture(scope="module")
def pool():
    with gilfree.Pool(1) as p:
        yield p


@pytest.mark.parametrize("exc_type", [ValueError, SystemExit, KeyboardInterrupt])
def test_map_yields_the_results_before_an_item_that_raised_whatever_it_raised(pool, exc_type):
    got = []
    with pytest.raises(exc_type):
        for value in pool.map(sf.raise_on, range(30), [13] * 30, [exc_type] * 30, chunksize=10):
            got.append(value)
    assert got == list(range(13))
    assert pool.submit(sf.raise_on, 1, 0, ValueError).result() == 1  # the pool still works


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_template_dies_with_the_parent_while_it_imports_what_the_pool_preloads(tmp_path):
    # The preloaded module writes its process id, then hangs: only the parent's death ends it.
    (tmp_path / "hanging_import.py").write_text(
        f"import os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
    )
    script = f"""if True:
        import sys, time, gilfree
        sys.path.insert(0, {str(tmp_path)!r})
        pool = gilfree.Pool(1, preload=("hanging_import",))
        time.sleep(600)
        """
    # No pipes: a template that outlives the parent would hold them open.
    parent = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    template = None
    try:
        assert wait_until(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 60)
        template = int((tmp_path / "pid").read_text())
        assert alive(template)
        parent.kill()
        parent.wait(timeout=60)
        assert wait_until(lambda: not alive(template), 60)
    finally:
        parent.kill()
        parent.wait(timeout=60)
        if template is not None and alive(template):
            os.kill(template, signal.SIGKILL)


def run_piped(code):
    """Runs a script with its stdout on a pipe, block-buffered as under a service manager."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("options", ["", "max_tasks_per_worker=2"])
def test_what_tasks_print_reaches_a_piped_stdout(options):
    # Workers end with os._exit and are killed when idle at shutdown: no exit flushes for them.
    proc = run_piped(
        f"""if True:
        import gilfree
        def task(i):
            print("task", i)
            return i
        if __name__ == "__main__":
            with gilfree.Pool(2, {options}) as pool:
                assert sum(pool.map(task, range(10))) == 45
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(f"task {i}" for i in range(10))


@pytest.mark.parametrize("preload", [(), ("multiprocessing",)])  # imported before the fork, or in the task
def test_a_worker_presents_itself_as_a_pool_worker_of_its_parent(preload):
    # As in a ProcessPoolExecutor worker: not 'MainProcess' (code that runs "in the main process
    # only" must not run there), the parent's pid and argv, not the template's arguments.
    with gilfree.Pool(1, preload=preload) as p:
        name, parent_pid, parent_alive, argv = p.submit(sf.process_identity).result()
    assert name == "gilfree-worker-0"
    assert (parent_pid, parent_alive, argv) == (os.getpid(), True, sys.argv)
