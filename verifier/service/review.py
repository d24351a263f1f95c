"""What the service keeps for /review: today's tallies, the recent decisions and the last
rejected images (bounded, shared between the probe thread and the page renderer).
"""
from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone

import numpy as np

from verifier.runtime.decision import Decision

__all__ = ["_Rejected", "_Review", "_outcome"]


def _outcome(d: Decision) -> str:
    return "error" if d.error else d.decision


@dataclass
class _Rejected:
    """A rejected image kept for /review: its pixels now, its overlay when first shown."""

    id: int
    time: datetime
    decision: Decision
    pixels: np.ndarray | None       # (C, H, W) preprocessed
    thumb: str | None = None        # data URIs, made on first view
    overlay: str | None = None


class _Review:
    """Today's tallies, the recent decisions, and the last rejected images (bounded deques)."""

    def __init__(self, keep: int, recent: int) -> None:
        self.day = datetime.now(timezone.utc).date()
        self.counts: _Tally[str] = _Tally()
        self.recent: deque[tuple[datetime, Decision]] = deque(maxlen=recent)
        self.rejected: deque[_Rejected] = deque(maxlen=keep)
        self._next = 0
        self._lock = threading.Lock()

    def record(self, decisions: Sequence[Decision], pixels: dict[int, np.ndarray], now: datetime) -> None:
        with self._lock:
            if now.date() != self.day:  # a new UTC day starts a new tally
                self.day, self.counts = now.date(), _Tally()
            self.counts.update(_outcome(d) for d in decisions)
            self.recent.extend((now, d) for d in decisions)
            for i, d in enumerate(decisions):
                if not d.accepted and not d.error:
                    self._next += 1
                    self.rejected.append(_Rejected(self._next, now, d, pixels.get(i)))

    def rejection_rate(self) -> float:
        """Rejected / readable inputs today (errors are counted apart); NaN before any."""
        with self._lock:
            n = self.counts["accept"] + self.counts["reject"]
            return self.counts["reject"] / n if n else float("nan")

    def tally(self) -> tuple[date, dict[str, int]]:
        """Today's date and counts by outcome (a copy)."""
        with self._lock:
            return self.day, dict(self.counts)

    def snapshot(self) -> tuple[date, dict[str, int], list[tuple[datetime, Decision]], list[_Rejected]]:
        with self._lock:
            return (self.day, dict(self.counts), list(self.recent)[::-1], list(self.rejected)[::-1])
