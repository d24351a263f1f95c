"""HTTP gating service (ASGI: FastAPI on uvicorn).

  verifier serve --bundle bundle/ --port 8080 --log decisions/
  curl -s --data-binary @scan.png -H 'Content-Type: image/png' -H 'X-Filename: scan.png' \\
       http://127.0.0.1:8080/v1/gate
  curl -s -F files=@a.png -F files=@b.dcm http://127.0.0.1:8080/v1/gate

POST /v1/gate with one image as the body (PNG, JPEG, BMP, TIFF, DICOM, .npy; X-Filename
names it) answers the JSON record of `verifier gate --json`; a multipart form with several
files answers a list of records. Concurrent requests are gathered for --batch-wait-ms (at
most --max-batch images) into one probe pass. Also: GET /health/live, /health/ready,
/metrics (Prometheus), /review (today's decisions, rejected images with their attention
overlays), /docs and /openapi.json.

Bounds: bodies over --max-body-mb get 413, bodies slower than --body-timeout get 408, more
than --queue images waiting get 503 with Retry-After. Binding beyond loopback requires
--token-file (clients send 'Authorization: Bearer <token>'); without it serve refuses to
start (exit 2). SIGTERM or Ctrl-C stops gracefully: requests in flight are answered and the
decision log is flushed.

--workers N runs N server processes on the one port (a supervisor starts, restarts and stops
them): more requests per second where one Python process is the limit. They share the
decision log folder, /metrics and /review. Details: docs/service.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory from 'verifier build'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; "
                   "anything beyond loopback needs --token-file)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-file", metavar="F", help="file holding the bearer token clients must send")
    p.add_argument("--log", metavar="DIR", help="append every decision to the Parquet decision log in DIR "
                   "(in batches; flushed on SIGTERM)")
    p.add_argument("--spec", help="gate with another model file declared compatible ('verifier declare')")
    p.add_argument("--alpha", type=float, help="override the bundle's target false-rejection rate")
    p.add_argument("--max-batch", type=int, default=32, help="images per probe pass at most (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its probe pass, at most "
                        "(default 5; sooner once every request held is in and none has come for a "
                        "fifth of it)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit in MB (default 16)")
    p.add_argument("--queue", type=int, default=256,
                   help="images (and requests) waiting at most; beyond, 503 + Retry-After (default 256)")
    p.add_argument("--body-timeout", type=float, default=10.0, metavar="S",
                   help="seconds for a whole request body to arrive (408 beyond; default 10)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds for a request head to arrive (408 beyond; default 10)")
    p.add_argument("--keep-alive", type=float, default=5.0, metavar="S",
                   help="idle seconds before a keep-alive connection closes (default 5)")
    p.add_argument("--log-flush-rows", type=int, default=512, metavar="N",
                   help="write the pending decisions to the log once N are waiting (default 512)")
    p.add_argument("--log-flush-s", type=float, default=2.0, metavar="S",
                   help="... or every S seconds (default 2); always on a graceful stop")
    p.add_argument("--drift-report", metavar="PATH",
                   help="drift report HTML (or a folder of them: the newest) linked from /review")
    p.add_argument("--review-keep", type=int, default=24,
                   help="rejected images kept in memory for /review (default 24)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes sharing the port (default 1). One process runs HTTP and "
                        "the gate's scoring under one Python lock; with 2 or more cores, 2 workers "
                        "served 1.2-2x the requests/s of one at concurrency 32 (docs/service.md). "
                        "They share the log folder, /metrics and /review, and split --queue")
    p.add_argument("--probe-threads", type=int, default=None, metavar="N",
                   help="compute threads of the model's forward pass, per worker (default: the "
                        "CPUs / workers less one, at least 1, left for the event loop; idle ones "
                        "sleep instead of spinning)")
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")


def run(args: argparse.Namespace) -> int:
    from verifier.service.app import ServiceConfig, is_loopback, serve

    token = _read_token(args.token_file) if args.token_file else None
    if not is_loopback(args.host) and token is None:  # refuse before the slow bundle load
        raise PermissionError(
            f"refusing to listen on {args.host} without a token: any machine that reaches it "
            "could gate images and see rejected images on /review. Give --token-file F, or bind "
            "127.0.0.1")
    cfg = ServiceConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                        max_body_mb=args.max_body_mb, queue=args.queue,
                        body_timeout_s=args.body_timeout, token=token,
                        log=Path(args.log) if args.log else None, log_rows=args.log_flush_rows,
                        log_seconds=args.log_flush_s, review_keep=args.review_keep,
                        drift_report=Path(args.drift_report) if args.drift_report else None)
    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.spec import load_spec

    if args.probe_threads is not None and args.probe_threads < 1:
        raise ValueError(f"--probe-threads must be >= 1, got {args.probe_threads}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    threads = args.probe_threads or default_probe_threads(args.workers)
    # loaded here with one worker or many: a bad bundle, spec or key is refused before any starts
    gate = Gatekeeper.load(args.bundle, spec=load_spec(args.spec) if args.spec else None, alpha=args.alpha,
                           key=args.verify_key, threads=threads)
    workers = f" with {args.workers} workers" if args.workers > 1 else ""
    announce = (f"verifier serving bundle {gate.bundle.bundle_id} on http://{{host}}:{{port}}{workers} "
                "(POST /v1/gate; /review, /metrics, /docs); SIGTERM or Ctrl-C stops and flushes the log")
    if args.workers > 1:
        from verifier.service.workers import serve_workers

        del gate  # each worker loads its own
        return serve_workers(args.bundle, cfg, args.workers, args.host, args.port, spec=args.spec,
                             alpha=args.alpha, key=args.verify_key, threads=threads,
                             keep_alive_s=args.keep_alive, header_timeout_s=args.header_timeout,
                             announce=announce)
    print(announce.format(host=args.host, port=args.port), file=sys.stderr, flush=True)
    serve(gate, cfg, args.host, args.port, keep_alive_s=args.keep_alive,
          header_timeout_s=args.header_timeout)
    return 0


def default_probe_threads(workers: int = 1) -> int:
    """The CPUs this process may run on, shared by the workers, less one each for the event
    loop (HTTP, JSON), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(1, cpus // workers - 1)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read --token-file {path}: {e.strerror or e}") from None
    if len(token) < 16:
        raise ValueError(f"the token in {path} is {len(token)} characters; use at least 16 "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token
