"""The service's FastAPI routes: /v1/gate, the health probes, /metrics, /review and the drift
report link, with the OpenAPI schema of the decision record and of every refusal.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from pydantic import BaseModel

from verifier.service.guard import _COOKIE
from verifier.service.http import _error, _handle_gate
from verifier.service.metrics import CONTENT_TYPE_LATEST
from verifier.service.review_page import (
    latest_drift_report,
    merge_review,
    own_review,
    rejection_rate,
    render_review,
)
from verifier.service.state import _State

__all__ = ["DecisionRecord", "ErrorBody", "gather_review", "latest_drift_report", "_add_routes"]


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
        body = {"status": "ready", "bundle_id": b.bundle_id, "alpha": st.gate.alpha,
                "classes": list(b.classes), "max_batch": cfg.max_batch}
        if st.peers is not None:  # which of the workers answered this connection
            body.update(worker=st.peers.index, workers=st.peers.count)
        return JSONResponse(body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        rate = None
        if st.peers is not None:  # workers: the day's rate over all of them
            rate = rejection_rate((await gather_review(st, "counts"))["counts"])
        return Response(st.metrics.exposition(rate), media_type=CONTENT_TYPE_LATEST)

    @app.get("/review", response_class=HTMLResponse, summary="Today's decisions and rejected images")
    async def review(request: Request, token: str | None = None) -> Response:
        if token is not None and cfg.token is not None:  # a browser's way in: set a cookie once
            resp = RedirectResponse("/review", status_code=303)
            resp.set_cookie(_COOKIE, token, httponly=True, samesite="strict")
            return resp
        data = await gather_review(st, "review")
        html = await asyncio.get_running_loop().run_in_executor(st.probe_pool, render_review, st, data, None)
        return HTMLResponse(html)

    @app.get("/review/rejected/{item}", response_class=HTMLResponse, summary="One rejected image")
    async def review_item(item: int) -> Response:
        data = await gather_review(st, "review")
        html = await asyncio.get_running_loop().run_in_executor(st.probe_pool, render_review, st, data, item)
        if html is None:
            return _error(404, f"rejected image {item} is no longer kept (the last {cfg.review_keep} are)")
        return HTMLResponse(html)

    @app.get("/review/drift", summary="The latest drift report", response_class=HTMLResponse)
    async def drift() -> Response:
        path = latest_drift_report(cfg.drift_report)
        if path is None:
            return _error(404, "no drift report: start the service with --drift-report PATH")
        return FileResponse(path, media_type="text/html")


async def gather_review(st: _State, part: str) -> dict[str, Any]:
    """This worker's review data (`local_review`), merged with every other worker's when the
    service runs several."""
    local = await own_review(st, part)
    others = await st.peers.ask(part) if st.peers is not None else []
    return merge_review([local, *others], st.cfg.recent_keep)
