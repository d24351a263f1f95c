"""The service's outer ASGI wrapper: the bearer-token check (constant time), per-route request
counts, and the fast path that sends POST /v1/gate straight to its handler.
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from verifier.service.http import _Body, _drain, _error, _handle_gate
from verifier.service.peers import INTERNAL_PATH
from verifier.service.review_page import own_review
from verifier.service.state import _State

__all__ = ["_Guard"]

log = logging.getLogger("verifier.service.app")

#: paths answered without a token (orchestrators probe them)
_OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
_ROUTES = ("/v1/gate", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs",
           "/review", "/review/drift", INTERNAL_PATH)
_COOKIE = "verifier_token"


class _Guard:
    """ASGI wrapper: bearer-token check (constant time) and per-route request counts."""

    def __init__(self, app: FastAPI, state: _State) -> None:
        self.app, self.state = app, state
        self.token = state.cfg.token.encode() if state.cfg.token else None
        self._counted: dict[tuple[str, int], Any] = {}

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

        peers = self.state.peers
        try:
            if path == INTERNAL_PATH and peers is not None and peers.authorised(scope["headers"]):
                await self._internal(scope, receive, counted)
            elif self.token is not None and path not in _OPEN_PATHS and not self._authorised(scope):
                await self._refuse(scope, receive, counted)
            elif path == "/v1/gate" and scope["method"] == "POST":
                await self._gate(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            key = (route, status[0])
            child = self._counted.get(key)
            if child is None:  # the labelled child, looked up once per (route, status)
                child = self._counted[key] = self.state.metrics.requests.labels(route, str(status[0]))
            child.inc()

    async def _gate(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The hot path straight to the handler: FastAPI's middleware, routing and dependency
        resolution cost as much CPU per request as a small model's probe pass (profiled)."""
        try:
            resp = await _handle_gate(Request(scope, receive), self.state)
        except Exception:
            log.exception("unhandled error on POST /v1/gate")
            resp = _error(500, "internal error; the server log has the details")
        await resp(scope, receive, send)

    async def _internal(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Another worker of this service asks for this one's review data (`verifier.service.peers`)."""
        part = "counts" if scope.get("query_string", b"") == b"part=counts" else "review"
        data = await own_review(self.state, part)
        await Response(json.dumps(data).encode(), media_type="application/json")(scope, receive, send)

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
