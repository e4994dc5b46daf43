"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.queue_rows = Gauge(
            "flowserve_queue_rows", "Rows admitted and not finished.", ["model"], registry=r
        )
        self.queue_requests = Gauge(
            "flowserve_queue_requests", "Requests admitted and not finished.", ["model"], registry=r
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
