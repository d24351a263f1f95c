"""The gating service's Prometheus metrics, in a registry of each app's own.
Requests, decisions, batch sizes and times, queue depth and the decision log's progress;
with several workers, prometheus-client's multiprocess mode adds up every worker's values.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "_Metrics"]

_RATE = ("verifier_rejection_rate", "rejected / readable inputs today (UTC), compare with verifier_alpha")


class _Metrics:
    """Prometheus metrics in a registry of the app's own (two apps in a process never clash)."""

    def __init__(self, alpha: float, shared: bool = False) -> None:
        """`shared`: one of several worker processes (PROMETHEUS_MULTIPROC_DIR is set): the
        gauges are summed over live workers, and the rejection rate is made when scraped."""
        self.shared = shared
        r = self.registry = CollectorRegistry()
        self.requests = Counter("verifier_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.decisions = Counter("verifier_decisions", "decisions returned, by outcome",
                                 ["outcome"], registry=r)
        # a callback gauge has no multiprocess form: with workers, `exposition` makes it
        self.rejection_rate = None if shared else Gauge(*_RATE, registry=r)
        Gauge("verifier_alpha", "the gate's target false-rejection rate", registry=r,
              multiprocess_mode="livemax").set(alpha)
        self.batch_size = Histogram("verifier_batch_size", "images per probe pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.latency = Histogram("verifier_request_seconds", "POST /v1/gate time from request to answer",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch_seconds = Histogram("verifier_batch_seconds", "time of one probe pass (decode to decision)",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.queue_depth = Gauge("verifier_queue_depth", "images waiting for a probe pass", registry=r,
                                 multiprocess_mode="livesum")
        self.log_pending = Gauge("verifier_log_pending_rows", "decisions not yet written to the log",
                                 registry=r, multiprocess_mode="livesum")
        self.log_rows = Counter("verifier_log_rows_written", "decisions written to the Parquet log",
                                registry=r)

    def exposition(self, rate: float | None = None) -> bytes:
        """The Prometheus text: this app's registry, or with workers every live worker's values
        (from the multiprocess folder) plus `rate`, the day's rejection rate over all of them."""
        if not self.shared:
            return generate_latest(self.registry)
        r = CollectorRegistry()
        MultiProcessCollector(r)
        r.register(_Rate(rate))
        return generate_latest(r)


class _Rate(Collector):
    """The day's rejection rate over every worker, computed by the worker that is scraped."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(*_RATE, value=float("nan") if self.rate is None else self.rate)
