"""The workers of one `verifier serve --workers N`: who this one is, and how it asks the others
for their review data (today's tallies, recent decisions, rejected images with overlays).

Each worker also listens on a private Unix socket (`worker-<k>.sock` in the service's run
folder, mode 0600 inside a 0700 folder) and answers `GET /internal/review` there, and only to a
request carrying the service's internal secret (`X-Verifier-Internal`), which the supervisor
made for this run and never prints. The TCP port is shared (SO_REUSEPORT): a client cannot pick
a worker, so `/review` and the rejection rate on `/metrics` gather every worker's part this way.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["INTERNAL_HEADER", "INTERNAL_PATH", "Peers"]

log = logging.getLogger("verifier.service.app")

INTERNAL_PATH = "/internal/review"
INTERNAL_HEADER = "x-verifier-internal"


@dataclass(frozen=True)
class Peers:
    """This worker's place among the service's workers, and the way to the others."""

    index: int       # this worker, 0 .. count - 1
    count: int       # workers of the service
    run_dir: Path    # the supervisor's private folder: sockets, metrics files
    secret: str      # the internal requests' shared secret

    def socket_path(self, k: int) -> Path:
        return self.run_dir / f"worker-{k}.sock"

    def authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when the request carries this run's internal secret (constant-time compare)."""
        given = next((v for k, v in headers if k == INTERNAL_HEADER.encode()), b"")
        return hmac.compare_digest(given, self.secret.encode())

    async def ask(self, part: str, timeout_s: float = 10.0) -> list[dict[str, Any] | None]:
        """Every other worker's `local_review(part)` data, in worker order; None for a worker
        that did not answer in time (stopping, restarting, or stuck in a long probe pass)."""
        others = [k for k in range(self.count) if k != self.index]
        return list(await asyncio.gather(*(self._get(k, part, timeout_s) for k in others)))

    async def _get(self, k: int, part: str, timeout_s: float) -> dict[str, Any] | None:
        request = (f"GET {INTERNAL_PATH}?part={part} HTTP/1.1\r\nHost: worker-{k}\r\n"
                   f"{INTERNAL_HEADER}: {self.secret}\r\nConnection: close\r\n\r\n").encode()
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path(k)))
                try:
                    writer.write(request)
                    await writer.drain()
                    raw = await reader.read()  # the worker closes after its answer
                finally:
                    writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace") or "no answer")
            return json.loads(body)
        except (OSError, TimeoutError, ValueError) as e:
            log.warning("worker %d did not answer %s?part=%s: %s", k, INTERNAL_PATH, part,
                        e or type(e).__name__)
            return None
