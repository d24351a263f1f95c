"""The gating service's configuration: the bounds and options of `verifier serve`.
Checked on construction, so the app never starts with a zero queue or a negative timeout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServiceConfig"]


@dataclass
class ServiceConfig:
    """Service bounds and options (the `verifier serve` flags)."""

    max_batch: int = 32            # images per probe pass at most
    batch_wait_ms: float = 5.0     # how long the first image of a batch waits for company, at most
    max_body_mb: float = 16.0      # request body limit (413 beyond)
    queue: int = 256               # images (and requests) accepted and not yet answered (503 beyond)
    body_timeout_s: float = 10.0   # whole body must arrive within this (408 beyond)
    max_files: int = 64            # files per multipart request
    token: str | None = None       # bearer token; None = no auth (loopback only, see `is_loopback`)
    log: Path | None = None        # decision log folder
    log_rows: int = 512            # flush the log buffer at this many rows ...
    log_seconds: float = 2.0       # ... or every this many seconds
    review_keep: int = 24          # rejected images kept in memory for /review
    recent_keep: int = 200         # recent decisions listed on /review
    drift_report: Path | None = None  # an HTML report, or a folder whose newest *.html is linked

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue", "max_files", "log_rows", "review_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "max_body_mb", "body_timeout_s", "log_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
