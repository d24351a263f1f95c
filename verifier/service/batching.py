"""The service's micro-batcher: queued uploads gathered for `batch_wait_ms` (or `max_batch`)
into one `Gatekeeper.gate` pass on the single probe thread, each decision routed back to its request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as _Tally
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import numpy as np

from verifier.data import EncodedImage, load_images
from verifier.runtime.decision import Decision
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.service.config import ServiceConfig
from verifier.service.log import _LogBuffer
from verifier.service.metrics import _Metrics
from verifier.service.review import _outcome, _Review

__all__ = ["QueueFull", "_Batcher", "_Job"]

log = logging.getLogger("verifier.service.app")


class _Host(Protocol):
    """What the batcher uses of the service state (`verifier.service.state._State`)."""

    gate: Gatekeeper
    cfg: ServiceConfig
    inflight: int  # POST /v1/gate requests being handled (reading, queued, in a pass, answering)
    metrics: _Metrics
    review: _Review
    logbuf: _LogBuffer | None
    probe_pool: ThreadPoolExecutor


@dataclass
class _Job:
    """One uploaded image waiting for its decision."""

    data: bytes
    name: str
    suffix: str
    future: asyncio.Future = field(repr=False)


class QueueFull(Exception):
    """More images are waiting than `ServiceConfig.queue` allows."""


class _Batcher:
    """Gathers jobs for up to `batch_wait_ms` (or `max_batch` of them) into one `Gatekeeper.gate`
    call on the probe thread, then routes each decision back to its request.

    The window closes early once every request the server holds has queued its images and
    none has come for a fifth of the window (at least 1 ms): the company it waits for could
    only be a request not yet sent, and under load the probe would sit idle for nothing (at
    concurrency 32 the 32 requests of a round arrive within about 2 ms; a full 5 ms window
    cost a quarter of the throughput, measured)."""

    def __init__(self, state: _Host) -> None:
        self.state = state
        self.waiting = 0        # queued, not yet in a probe pass
        self.pending = 0        # queued or in a pass, not yet answered
        self.requests = 0       # requests whose images are all queued or in a pass
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # one of several workers: the queue-depth gauge is a file the scrape sums, set on change
        # (a single process reads `waiting` when scraped instead)
        self._depth = state.metrics.queue_depth.set if state.metrics.shared else None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, jobs: Sequence[_Job]) -> list[Decision]:
        cfg = self.state.cfg
        if self.pending + len(jobs) > cfg.queue:
            raise QueueFull(f"{self.pending} images are waiting (queue {cfg.queue}); retry shortly")
        assert self._queue is not None
        self.pending += len(jobs)
        self.waiting += len(jobs)
        self.requests += 1
        if self._depth is not None:
            self._depth(self.waiting)
        for j in jobs:
            self._queue.put_nowait(j)
        try:
            if len(jobs) == 1:  # a raw body: its future alone, no gathering future around it
                return [await jobs[0].future]
            return list(await asyncio.gather(*(j.future for j in jobs)))
        finally:
            self.pending -= len(jobs)
            self.requests -= 1

    async def _run(self) -> None:
        assert self._queue is not None
        q, cfg = self._queue, self.state.cfg
        loop = asyncio.get_running_loop()
        wait = cfg.batch_wait_ms / 1000.0
        quiet = max(0.001, wait / 5)
        while True:
            batch = [await q.get()]
            last = loop.time()
            deadline = last + wait
            while len(batch) < cfg.max_batch:  # gather for batch_wait_ms or up to max_batch
                n = len(batch)
                while len(batch) < cfg.max_batch and not q.empty():
                    batch.append(q.get_nowait())
                now = loop.time()
                if len(batch) > n:
                    last = now
                if now >= deadline or len(batch) >= cfg.max_batch:
                    break
                if self.state.inflight <= self.requests and now - last >= quiet:
                    break  # every request the server holds is in: no company is on its way
                await asyncio.sleep(min(deadline - now, 0.001))
            self.waiting -= len(batch)
            if self._depth is not None:
                self._depth(self.waiting)
            try:
                decisions = await loop.run_in_executor(self.state.probe_pool, self._gate, batch)
            except Exception as e:  # the gate itself failed: every request of the batch learns why
                log.exception("probe pass failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            for j, d in zip(batch, decisions):
                if not j.future.done():
                    j.future.set_result(d)

    def _gate(self, batch: list[_Job]) -> list[Decision]:
        """On the probe thread: the uploads, decoded from memory -> one gate call -> decisions
        named after the client's files; logged and recorded before anyone is answered."""
        st = self.state
        t0 = time.perf_counter()
        uploads = [EncodedImage(j.name, j.data, j.suffix or None) for j in batch]
        decisions = st.gate.gate(uploads, workers=1)  # a micro-batch of small uploads: inline
        if len(decisions) != len(batch):
            raise RuntimeError(f"gate answered {len(decisions)} decisions for {len(batch)} files")
        for d, j in zip(decisions, batch):
            d.input = j.name
        rejected = [i for i, d in enumerate(decisions) if not d.accepted and not d.error]
        keep = rejected[-st.cfg.review_keep:]
        pixels = _pixels(uploads, keep, st.gate) if keep else {}
        now = datetime.now(timezone.utc)
        if st.logbuf is not None:
            st.logbuf.add(decisions, now)
        st.review.record(decisions, pixels, now)
        m = st.metrics
        m.batch_size.observe(len(batch))
        m.batch_seconds.observe(time.perf_counter() - t0)
        for outcome, n in _Tally(_outcome(d) for d in decisions).items():
            m.decisions.labels(outcome).inc(n)
        return decisions


def _pixels(uploads: list[EncodedImage], idx: list[int], gate: Gatekeeper) -> dict[int, np.ndarray]:
    """Preprocessed (C, H, W) pixels of the rejected images kept for /review."""
    recs = load_images([uploads[i] for i in idx], gate.bundle.spec, workers=1)
    return {i: r.pixels for i, r in zip(idx, recs) if r.pixels is not None}
