"""What the service's routes share: the gate, the probe thread, the batcher, the log buffer,
the metrics and the review data, started and stopped with the app's lifespan.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from verifier.runtime.gatekeeper import Gatekeeper
from verifier.runtime.log import DecisionLog
from verifier.service.batching import _Batcher
from verifier.service.config import ServiceConfig
from verifier.service.log import _LogBuffer
from verifier.service.metrics import _Metrics
from verifier.service.peers import Peers
from verifier.service.review import _Review

__all__ = ["_State"]


class _State:
    """What the routes share: the gate, the batcher, the log buffer, metrics and review data."""

    def __init__(self, gate: Gatekeeper, cfg: ServiceConfig, peers: Peers | None = None) -> None:
        self.gate, self.cfg, self.peers = gate, cfg, peers
        # several workers: Prometheus' multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the
        # supervisor) sums their counters; the day's rejection rate is gathered when scraped
        self.metrics = _Metrics(gate.alpha, shared=peers is not None)
        self.review = _Review(cfg.review_keep, cfg.recent_keep)
        self.logbuf = _LogBuffer(DecisionLog(cfg.log), gate.bundle.bundle_id, gate.alpha,
                                 cfg.log_rows, self.metrics) if cfg.log else None
        # one thread runs every probe pass: the probe is not shared between threads
        self.probe_pool = ThreadPoolExecutor(1, thread_name_prefix="verifier-probe")
        self.batcher = _Batcher(self)
        self.ready = False
        self.inflight = 0
        if peers is None:
            self.metrics.rejection_rate.set_function(self.review.rejection_rate)
            self.metrics.queue_depth.set_function(lambda: self.batcher.waiting)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.batcher.start()
        if self.logbuf is not None:
            self.logbuf.start(loop, self.cfg.log_seconds)
        await loop.run_in_executor(self.probe_pool, self._warm)
        self.ready = True

    async def stop(self) -> None:
        """Graceful stop (uvicorn has already answered the requests in flight): flush the log."""
        self.ready = False
        await self.batcher.stop()
        if self.logbuf is not None:
            await self.logbuf.stop()
        self.probe_pool.shutdown(wait=True)

    def _warm(self) -> None:
        h, w = self.gate.bundle.spec.size
        self.gate.gate(np.zeros((1, h, w), dtype=np.uint8))  # first pass allocates; not logged
