"""Prometheus metrics, one registry per app so several apps can live in one process (tests).

With several processes (HTTP fronts and an engine process, `python -m service` with
FLOW_ENGINE=process), PROMETHEUS_MULTIPROC_DIR is set before any of them starts: every process
writes its values to files there, and /metrics, whichever front answers it, sums them all
(prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

TALLY_FLUSH_S = 0.1
"""How long a `Tally` keeps observations before writing them to its histogram."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536, 262144)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flowserve_requests",
            "Requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "flowserve_request_duration_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pass_rows = Histogram(
            "flowserve_forward_pass_rows",
            "Rows evaluated per forward pass.",
            ["model"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        # Set by the process that runs the engines: summed over live processes, that one.
        self.pass_requests = Histogram(
            "flowserve_forward_pass_requests",
            "Requests whose rows shared a forward pass.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_rows = Gauge(
            "flowserve_queue_rows",
            "Rows admitted and not finished.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_requests = Gauge(
            "flowserve_queue_requests",
            "Requests admitted and not finished.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.samples = Counter(
            "flowserve_samples",
            "Points produced (samples, trajectories, latents).",
            ["model"],
            registry=r,
        )
        self.nonfinite = Counter(
            "flowserve_nonfinite_answers",
            "Requests refused because the model produced NaN or infinity.",
            ["model"],
            registry=r,
        )
        self.rows_dropped = Counter(
            "flowserve_rows_dropped",
            "Rows that left a batch unfinished (client gone, deadline).",
            ["model", "reason"],
            registry=r,
        )

        self.model_errors = Counter(
            "flowserve_model_errors",
            "Requests failed because the model raised or answered the wrong shape or type.",
            ["model"],
            registry=r,
        )
        self.engine_faults = Counter(
            "flowserve_engine_faults",
            "Engines given up: died (an error outside a model call) or stalled.",
            ["model", "kind"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "flowserve_engine_restarts",
            "Engines replaced by the watchdog.",
            ["model"],
            registry=r,
        )

        self._tallies: dict[tuple[Histogram, tuple[str, ...]], Tally] = {}

    def tally(self, histogram: Histogram, *labels: str) -> Tally:
        """The `Tally` of one labelled child of `histogram` (one per child, made once)."""
        key = (histogram, labels)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally(histogram.labels(*labels))
        return tally

    def flush(self) -> None:
        """Write every tally's observations to its histogram."""
        for tally in list(self._tallies.values()):
            tally.flush()

    def render(self) -> bytes:
        self.flush()
        if shared():
            every_process = CollectorRegistry()
            MultiProcessCollector(every_process)
            return generate_latest(every_process)
        return generate_latest(self.registry)


def shared() -> bool:
    """Whether every process of the service writes its metrics where each can read them all."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Tally:
    """Observations of one histogram child, counted here per bucket and written to it at most
    every TALLY_FLUSH_S seconds, and whenever `flush` is called (`Metrics.render` does, so this
    process's own /metrics answer is exact).

    An engine observes two histograms per pass, thousands of passes a second; a histogram's own
    `observe` writes the sum and a bucket each time (in multiprocess mode, to a memory-mapped
    file, under a lock). A tally writes each bucket that changed once per flush. It reaches for
    the child's value objects (`_upper_bounds`, `_buckets`, `_sum`, the names prometheus_client
    has used since its 0.x releases); without them it observes each value as it comes."""

    def __init__(self, child: Any) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        direct = bounds is None or not hasattr(child, "_buckets") or not hasattr(child, "_sum")
        self._bounds: list[float] | None = None if direct else list(bounds)
        self._counts = [0] * len(bounds or ())
        self._total = 0.0
        self._seen = 0
        self._due = time.monotonic() + TALLY_FLUSH_S
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if self._bounds is None:
            self._child.observe(value)
            return
        bucket = bisect.bisect_left(self._bounds, value)  # the first bound >= value
        with self._lock:
            self._counts[bucket] += 1
            self._total += value
            self._seen += 1
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._due = time.monotonic() + TALLY_FLUSH_S
            if not self._seen:
                return
            counts, total = self._counts, self._total
            self._counts, self._total, self._seen = [0] * len(counts), 0.0, 0
        child = self._child
        child._sum.inc(total)
        for bucket, count in enumerate(counts):
            if count:
                child._buckets[bucket].inc(count)
