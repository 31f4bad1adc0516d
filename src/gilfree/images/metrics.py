"""Prometheus text exposition for the service (no client library: a handful of series)."""
import bisect
import time

from ..errors import UnsupportedInterpreter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREFIX = "gilfree_images"


class Metrics:
    """Request counts and latencies; only the event loop thread touches it, so no lock."""

    def __init__(self):
        self.by_status = {}
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self._gil = _GilHeldFraction()

    def close(self):
        """Ends the GIL accounting the metrics started (the app is done with them)."""
        self._gil.close()

    def observe(self, status, seconds):
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, stats, workers, in_flight):
        """stats: the executor's stats(); returns the exposition text."""
        lines = []

        def series(name, kind, help_text, samples):
            lines.append(f"# HELP {PREFIX}_{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{PREFIX}_{name}{labels} {value}")

        series("requests_total", "counter", "Transform requests by HTTP status (499: the client left before its answer).",
               [(f'{{status="{status}"}}', count) for status, count in sorted(self.by_status.items())])
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.bucket_counts):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
        series("request_duration_seconds", "histogram", "Transform request latency, arrival to answer.",
               [*buckets, ("_sum", round(self.latency_sum, 6)), ("_count", self.latency_count)])
        series("in_flight", "gauge", "Transform requests admitted and not yet answered.", [("", in_flight)])
        series("queue_depth", "gauge", "Tasks waiting for a free worker.", [("", stats["queued"])])
        series("workers", "gauge", "Workers configured.", [("", workers)])
        series("busy_workers", "gauge", "Workers running a task now.", [("", stats["busy_workers"])])
        series("worker_restarts_total", "counter", "Workers replaced after a crash or a timeout.",
               [("", stats["restarts"])])
        series("transferred_bytes_total", "counter", "Bytes handed to and from the workers (pool: its shared memory).",
               [('{direction="in"}', stats["bytes_in"]), ('{direction="out"}', stats["bytes_out"])])
        if stats["workers"]:
            series("worker_busy", "gauge", "1 while the worker runs a task (pid: its current process).",
                   [(f'{{slot="{w["slot"]}",pid="{w["pid"]}"}}', int(w["busy"])) for w in stats["workers"]])
            series("worker_tasks_total", "counter", "Tasks each worker slot has run.",
                   [(f'{{slot="{w["slot"]}"}}', w["tasks"]) for w in stats["workers"]])
        gil = self._gil.sample()
        if gil is not None:
            held_fraction, counters = gil
            if held_fraction is not None:
                series("gil_held_fraction", "gauge",
                       "Fraction of wall time the server process's GIL was held since the previous scrape.",
                       [("", round(held_fraction, 6))])
            series("gil_held_seconds_total", "counter", "Time the server process's GIL was held.",
                   [("", round(counters["held_s"], 6))])
            series("gil_wait_seconds_total", "counter", "Time the server's threads waited for the GIL.",
                   [("", round(counters["wait_s"], 6))])
        return "\n".join(lines) + "\n"


class _GilHeldFraction:
    """The server's GIL held fraction between two scrapes, from gilfree.gil.counters()."""

    def __init__(self):
        self._previous = None
        self.sample()  # the first call starts the accounting: the first scrape has a baseline

    def close(self):
        try:
            from .. import gil
        except ImportError:
            return
        gil.stop()

    def sample(self):
        """(held fraction since the previous sample or None, counters), or None without gilfree.gil."""
        try:
            from .. import gil

            counters = gil.counters()
        except (ImportError, UnsupportedInterpreter):
            # gilfree.gil missing, or no exact GIL accounting on this interpreter: the series are omitted.
            return None
        now = time.monotonic()
        previous, self._previous = self._previous, (now, counters["held_s"])
        if previous is None or now <= previous[0]:
            return None, counters
        return min(1.0, max(0.0, (counters["held_s"] - previous[1]) / (now - previous[0]))), counters
