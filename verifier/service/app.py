"""The gating service: an ASGI app (FastAPI on uvicorn) answering POSTed images with gate decisions.

Concurrent requests are micro-batched into one probe pass run off the event loop; bodies,
read times and the queue are bounded; decisions reach the Parquet log in batches. This module
assembles the app (`create_app`) and runs it (`serve`); the parts live in the other modules
of `verifier.service`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp

from verifier.runtime.gatekeeper import Gatekeeper
from verifier.service.config import ServiceConfig
from verifier.service.guard import _Guard
from verifier.service.http import _internal_error, _protocol
from verifier.service.peers import Peers
from verifier.service.routes import _add_routes
from verifier.service.state import _State

__all__ = ["ServiceConfig", "check_bind", "create_app", "is_loopback", "run_server", "serve"]

log = logging.getLogger("verifier.service.app")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def create_app(gate: Gatekeeper, config: ServiceConfig | None = None, *,
               peers: Peers | None = None) -> ASGIApp:
    """The ASGI app: POST /v1/gate, /health/live, /health/ready, /metrics, /review, /docs.
    It is the FastAPI app wrapped in the token check and request counting. `peers`: this app
    is one worker of several (`verifier serve --workers N`; `verifier.service.workers`)."""
    cfg = config or ServiceConfig()
    state = _State(gate, cfg, peers)

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


def _version() -> str:
    from verifier import __version__

    return __version__


# ------------------------------------------------------------------------------------ server
def serve(gate: Gatekeeper, config: ServiceConfig, host: str = "127.0.0.1", port: int = 8080, *,
          keep_alive_s: float = 5.0, header_timeout_s: float = 10.0) -> None:
    """Run the app on uvicorn until SIGTERM / SIGINT; in-flight requests are answered and the
    log flushed before it returns. Refuses a non-loopback `host` without a token."""
    check_bind(host, config)
    run_server(create_app(gate, config), config, host, port, keep_alive_s=keep_alive_s,
               header_timeout_s=header_timeout_s)


def check_bind(host: str, config: ServiceConfig) -> None:
    """Refuse a non-loopback `host` without a token, saying why."""
    if not is_loopback(host) and not config.token:
        raise PermissionError(
            f"refusing to listen on {host} without a token: any machine that reaches it could "
            "gate images, read /metrics and see rejected images on /review. Give --token-file F "
            "(clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1")


def run_server(app: ASGIApp, config: ServiceConfig, host: str, port: int, *, keep_alive_s: float,
               header_timeout_s: float, sockets: list | None = None) -> None:
    """uvicorn with the service's protocol, timeouts and bounds, until SIGTERM / SIGINT; on
    `sockets` when given (a worker's), else bound to `host:port`."""
    import signal

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, http=_protocol(header_timeout_s), lifespan="on", log_level="warning",
        access_log=False, server_header=False, timeout_keep_alive=int(max(1, keep_alive_s)),
        proxy_headers=False,  # nothing reads the client's address: no X-Forwarded-* pass per request
        timeout_graceful_shutdown=max(30, int(config.body_timeout_s) + 5),
        limit_concurrency=2 * config.queue + 64))
    # uvicorn re-raises the signal it caught once it has stopped; a no-op handler makes that a
    # clean return (exit 0) instead of death by SIGTERM after the graceful stop
    old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind; the CLI's errors exit 2
        if e.code:
            raise OSError(f"could not serve on {host}:{port} (the reason is logged above)") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
