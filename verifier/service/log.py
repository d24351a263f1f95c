"""The service's decision-log buffer: decisions reach the Parquet log in batches, by size or
age and on a graceful stop, written on a thread of their own; a failed write keeps the rows.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from verifier.runtime.decision import Decision
from verifier.runtime.log import DecisionLog
from verifier.service.metrics import _Metrics

__all__ = ["_LogBuffer"]

log = logging.getLogger("verifier.service.app")


class _LogBuffer:
    """Decisions waiting for the Parquet log: written by size (`rows`) or age (`seconds`),
    and on a graceful stop. A failed write keeps the rows for the next try."""

    def __init__(self, dlog: DecisionLog, bundle_id: str, alpha: float, rows: int,
                 metrics: _Metrics) -> None:
        self.dlog, self.bundle_id, self.alpha, self.rows = dlog, bundle_id, alpha, rows
        self.metrics = metrics
        self._items: list[Decision] = []
        self._times: list[datetime] = []
        self._lock = threading.Lock()   # add() runs on the probe thread, flush() on the writer
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="verifier-log")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.written = 0

    def start(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._loop = loop
        self._task = loop.create_task(self._tick(seconds))

    def add(self, decisions: Sequence[Decision], now: datetime) -> None:
        with self._lock:
            self._items.extend(decisions)
            self._times.extend([now] * len(decisions))
            n = len(self._items)
        self.metrics.log_pending.set(n)
        if n >= self.rows:
            self._writer.submit(self.flush)

    def flush(self) -> int:
        """Write what is pending (on the writer thread); returns the rows written."""
        with self._lock:
            items, times = self._items, self._times
            self._items, self._times = [], []
        if not items:
            return 0
        try:
            self.dlog.append(items, bundle_id=self.bundle_id, alpha=self.alpha, time=times)
        except Exception:
            log.exception("decision log write failed; %d rows kept for the next try", len(items))
            with self._lock:
                self._items[:0], self._times[:0] = items, times
            return 0
        self.written += len(items)
        self.metrics.log_rows.inc(len(items))
        with self._lock:
            self.metrics.log_pending.set(len(self._items))
        return len(items)

    async def _tick(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            await loop.run_in_executor(self._writer, self.flush)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.get_running_loop().run_in_executor(self._writer, self.flush)
        self._writer.shutdown(wait=True)
        with self._lock:
            left = len(self._items)
        if left:
            log.error("%d decisions could not be written to the log %s", left, self.dlog.root)
