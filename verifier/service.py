"""The gating service: an ASGI app (FastAPI on uvicorn) answering POSTed images with gate decisions.

Concurrent requests are micro-batched into one probe pass run off the event loop; bodies,
read times and the queue are bounded; decisions reach the Parquet log in batches.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import tempfile
import threading
import time
import uuid
from collections import Counter as _Tally
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp

from .decision import Decision
from .decision_log import DecisionLog
from .gate import Gatekeeper
from .io import IMAGE_SUFFIXES, load_images

__all__ = ["ServiceConfig", "create_app", "serve", "is_loopback", "latest_drift_report", "DecisionRecord",
           "QueueFull"]

log = logging.getLogger("verifier.service")

#: raw-body content types taken as one image file (the decoder sniffs the bytes)
RAW_TYPES = frozenset({"application/octet-stream", "application/dicom", "application/x-npy",
                       "application/npy"})
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/tiff": ".tif", "image/bmp": ".bmp",
           "application/dicom": ".dcm", "application/x-npy": ".npy", "application/npy": ".npy"}
#: paths answered without a token (orchestrators probe them)
_OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
_ROUTES = ("/v1/gate", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs",
           "/review", "/review/drift")
_COOKIE = "verifier_token"
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class ServiceConfig:
    """Service bounds and options (the `verifier serve` flags)."""

    max_batch: int = 32            # images per probe pass at most
    batch_wait_ms: float = 5.0     # how long the first image of a batch waits for company
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


class DecisionRecord(BaseModel):
    """One decision: the JSON object of `verifier gate --json` (OpenAPI schema)."""

    input: str
    decision: str
    p_value: float | None
    predicted_class: str | None
    confidence: float | None
    reasons: list[str]
    scores: dict[str, float | None]
    p_values: dict[str, float | None]
    error: str | None


class ErrorBody(BaseModel):
    """Every refusal (4xx, 5xx) is one JSON object with an `error` message."""

    error: str


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def create_app(gate: Gatekeeper, config: ServiceConfig | None = None) -> ASGIApp:
    """The ASGI app: POST /v1/gate, /health/live, /health/ready, /metrics, /review, /docs.
    It is the FastAPI app wrapped in the token check and request counting."""
    cfg = config or ServiceConfig()
    state = _State(gate, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="verifier gate", version=_version(), lifespan=lifespan,
                  description="Runtime input gating with calibrated conformal decisions. "
                              "POST an image to /v1/gate; the answer is the JSON record of "
                              "`verifier gate --json`.")
    app.state.verifier = state
    app.add_exception_handler(Exception, _internal_error)
    _add_routes(app, state)
    return _Guard(app, state)


# ------------------------------------------------------------------------------------ state
class _State:
    """What the routes share: the gate, the batcher, the log buffer, metrics and review data."""

    def __init__(self, gate: Gatekeeper, cfg: ServiceConfig) -> None:
        self.gate, self.cfg = gate, cfg
        self.metrics = _Metrics(gate.alpha)
        self.review = _Review(cfg.review_keep, cfg.recent_keep)
        self.logbuf = _LogBuffer(DecisionLog(cfg.log), gate.bundle.bundle_id, gate.alpha,
                                 cfg.log_rows, self.metrics) if cfg.log else None
        # one thread runs every probe pass: the probe is not shared between threads
        self.probe_pool = ThreadPoolExecutor(1, thread_name_prefix="verifier-probe")
        self.batcher = _Batcher(self)
        self.ready = False
        self.inflight = 0
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


# ---------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------- batcher
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
    call on the probe thread, then routes each decision back to its request."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.waiting = 0        # queued, not yet in a probe pass
        self.pending = 0        # queued or in a pass, not yet answered
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

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
        for j in jobs:
            self._queue.put_nowait(j)
        try:
            return list(await asyncio.gather(*(j.future for j in jobs)))
        finally:
            self.pending -= len(jobs)

    async def _run(self) -> None:
        assert self._queue is not None
        q, cfg = self._queue, self.state.cfg
        loop = asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            deadline = loop.time() + cfg.batch_wait_ms / 1000.0
            while len(batch) < cfg.max_batch:  # gather for batch_wait_ms or up to max_batch
                while len(batch) < cfg.max_batch and not q.empty():
                    batch.append(q.get_nowait())
                left = deadline - loop.time()
                if left <= 0 or len(batch) >= cfg.max_batch:
                    break
                await asyncio.sleep(min(left, 0.001))
            self.waiting -= len(batch)
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
        """On the probe thread: files in a temporary folder -> one gate call -> decisions
        named after the client's files; logged and recorded before anyone is answered."""
        st = self.state
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="verifier-serve-") as tmp:
            paths = []
            for i, j in enumerate(batch):
                p = Path(tmp) / f"{i}{j.suffix}"
                p.write_bytes(j.data)
                paths.append(p)
            decisions = st.gate.gate(paths, workers=1)  # a micro-batch of small uploads: inline
            if len(decisions) != len(batch):
                raise RuntimeError(f"gate answered {len(decisions)} decisions for {len(batch)} files")
            for d, p, j in zip(decisions, paths, batch):
                d.input = j.name
                if d.error:  # the decoder names the temporary file; the client knows its own name
                    d.error = d.error.replace(str(p), j.name)
            rejected = [i for i, d in enumerate(decisions) if not d.accepted and not d.error]
            keep = rejected[-st.cfg.review_keep:]
            pixels = _pixels(paths, keep, st.gate) if keep else {}
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


def _pixels(paths: list[Path], idx: list[int], gate: Gatekeeper) -> dict[int, np.ndarray]:
    """Preprocessed (C, H, W) pixels of the rejected images kept for /review."""
    recs = load_images([paths[i] for i in idx], gate.bundle.spec, workers=1)
    return {i: r.pixels for i, r in zip(idx, recs) if r.pixels is not None}


def _outcome(d: Decision) -> str:
    return "error" if d.error else d.decision


# ------------------------------------------------------------------------------- log buffer
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


# ----------------------------------------------------------------------------------- review
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

    def snapshot(self) -> tuple[date, dict[str, int], list[tuple[datetime, Decision]], list[_Rejected]]:
        with self._lock:
            return (self.day, dict(self.counts), list(self.recent)[::-1], list(self.rejected)[::-1])


# ------------------------------------------------------------------------------------ routes
_GATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    },
    "parameters": [{"name": "X-Filename", "in": "header", "required": False,
                    "schema": {"type": "string"},
                    "description": "the image's file name, logged as `input` (raw bodies)"}],
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorBody, "description": d} for c, d in (
        (400, "malformed request (empty body, no file in a multipart form)"),
        (401, "missing or wrong bearer token"),
        (408, "the body did not arrive within the body timeout"),
        (413, "body over the size limit"),
        (415, "a content type that is not an image"),
        (503, "queue full (see Retry-After) or not ready yet"))}


def _add_routes(app: FastAPI, st: _State) -> None:
    cfg = st.cfg

    @app.post("/v1/gate", response_model=list[DecisionRecord] | DecisionRecord,
              responses=_ERRORS, openapi_extra=_GATE_BODY,
              summary="Gate one image (raw body) or several (multipart)")
    async def gate_images(request: Request) -> Response:
        """A raw image body (PNG, JPEG, BMP, TIFF, DICOM, .npy; `X-Filename` names it) answers
        one decision record; a multipart form answers a list, one per file, in order. An
        unreadable image is a 200 with a reject record whose `error` says why."""
        return await _handle_gate(request, st)

    @app.get("/health/live", summary="The process answers")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", summary="Bundle loaded and probe warm", responses={503: {"model": ErrorBody}})
    async def ready() -> Response:
        if not st.ready:
            return _error(503, "not ready: the probe is warming up or the service is stopping")
        b = st.gate.bundle
        return JSONResponse({"status": "ready", "bundle_id": b.bundle_id, "alpha": st.gate.alpha,
                             "classes": list(b.classes), "max_batch": cfg.max_batch})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/review", response_class=HTMLResponse, summary="Today's decisions and rejected images")
    async def review(request: Request, token: str | None = None) -> Response:
        if token is not None and cfg.token is not None:  # a browser's way in: set a cookie once
            resp = RedirectResponse("/review", status_code=303)
            resp.set_cookie(_COOKIE, token, httponly=True, samesite="strict")
            return resp
        from .review_page import render_review

        html = await asyncio.get_running_loop().run_in_executor(st.probe_pool, render_review, st, None)
        return HTMLResponse(html)

    @app.get("/review/rejected/{item}", response_class=HTMLResponse, summary="One rejected image")
    async def review_item(item: int) -> Response:
        from .review_page import render_review

        html = await asyncio.get_running_loop().run_in_executor(st.probe_pool, render_review, st, item)
        if html is None:
            return _error(404, f"rejected image {item} is no longer kept (the last {cfg.review_keep} are)")
        return HTMLResponse(html)

    @app.get("/review/drift", summary="The latest drift report", response_class=HTMLResponse)
    async def drift() -> Response:
        path = latest_drift_report(cfg.drift_report)
        if path is None:
            return _error(404, "no drift report: start the service with --drift-report PATH")
        return FileResponse(path, media_type="text/html")


def latest_drift_report(where: Path | None) -> Path | None:
    """`where` itself when it is a file, the newest *.html in it when a folder, else None."""
    if where is None:
        return None
    if where.is_file():
        return where
    if where.is_dir():
        found = sorted(where.glob("*.html"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
    return None


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


async def _gate_request(request: Request, reader: _Body, st: _State, t0: float) -> Response:
    cfg = st.cfg
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if ctype and not multipart and not ctype.startswith("image/") and ctype not in RAW_TYPES:
        await _drain(reader, cfg)
        return _error(415, f"content type {ctype!r} is not an image: send image/* (PNG, JPEG, BMP, "
                           "TIFF), application/dicom, application/x-npy or application/octet-stream "
                           "as the body, or multipart/form-data with image files")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        await _drain(reader, cfg)
        return _error(413, f"body of {declared} bytes is over the {cfg.max_body_mb:g} MB limit "
                           "(--max-body-mb)", close=True)
    try:
        body = await asyncio.wait_for(reader.read(cfg.max_body_bytes), cfg.body_timeout_s)
    except _TooLarge:
        await _drain(reader, cfg)
        return _error(413, f"body is over the {cfg.max_body_mb:g} MB limit (--max-body-mb)", close=True)
    except asyncio.TimeoutError:
        return _error(408, f"the body did not arrive within {cfg.body_timeout_s:g} s", close=True)
    except _Disconnected:
        return _error(400, "the client closed the connection before the body ended", close=True)
    rid = uuid.uuid4().hex[:12]
    loop = asyncio.get_running_loop()
    if multipart:
        parsed = await _form_files(request, body, cfg.max_files, rid)
        if isinstance(parsed, Response):
            return parsed
        jobs = [_Job(data, name, _suffix(name, ct), loop.create_future()) for name, ct, data in parsed]
    else:
        if not body:
            return _error(400, "empty body: send one image file as the body (or a multipart form)")
        name = _clean_name(request.headers.get("x-filename")) or f"request-{rid}"
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
    return JSONResponse(payload, headers={"X-Request-ID": rid})


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
    """The temporary file's suffix: the client's when it is an image suffix, else the type's."""
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


# ------------------------------------------------------------------------------------- guard
class _Guard:
    """ASGI wrapper: bearer-token check (constant time) and per-route request counts."""

    def __init__(self, app: FastAPI, state: _State) -> None:
        self.app, self.state = app, state
        self.token = state.cfg.token.encode() if state.cfg.token else None

    def __getattr__(self, name: str) -> Any:  # app.state, app.openapi() ... stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else ("/review/rejected" if path.startswith("/review/rejected/")
                                               else "other")
        status = [500]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token is not None and path not in _OPEN_PATHS and not self._authorised(scope):
                await self._refuse(scope, receive, counted)
            elif path == "/v1/gate" and scope["method"] == "POST":
                await self._gate(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.state.metrics.requests.labels(route, str(status[0])).inc()

    async def _gate(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The hot path straight to the handler: FastAPI's middleware, routing and dependency
        resolution cost as much CPU per request as a small model's probe pass (profiled)."""
        try:
            resp = await _handle_gate(Request(scope, receive), self.state)
        except Exception:
            log.exception("unhandled error on POST /v1/gate")
            resp = _error(500, "internal error; the server log has the details")
        await resp(scope, receive, send)

    def _authorised(self, scope: dict) -> bool:
        assert self.token is not None
        given = b""
        for k, v in scope["headers"]:
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                given = v[7:].strip()
            elif k == b"cookie" and not given:
                for part in v.split(b";"):
                    key, _, val = part.strip().partition(b"=")
                    if key == _COOKIE.encode():
                        given = val
        if scope["path"] == "/review" and not given:  # /review?token=T sets the cookie
            q = dict(p.partition(b"=")[::2] for p in scope.get("query_string", b"").split(b"&"))
            given = q.get(b"token", b"")
            if given:
                return hmac.compare_digest(given, self.token)
        return hmac.compare_digest(given, self.token)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        await _drain(_Body(receive), self.state.cfg)
        resp = _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="verifier"'
        await resp(scope, receive, send)


def _version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------------------------ server
def serve(gate: Gatekeeper, config: ServiceConfig, host: str = "127.0.0.1", port: int = 8080, *,
          keep_alive_s: float = 5.0, header_timeout_s: float = 10.0) -> None:
    """Run the app on uvicorn until SIGTERM / SIGINT; in-flight requests are answered and the
    log flushed before it returns. Refuses a non-loopback `host` without a token."""
    import signal

    import uvicorn

    if not is_loopback(host) and not config.token:
        raise PermissionError(
            f"refusing to listen on {host} without a token: any machine that reaches it could "
            "gate images, read /metrics and see rejected images on /review. Give --token-file F "
            "(clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1")

    app = create_app(gate, config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, http=_protocol(header_timeout_s), lifespan="on", log_level="warning",
        access_log=False, server_header=False, timeout_keep_alive=int(max(1, keep_alive_s)),
        timeout_graceful_shutdown=max(30, int(config.body_timeout_s) + 5),
        limit_concurrency=2 * config.queue + 64))
    # uvicorn re-raises the signal it caught once it has stopped; a no-op handler makes that a
    # clean return (exit 0) instead of death by SIGTERM after the graceful stop
    old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind; the CLI's errors exit 2
        if e.code:
            raise OSError(f"could not serve on {host}:{port} (the reason is logged above)") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
