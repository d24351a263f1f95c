"""The gating service's Prometheus metrics, in a registry of each app's own.
Requests, decisions, batch sizes and times, queue depth and the decision log's progress.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["_Metrics"]


class _Metrics:
    """Prometheus metrics in a registry of the app's own (two apps in a process never clash)."""

    def __init__(self, alpha: float) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("verifier_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.decisions = Counter("verifier_decisions", "decisions returned, by outcome",
                                 ["outcome"], registry=r)
        self.rejection_rate = Gauge("verifier_rejection_rate",
                                    "rejected / readable inputs today (UTC), compare with verifier_alpha",
                                    registry=r)
        Gauge("verifier_alpha", "the gate's target false-rejection rate", registry=r).set(alpha)
        self.batch_size = Histogram("verifier_batch_size", "images per probe pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.latency = Histogram("verifier_request_seconds", "POST /v1/gate time from request to answer",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch_seconds = Histogram("verifier_batch_seconds", "time of one probe pass (decode to decision)",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.queue_depth = Gauge("verifier_queue_depth", "images waiting for a probe pass", registry=r)
        self.log_pending = Gauge("verifier_log_pending_rows", "decisions not yet written to the log",
                                 registry=r)
        self.log_rows = Counter("verifier_log_rows_written", "decisions written to the Parquet log",
                                registry=r)
