"""The exceptions gilfree raises, shared by the local pool, the cluster pool and the GIL tools."""
import signal as _signal
from concurrent.futures.process import BrokenProcessPool


class WorkerCrashed(BrokenProcessPool):
    """A worker process died while it held this task (killed, segfault, os._exit, OOM kill).

    Only the task(s) the worker held fail; the pool replaces the worker and goes on.
    ``oom_killed`` tells a SIGKILL apart: True when the kernel's OOM killer counted a kill the
    pool's earlier SIGKILLs did not account for (most likely this worker), False when it counted
    none; None when that is unknown, and for other deaths.
    """

    def __init__(self, pid=None, exitcode=None, signal=None, detail=None, oom_killed=None):
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.oom_killed = oom_killed
        super().__init__(detail or _describe(pid, exitcode, signal, oom_killed))

    def __reduce__(self):
        # oom_killed as state, which an older gilfree's class also takes (as an attribute).
        return (type(self), (self.pid, self.exitcode, self.signal, str(self)), {"oom_killed": self.oom_killed})


def _oom_kill_files():
    """The files where the kernel counts OOM kills that can end this process's children,
    narrowest first: its memory cgroup's (v1 memory.oom_control or v2 memory.events, which its
    children share unless moved), then the machine's (/proc/vmstat)."""
    files = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    files.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.events")
                elif "memory" in controllers.split(","):
                    files.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.oom_control")
    except (OSError, ValueError):
        pass
    return files + ["/proc/vmstat"]


def read_oom_kills(path):
    """The oom_kill count in `path`; None where it is unreadable or has none."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def oom_kill_counter():
    """(path, count) of the narrowest readable OOM kill count, or (None, None)."""
    for path in _oom_kill_files():
        count = read_oom_kills(path)
        if count is not None:
            return path, count
    return None, None


def signal_name(signum):
    """SIGKILL for 9; "signal 40" for a number without a name (the real-time signals)."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_SIGKILL_CAUSE = {
    True: " (out of memory: the kernel's OOM killer counted a kill since the pool's previous "
          "SIGKILL, most likely this one)",
    False: " (not by the kernel's OOM killer, which counted no kill since the pool's previous "
           "SIGKILL: something sent it, such as kill -9, a supervisor, a container runtime or a "
           "user-space OOM killer like systemd-oomd or earlyoom)",
    None: " (the kernel's OOM killer sends SIGKILL; whether it did is unknown here)",
}


def _describe(pid, exitcode, signum, oom_killed=None):
    who = f"worker {pid}" if pid is not None else "a worker"
    if signum is not None:
        text = f"{who} was killed by {signal_name(signum)} while running this task"
        if signum == _signal.SIGKILL:
            text += _SIGKILL_CAUSE[oom_killed]
        return text
    if exitcode is not None:
        return f"{who} exited with code {exitcode} while running this task"
    return f"{who} died while running this task"


class TaskTimeout(TimeoutError):
    """A task ran past the pool's task_timeout; its worker was killed and replaced."""


class UnsupportedInterpreter(RuntimeError):
    """Exact GIL accounting or GIL priorities are impossible on this interpreter; says why."""
