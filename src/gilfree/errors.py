"""The exceptions gilfree raises, shared by the local pool, the cluster pool and the GIL tools."""
import signal as _signal
from concurrent.futures.process import BrokenProcessPool


class WorkerCrashed(BrokenProcessPool):
    """A worker process died while it held this task (killed, segfault, os._exit, OOM kill).

    Only the task(s) the worker held fail; the pool replaces the worker and goes on.
    """

    def __init__(self, pid=None, exitcode=None, signal=None, detail=None):
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        super().__init__(detail or _describe(pid, exitcode, signal))

    def __reduce__(self):
        return (type(self), (self.pid, self.exitcode, self.signal, str(self)))


def signal_name(signum):
    """SIGKILL for 9; "signal 40" for a number without a name (the real-time signals)."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe(pid, exitcode, signum):
    who = f"worker {pid}" if pid is not None else "a worker"
    if signum is not None:
        text = f"{who} was killed by {signal_name(signum)} while running this task"
        if signum == _signal.SIGKILL:
            text += " (likely killed for memory: the OOM killer sends SIGKILL)"
        return text
    if exitcode is not None:
        return f"{who} exited with code {exitcode} while running this task"
    return f"{who} died while running this task"


class TaskTimeout(TimeoutError):
    """A task ran past the pool's task_timeout; its worker was killed and replaced."""


class UnsupportedInterpreter(RuntimeError):
    """Exact GIL accounting or GIL priorities are impossible on this interpreter; says why."""
