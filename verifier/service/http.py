"""The service's HTTP layer: POST /v1/gate's body reading and limits (size, time, type, queue),
error responses, and the uvicorn protocol that times out a request head that never arrives.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from verifier.data import IMAGE_SUFFIXES
from verifier.service.batching import QueueFull, _Job
from verifier.service.config import ServiceConfig
from verifier.service.state import _State

__all__ = ["RAW_TYPES"]

log = logging.getLogger("verifier.service.app")

#: raw-body content types taken as one image file (the decoder sniffs the bytes)
RAW_TYPES = frozenset({"application/octet-stream", "application/dicom", "application/x-npy",
                       "application/npy"})
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
           "application/dicom": ".dcm", "application/x-npy": ".npy", "application/npy": ".npy"}
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f]")


async def _handle_gate(request: Request, st: _State) -> Response:
    """POST /v1/gate, from the route or from `_Guard`'s fast path (the same answers)."""
    cfg = st.cfg
    t0 = time.perf_counter()
    body = _Body(request.receive)
    if not st.ready:
        await _drain(body, cfg)
        return _error(503, "the gate is warming up; retry shortly", retry_after=1)
    if st.inflight >= cfg.queue:
        await _drain(body, cfg)
        return _error(503, f"{st.inflight} requests in flight (queue {cfg.queue}); retry shortly",
                      retry_after=1)
    st.inflight += 1
    try:
        return await _gate_request(request, body, st, t0)
    finally:
        st.inflight -= 1


def _head(scope: dict) -> tuple[str, str | None, str | None]:
    """(content type, Content-Length, X-Filename) straight from the ASGI headers: the hot path
    needs three of them, not a header mapping of them all."""
    ctype = length = name = None
    for k, v in scope["headers"]:
        if k == b"content-type" and ctype is None:  # the first, as Starlette's Headers.get
            ctype = v.decode("latin-1")
        elif k == b"content-length" and length is None:
            length = v.decode("latin-1")
        elif k == b"x-filename" and name is None:
            name = v.decode("latin-1")
    return (ctype or "").split(";")[0].strip().lower(), length, name


async def _gate_request(request: Request, reader: _Body, st: _State, t0: float) -> Response:
    cfg = st.cfg
    ctype, declared, filename = _head(request.scope)
    multipart = ctype == "multipart/form-data"
    if ctype and not multipart and not ctype.startswith("image/") and ctype not in RAW_TYPES:
        await _drain(reader, cfg)
        return _error(415, f"content type {ctype!r} is not an image: send image/* (PNG, JPEG, BMP, "
                           "TIFF), application/dicom, application/x-npy or application/octet-stream "
                           "as the body, or multipart/form-data with image files")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        await _drain(reader, cfg)
        return _error(413, f"body of {declared} bytes is over the {cfg.max_body_mb:g} MB limit "
                           "(--max-body-mb)", close=True)
    try:
        async with asyncio.timeout(cfg.body_timeout_s):  # no task per request, as wait_for makes
            body = await reader.read(cfg.max_body_bytes)
    except _TooLarge:
        await _drain(reader, cfg)
        return _error(413, f"body is over the {cfg.max_body_mb:g} MB limit (--max-body-mb)", close=True)
    except TimeoutError:
        return _error(408, f"the body did not arrive within {cfg.body_timeout_s:g} s", close=True)
    except _Disconnected:
        return _error(400, "the client closed the connection before the body ended", close=True)
    rid = os.urandom(6).hex()
    loop = asyncio.get_running_loop()
    if multipart:
        parsed = await _form_files(request, body, cfg.max_files, rid)
        if isinstance(parsed, Response):
            return parsed
        jobs = [_Job(data, name, _suffix(name, ct), loop.create_future()) for name, ct, data in parsed]
    else:
        if not body:
            return _error(400, "empty body: send one image file as the body (or a multipart form)")
        name = _clean_name(filename) or f"request-{rid}"
        jobs = [_Job(body, name, _suffix(name, ctype), loop.create_future())]
    try:
        decisions = await st.batcher.submit(jobs)
    except QueueFull as e:
        return _error(503, str(e), retry_after=1)
    except Exception:
        log.exception("gating failed")
        return _error(500, "gating failed inside the service; the server log has the details")
    st.metrics.latency.observe(time.perf_counter() - t0)
    payload: Any = [d.to_dict() for d in decisions] if multipart else decisions[0].to_dict()
    return _Json(payload, headers=[(b"x-request-id", rid.encode())])


#: JSONResponse's encoding (compact, UTF-8), built once instead of by json.dumps per call
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class _Json(Response):
    """A JSON answer, its headers built as raw bytes: JSONResponse's `MutableHeaders` and
    `json.dumps` keyword handling cost as much as the rest of the handler (profiled)."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status_code = status_code
        self.background = None
        self.body = _ENCODE(content).encode()
        self.raw_headers = [(b"content-length", str(len(self.body)).encode()),
                            (b"content-type", b"application/json"), *(headers or ())]


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class _Body:
    """The request body read straight from ASGI `receive`, remembering whether it ended, so a
    refusal can discard the rest of it (and never waits for a body that already ended)."""

    def __init__(self, receive: Callable) -> None:
        self.receive = receive
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.done = True
                raise _Disconnected
            self.done = not msg.get("more_body", False)
            yield msg.get("body", b"")

    async def read(self, limit: int) -> bytes:
        """The whole body, refused past `limit` bytes (chunked bodies of no stated length too)."""
        chunks, size = [], 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)


async def _drain(body: _Body, cfg: ServiceConfig) -> None:
    """Read and discard what is left of the body (bounded in bytes and time) before refusing, so
    the client, still sending, gets to read the answer instead of a reset connection."""
    cap = 4 * cfg.max_body_bytes + (64 << 20)

    async def discard() -> None:
        seen = 0
        async for chunk in body.chunks():
            seen += len(chunk)
            if seen > cap:
                return

    with contextlib.suppress(asyncio.TimeoutError, _Disconnected):
        await asyncio.wait_for(discard(), cfg.body_timeout_s)


async def _form_files(request: Request, body: bytes, max_files: int,
                      rid: str) -> list[tuple[str, str, bytes]] | Response:
    """(name, content type, bytes) of every file part of a multipart body already read."""
    from starlette.datastructures import UploadFile

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files)
    except Exception as e:  # python-multipart's and Starlette's parse errors alike
        return _error(400, f"malformed multipart form: {getattr(e, 'detail', None) or e}")
    files = []
    try:
        for i, (_, value) in enumerate(form.multi_items()):
            if isinstance(value, UploadFile):
                name = _clean_name(value.filename) or f"request-{rid}/{i}"
                files.append((name, (value.content_type or "").lower(), await value.read()))
    finally:
        await form.close()
    if not files:
        return _error(400, "the multipart form holds no file part: add one or more image files")
    return files


def _suffix(name: str, ctype: str) -> str:
    """The decoder's suffix hint: the client's when it is an image suffix, else the type's."""
    s = Path(name).suffix.lower()
    return s if s in IMAGE_SUFFIXES else _SUFFIX.get(ctype, "")


def _clean_name(name: str | None) -> str | None:
    if not name:
        return None
    name = _NAME_BAD.sub("", name).strip()[:255]
    return name or None


def _error(status: int, message: str, *, retry_after: int | None = None, close: bool = False) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error; the server log has the details")


def _protocol(header_timeout: float) -> type:
    """uvicorn's fastest available HTTP/1.1 protocol (httptools, else h11) with a head timer."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools not installed: the pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    return type("HeadTimeoutProtocol", (_HeadTimeout, base), {"header_timeout": header_timeout})


class _HeadTimeout:
    """Mixin for a uvicorn HTTP protocol: a client that connects and sends no complete request
    head within `header_timeout` s gets a 408 and the connection closes (uvicorn alone waits
    forever for a request head; its keep-alive timer only runs between requests)."""

    header_timeout = 10.0
    _HEAD_408 = b'{"error": "the request head did not arrive in time"}'
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is None or self.cycle.response_complete:
            if self._head_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._disarm()  # idle time between requests is uvicorn's timeout_keep_alive

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        body = self._HEAD_408
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)
        self.transport.close()
