"""One worker process of `verifier serve --workers N` (started by `verifier.service.workers`):
loads the bundle, then serves the app on the service's shared TCP port (SO_REUSEPORT: the
kernel spreads connections over the workers) and on its private Unix socket.

  python -m verifier.service.worker RUN_DIR/launch.json --index K
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from verifier.service.config import ServiceConfig
from verifier.service.peers import Peers

__all__ = ["WorkerLaunch", "main", "reuseport_socket"]

log = logging.getLogger("verifier.service.app")


@dataclass
class WorkerLaunch:
    """Everything a worker needs, written by the supervisor as JSON (never pickled) into its
    private run folder (0700; the file 0600: it holds the token and the internal secret)."""

    bundle: str
    host: str
    port: int
    workers: int
    run_dir: str
    secret: str
    service: dict[str, Any]           # ServiceConfig's fields, paths as strings
    spec: str | None = None
    alpha: float | None = None
    key: str | None = None
    threads: int | None = None
    keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0

    def write(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh)

    @classmethod
    def read(cls, path: Path) -> WorkerLaunch:
        return cls(**json.loads(path.read_text()))

    def config(self) -> ServiceConfig:
        fields = dict(self.service)
        for name in ("log", "drift_report"):
            if fields.get(name) is not None:
                fields[name] = Path(fields[name])
        return ServiceConfig(**fields)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (not listening yet): each worker binds
    its own, and Linux spreads new connections over the listening ones."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it an answer's second write waits for a delayed ACK (40 ms per request, measured)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verifier.service.worker",
                                 description="one worker of 'verifier serve --workers N' (started by it)")
    ap.add_argument("launch", type=Path)
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"verifier serve worker {args.index}: %(message)s")
    launch = WorkerLaunch.read(args.launch)

    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.service.app import create_app, run_server
    from verifier.spec import load_spec

    gate = Gatekeeper.load(launch.bundle, spec=load_spec(launch.spec) if launch.spec else None,
                           alpha=launch.alpha, key=launch.key, threads=launch.threads)
    peers = Peers(args.index, launch.workers, Path(launch.run_dir), launch.secret)
    cfg = launch.config()
    app = create_app(gate, cfg, peers=peers)
    tcp = reuseport_socket(launch.host, launch.port)
    path = peers.socket_path(args.index)
    path.unlink(missing_ok=True)  # a restarted worker's socket file is left behind
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(str(path))
    os.chmod(path, 0o600)
    _stop_with_parent()
    # both start listening once the app's start-up (probe warm) is done
    run_server(app, cfg, launch.host, launch.port, keep_alive_s=launch.keep_alive_s,
               header_timeout_s=launch.header_timeout_s, sockets=[tcp, uds])
    return 0


def _stop_with_parent() -> None:
    """A graceful stop (SIGTERM to itself) if the supervisor dies without stopping the workers
    (SIGKILL, a crash): a worker never serves on alone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the supervisor (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), 15)

    threading.Thread(target=watch, name="verifier-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
