"""`verifier serve --workers N`: a supervisor process and N worker processes on one port.

One Python process runs HTTP, JSON and the gate's scoring under one GIL; past that, more
throughput needs more processes. The supervisor holds the port (a bound, never-listening
SO_REUSEPORT socket, so the port cannot be taken and the workers can share it), makes a private
run folder (0700) with the workers' launch file, Unix sockets and Prometheus multiprocess
files, starts the workers (`verifier.service.worker`, each in its own session so a terminal's
Ctrl-C reaches only the supervisor), restarts one that dies, and on SIGTERM / Ctrl-C stops them
gracefully (each answers its requests in flight and flushes its decision-log buffer), then
removes the run folder.

What the workers share: the port; the decision log folder (each writes its own part files);
the metrics (prometheus-client's multiprocess mode adds up counters and histograms; the
gauges are summed over live workers); `/review` (the worker that is asked gathers every
worker's part over their Unix sockets, `verifier.service.peers`). What they split: `--queue`
(each worker takes its share, so memory and waiting stay bounded by the total).
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from verifier.service.app import check_bind
from verifier.service.config import ServiceConfig
from verifier.service.worker import WorkerLaunch, reuseport_socket

__all__ = ["serve_workers"]

log = logging.getLogger("verifier.service.app")

#: a worker that dies this soon after its start this many times in a row stops the service
_QUICK_S, _QUICK_TRIES = 10.0, 3
_READY_S = 300.0  # a worker loads the bundle and warms its probe within this


def serve_workers(bundle: str | Path, config: ServiceConfig, workers: int, host: str = "127.0.0.1",
                  port: int = 8080, *, spec: str | None = None, alpha: float | None = None,
                  key: str | None = None, threads: int | None = None, keep_alive_s: float = 5.0,
                  header_timeout_s: float = 10.0, announce: str = "") -> int:
    """Serve with `workers` processes until SIGTERM / SIGINT. Returns the exit code: 0 when
    every worker stopped cleanly, 1 when one failed (its error is on stderr)."""
    if workers < 2:
        raise ValueError(f"serve_workers needs at least 2 workers, got {workers}")
    check_bind(host, config)
    try:
        if port:  # nobody may listen there already: SO_REUSEPORT alone would share the port
            _exclusive_bind_check(host, port)  # with another service of this user, silently
        holder = reuseport_socket(host, port)
    except OSError as e:
        raise OSError(f"cannot use {host}:{port}: {e.strerror or e}") from None
    port = holder.getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="verifier-serve-"))
    try:
        (run_dir / "metrics").mkdir()
        share = replace(config, queue=max(1, math.ceil(config.queue / workers)))
        service = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(share).items()}
        launch = WorkerLaunch(bundle=str(bundle), host=host, port=port, workers=workers,
                              run_dir=str(run_dir), secret=secrets.token_urlsafe(32), service=service,
                              spec=spec, alpha=alpha, key=key, threads=threads,
                              keep_alive_s=keep_alive_s, header_timeout_s=header_timeout_s)
        launch.write(run_dir / "launch.json")
        sup = _Supervisor(run_dir, workers, grace_s=max(30, int(config.body_timeout_s) + 5) + 15)
        return sup.run(announce.format(host=host, port=port))
    finally:
        holder.close()
        shutil.rmtree(run_dir, ignore_errors=True)


class _Supervisor:
    """Starts, watches, restarts and stops the worker processes."""

    def __init__(self, run_dir: Path, workers: int, grace_s: float) -> None:
        self.run_dir, self.n, self.grace_s = run_dir, workers, grace_s
        self.env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(run_dir / "metrics"))
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.quick: dict[int, int] = dict.fromkeys(range(workers), 0)
        self.stop = threading.Event()

    def _spawn(self, k: int) -> None:
        self.procs[k] = subprocess.Popen(
            [sys.executable, "-m", "verifier.service.worker", str(self.run_dir / "launch.json"),
             "--index", str(k)], env=self.env, start_new_session=True)
        self.started[k] = time.monotonic()

    def run(self, announce: str) -> int:
        old = {s: signal.signal(s, lambda *_: self.stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for k in range(self.n):
                self._spawn(k)
            code = self._wait_ready()
            if code == 0 and announce:
                print(announce, file=sys.stderr, flush=True)
            while code == 0 and not self.stop.wait(0.2):
                code = self._watch()
            return max(code, self._stop_all())
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _wait_ready(self) -> int:
        """0 once every worker listens on its Unix socket (it has loaded the bundle and warmed
        its probe), 1 if the wait runs out or a worker keeps dying (one that dies while
        starting is started again, as later)."""
        deadline = time.monotonic() + _READY_S
        waiting = set(range(self.n))
        while waiting and not self.stop.is_set():
            for k in list(waiting):
                if self.procs[k].poll() is not None:
                    if self._reap(k):
                        return 1
                elif _listening(self.run_dir / f"worker-{k}.sock"):
                    waiting.discard(k)
            if time.monotonic() > deadline:
                log.error("workers %s not ready within %.0f s", sorted(waiting), _READY_S)
                return 1
            self.stop.wait(0.1)
        return 0

    def _watch(self) -> int:
        """Restart a worker that died; 1 when one keeps dying right after its start."""
        for k, p in list(self.procs.items()):
            if p.poll() is None or self.stop.is_set():
                continue
            if self._reap(k):
                return 1
        return 0

    def _reap(self, k: int) -> int:
        """Worker k has exited: start it again (0), or 1 when it died within _QUICK_S of its
        start _QUICK_TRIES times in a row (a bad install or bundle: restarting will not help)."""
        from prometheus_client import multiprocess

        p = self.procs[k]
        multiprocess.mark_process_dead(p.pid, str(self.run_dir / "metrics"))
        quick = time.monotonic() - self.started[k] < _QUICK_S
        self.quick[k] = self.quick[k] + 1 if quick else 0
        if self.quick[k] >= _QUICK_TRIES:
            log.error("worker %d died %d times within %.0f s of starting (exit code %s; its error "
                      "is above); stopping the service", k, _QUICK_TRIES, _QUICK_S, p.returncode)
            return 1
        log.error("worker %d (pid %d) exited with code %s; starting it again", k, p.pid, p.returncode)
        self._spawn(k)
        return 0

    def _stop_all(self) -> int:
        """SIGTERM to every worker, then wait for their graceful stops (killed after grace_s)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        code = 0
        for k, p in self.procs.items():
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop within %.0f s; killed", k, self.grace_s)
                p.kill()
                rc = p.wait()
            code = code or int(rc != 0)
        return code


def _exclusive_bind_check(host: str, port: int) -> None:
    """Raise OSError when host:port is taken (a plain bind, as a single-process server does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # old connections' TIME_WAIT is fine
        s.bind((host.strip("[]"), port))


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
