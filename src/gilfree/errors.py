"""The exceptions gilfree raises, shared by the local pool, the cluster pool and the GIL tools."""
import signal as _signal
from concurrent.futures.process import BrokenProcessPool


class WorkerCrashed(BrokenProcessPool):
    """A worker process died while it held this task (killed, segfault, os._exit, OOM kill).

    Only the task(s) the worker held fail; the pool replaces the worker and goes on.
    ``oom_killed`` tells a SIGKILL apart: True when the kernel's OOM killer killed a process
    meanwhile (most likely this worker), False when it killed none, None when unknown.
    """

    def __init__(self, pid=None, exitcode=None, signal=None, detail=None, oom_killed=None):
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.oom_killed = oom_killed
        super().__init__(detail or _describe(pid, exitcode, signal, oom_killed))

    def __reduce__(self):
        return (type(self), (self.pid, self.exitcode, self.signal, str(self), self.oom_killed))


def oom_kills():
    """Processes the kernel's OOM killer has killed on this machine since boot, memory cgroups'
    kills included (/proc/vmstat, Linux 4.13+); None where that is unreadable."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def signal_name(signum):
    """SIGKILL for 9; "signal 40" for a number without a name (the real-time signals)."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_SIGKILL_CAUSE = {
    True: " (out of memory: the kernel's OOM killer killed a process as it died, most likely this one)",
    False: " (not by the kernel's OOM killer, which killed nothing meanwhile: something sent it, "
           "such as kill -9, a supervisor or a container runtime)",
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
