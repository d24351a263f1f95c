"""Load test of `verifier serve` on loopback against in-process `Gatekeeper.gate()` on the same images.

Run: .venv/bin/python benchmarks/serve_load.py [--count 600] [--seconds 40] [--out F.json]
Starts a server process on 127.0.0.1 (a free port), measures requests/s and p50/p99 latency at
concurrency 1, 8 and 32 (bounded by --count requests and --seconds per level, so it stops by
itself), sends the malformed-request set (0 server errors expected), stops the server with
SIGTERM and checks rows logged == decisions answered. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "serve_load.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=600, help="requests per concurrency level at most")
    ap.add_argument("--seconds", type=float, default=40.0, help="seconds per concurrency level at most")
    ap.add_argument("--images", type=int, default=256, help="distinct images cycled through")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads in both processes")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="runs per level, each after an in-process run")
    ap.add_argument("--in-process-seconds", type=float, default=3.0, metavar="S",
                    help="the in-process baseline repeats its call over the images for at least S "
                         "seconds before each server run (default 3)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `verifier serve` (repeat), e.g. --serve-arg=--gate-processes=0")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        bundle, files = _bundle_and_images(tmp, args.images)
        gate = _in_process_gate(bundle, files, args.max_batch)
        inproc_runs: list[float] = []
        port = _free_port()
        proc = _start(bundle, port, tmp / "log", args)
        levels, answered = [], 0
        try:
            _post(port, files[0], http.client.HTTPConnection("127.0.0.1", port, timeout=60))  # warm
            answered += 1
            for c in [int(v) for v in args.levels.split(",")]:
                for _ in range(args.rounds):  # interleaved, so both see the same background load
                    rate, cpu = _in_process(gate, files, args.in_process_seconds)
                    inproc_runs.append(rate)
                    s0, c0 = _cpu_s(proc.pid), time.process_time()
                    res = _load(port, files, c, args.count if c > 1 else max(50, args.count // 4),
                                args.seconds)
                    res["server_cpu_ms_per_request"] = 1000 * (_cpu_s(proc.pid) - s0) / res["requests"]
                    res["client_cpu_ms_per_request"] = 1000 * (time.process_time() - c0) / res["requests"]
                    res["in_process_images_per_s"], res["in_process_cpu_ms_per_image"] = rate, cpu
                    answered += res.pop("answered")
                    levels.append(res)
            malformed = _malformed(port, tmp)
            answered += malformed.pop("answered")
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        rows = _logged_rows(tmp / "log")

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version()},
        "model": "SmallCNN (MNIST, 28x28 gray), ONNX backend; PNG files of real digits",
        "server": {"max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "exit_code": rc,
                   "extra_args": args.serve_arg},
        "in_process_images_per_s": statistics.median(inproc_runs),
        "in_process_seconds": args.in_process_seconds,
        "levels": levels,
        "malformed": malformed,
        "decisions_answered": answered,
        "rows_logged": rows,
    }
    for lv in levels:
        lv["ratio_to_in_process"] = lv["requests_per_s"] / lv["in_process_images_per_s"]
    _print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = rows == answered and malformed["server_errors"] == 0 and rc == 0
    return 0 if ok else 1


def _bundle_and_images(tmp: Path, n: int) -> tuple[Path, list[Path]]:
    """A SmallCNN trained one epoch on 3,000 real digits, exported to ONNX and bundled; n PNGs."""
    import torch
    from PIL import Image

    from verifier.bundle.builder import build_bundle
    from verifier.examples.datasets import load_mnist
    from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier
    from verifier.probe.onnx_backend import export_onnx
    from verifier.spec import load_spec

    torch.set_num_threads(1)
    x, y = load_mnist()
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(head="gap"), x[:3000], y[:3000], epochs=1, seed=0)
    export_onnx(model, mnist_spec(model), tmp / "model.onnx")
    (tmp / "model.toml").write_text(
        '[model]\npath = "model.onnx"\nclasses = ["0","1","2","3","4","5","6","7","8","9"]\n'
        "[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n")
    build_bundle(load_spec(tmp / "model.toml"), (x[:1500], y[:1500]), tmp / "bundle",
                 calibration=(x[3000:3600], y[3000:3600]), seed=0)
    (tmp / "img").mkdir()
    files = []
    for i, a in enumerate(x[3600:3600 + n]):
        p = tmp / "img" / f"d{i:04d}.png"
        Image.fromarray(a).save(p)
        files.append(p)
    return tmp / "bundle", files


def _in_process_gate(bundle: Path, files: list[Path], batch: int):
    from verifier.runtime.gatekeeper import Gatekeeper

    gate = Gatekeeper.load(bundle, batch_size=batch)
    gate.gate(files[:batch])  # warm
    return gate


def _in_process(gate, files: list[Path], seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of Gatekeeper.gate(paths) calls over all files, repeated
    for at least `seconds` (one call over 256 files lasts 0.1-0.2 s, and its rate swung from
    1,300 to 2,400 images/s between runs minutes apart on this 2-core machine)."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while n == 0 or time.perf_counter() - t0 < seconds:
        gate.gate(files)
        n += len(files)
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live child processes (the server's gate
    processes), from Linux /proc; NaN elsewhere."""
    try:
        stats = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))  # ppid, utime + stime
    except OSError:
        return float("nan")
    if pid not in stats:
        return float("nan")
    tree, total = [pid], 0
    while tree:
        p = tree.pop()
        total += stats[p][1]
        tree += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total / os.sysconf("SC_CLK_TCK")


def _start(bundle: Path, port: int, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier.cli.main", "serve", "--bundle", str(bundle), "--port", str(port),
         "--log", str(log), "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
         "--queue", "512", *args.serve_arg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health/ready")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready within 120 s")


def _post(port: int, path: Path, conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/v1/gate", body=path.read_bytes(),
                 headers={"Content-Type": "image/png", "X-Filename": path.name})
    r = conn.getresponse()
    body = r.read()
    if r.status == 200:
        json.loads(body)
    return r.status


def _load(port: int, files: list[Path], concurrency: int, count: int, seconds: float) -> dict:
    """`count` requests (or `seconds`) from `concurrency` keep-alive clients; latency per request.

    The clients are asyncio coroutines in one thread sending prebuilt request bytes and reading
    the answer by its Content-Length (each 200's JSON is still parsed): the load generator
    shares this machine's cores with the server, so its own CPU per request is kept small
    (http.client in 32 threads took 0.25-0.34 ms per request; its CPU is reported apart)."""
    reqs = [_request_bytes(p) for p in files]
    return asyncio.run(_load_async(port, reqs, concurrency, count, seconds))


def _request_bytes(path: Path) -> bytes:
    body = path.read_bytes()
    return (f"POST /v1/gate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"X-Filename: {path.name}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, the server closes) of one HTTP/1.1 answer with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    at = low.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("answer without Content-Length")
    length = int(low[at + 17:low.index(b"\r\n", at + 2)])
    return status, await reader.readexactly(length), b"\r\nconnection: close" in low


async def _load_async(port: int, reqs: list[bytes], concurrency: int, count: int, seconds: float) -> dict:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    next_i = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop_at and next_i < count:
            i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(60):
                    writer.write(reqs[i % len(reqs)])
                    s, body, close = await _answer(reader)
                if s == 200:
                    json.loads(body)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                s, close = -1, True
            dt = time.perf_counter() - t0
            statuses[s] = statuses.get(s, 0) + 1
            if s == 200:
                lat.append(dt)
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    q = np.quantile(lat, [0.5, 0.99]) if lat else [float("nan")] * 2
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "ok": ok,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "requests_per_s": ok / wall, "p50_ms": 1000 * float(q[0]), "p99_ms": 1000 * float(q[1]),
            "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"), "answered": ok}


def _malformed(port: int, tmp: Path) -> dict:
    """The bad-request set; a 5xx or a dropped connection counts as a server error."""
    def req(body, headers) -> int:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            c.request("POST", "/v1/gate", body=body, headers=headers)
            r = c.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            return -1
        finally:
            c.close()

    def raw(data: bytes) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(data)
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except OSError:
                return -1
        try:
            return int(got.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return -1

    cases = {
        "empty body": lambda: req(b"", {"Content-Type": "image/png"}),
        "wrong type": lambda: req(b"{}", {"Content-Type": "application/json"}),
        "over the size limit": lambda: req(bytes(20 << 20), {"Content-Type": "image/png"}),
        "non-image bytes": lambda: req(b"\x00garbage" * 100, {"Content-Type": "image/png", "X-Filename": "junk.png"}),
        "truncated PNG": lambda: req(b"\x89PNG\r\n\x1a\n\x00\x00", {"Content-Type": "image/png"}),
        "bad Content-Length": lambda: raw(b"POST /v1/gate HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc"),
        "bad multipart": lambda: req(b"--x\r\nnonsense", {"Content-Type": "multipart/form-data; boundary=x"}),
    }
    statuses = {name: f() for name, f in cases.items()}
    errors = sum(s == -1 or s >= 500 for s in statuses.values())
    answered = sum(s == 200 for s in statuses.values())  # non-image bytes: an error record, logged
    return {"statuses": statuses, "server_errors": errors, "answered": answered}


def _logged_rows(log: Path) -> int:
    import pyarrow.parquet as pq

    files = list(log.glob("date=*/part-*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _print(r: dict) -> None:
    print(f"\nin-process Gatekeeper.gate() on the same PNG files, batch {r['server']['max_batch']}: "
          f"median {r['in_process_images_per_s']:.0f} images/s (calls repeated for {r['in_process_seconds']:g} s before each server run)")
    print(f"{'concurrency':>11} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'in-process/s':>13} {'ratio':>6} {'CPU ms/req server':>18} {'client':>7} {'in-process':>11}")
    for lv in r["levels"]:
        print(f"{lv['concurrency']:>11} {lv['requests']:>9} {lv['requests_per_s']:>8.1f} {lv['p50_ms']:>8.1f} "
              f"{lv['p99_ms']:>8.1f} {lv['in_process_images_per_s']:>13.0f} "
              f"{100 * lv['ratio_to_in_process']:>5.0f}% {lv['server_cpu_ms_per_request']:>18.2f} "
              f"{lv['client_cpu_ms_per_request']:>7.2f} {lv['in_process_cpu_ms_per_image']:>11.2f}")
    print("malformed set:", ", ".join(f"{k} -> {v}" for k, v in r["malformed"]["statuses"].items()))
    print(f"server errors on the malformed set: {r['malformed']['server_errors']}; "
          f"decisions answered {r['decisions_answered']}, rows logged {r['rows_logged']}; "
          f"server exit code {r['server']['exit_code']}")


if __name__ == "__main__":
    sys.exit(main())
