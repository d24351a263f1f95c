"""HTTP gating service: POST an image, get the gate's decision as JSON.

Standard library only (ThreadingHTTPServer); one gate shared behind a lock, so
concurrent requests are serialised through the model.
"""
from __future__ import annotations

import json
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .gate import Gatekeeper

__all__ = ["make_server", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 64 * 1024 * 1024
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
           "application/dicom": ".dcm", "application/x-npy": ".npy"}


def make_server(gate: Gatekeeper, host: str = "127.0.0.1", port: int = 8080,
                log: str | Path | None = None) -> ThreadingHTTPServer:
    """A server answering `POST /gate` (body: one image file) and `GET /health`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "verifier"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self._send(HTTPStatus.NOT_FOUND, {"error": "unknown path; use POST /gate or GET /health"})
            b = gate.bundle
            self._send(HTTPStatus.OK, {"status": "ok", "bundle_id": b.bundle_id, "alpha": gate.alpha,
                                       "classes": list(b.classes)})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != "/gate":
                return self._send(HTTPStatus.NOT_FOUND, {"error": "unknown path; use POST /gate"})
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": "empty body: send one image file"})
            if length > MAX_BODY_BYTES:
                return self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  {"error": f"body over {MAX_BODY_BYTES} bytes"})
            body = self.rfile.read(length)
            name = self.headers.get("X-Filename") or "upload"
            suffix = Path(name).suffix or _SUFFIX.get(self.headers.get("Content-Type", ""), "")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / ("upload" + suffix)
                path.write_bytes(body)
                with lock:
                    decision = gate.gate([path], log=log)[0]
            decision.input = name
            self._send(HTTPStatus.OK, decision.to_dict())

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet by default; decisions go to the Parquet log when asked

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer((host, port), Handler)
