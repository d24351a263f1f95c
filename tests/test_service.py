"""`verifier serve` as a real server process on 127.0.0.1: every endpoint, the bad-request set,
the token rule, micro-batching, SIGTERM flushing the log, and /review in a real browser."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CAL, POOL, TRAIN, write_onnx_model
from PIL import Image

FIELDS = {"input", "decision", "p_value", "predicted_class", "confidence", "reasons", "scores",
          "p_values", "error"}
CHROMIUM = Path("/usr/bin/chromium")
ANSWERED: list[dict] = []  # every decision record a 200 answered, to match against the log


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def file_bundle(tmp_path_factory, mnist, gap_model) -> Path:
    """A bundle a separate process can load: the session's CNN exported to ONNX."""
    from verifier.bundle.builder import build_bundle
    from verifier.spec import load_spec

    root = tmp_path_factory.mktemp("svc")
    write_onnx_model(root, gap_model)
    x, y = mnist
    build_bundle(load_spec(root / "model.toml"), (x[TRAIN][:1500], y[TRAIN][:1500]), root / "bundle",
                 calibration=(x[CAL], y[CAL]), seed=0)
    return root / "bundle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bundle: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    err = tmp / f"server-{port}.err"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "verifier.cli.main", "serve", "--bundle", str(bundle),
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL,
                            stderr=open(err, "wb"), env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, err.read_text()
        try:
            status, _, _ = _request(port, "GET", "/health/ready", timeout=2)
            if status == 200:
                return proc, port, err
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server not ready within 60 s: " + err.read_text())


@pytest.fixture(scope="module")
def server(file_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    drift = tmp / "drift-2026-12-01.html"
    drift.write_text("<html><body><h1>Drift report 2026-12-01</h1><p>no alert</p></body></html>")
    proc, port, err = _start(file_bundle, tmp, "--log", str(tmp / "log"), "--max-batch", "16",
                             "--batch-wait-ms", "25", "--max-body-mb", "1", "--queue", "64",
                             "--body-timeout", "1.5", "--header-timeout", "1.5",
                             "--drift-report", str(drift), "--log-flush-s", "600",
                             "--log-flush-rows", "100000")
    yield {"proc": proc, "port": port, "err": err, "log": tmp / "log", "tmp": tmp}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def pngs(mnist, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pngs")
    out = []
    for i, img in enumerate(mnist[0][POOL][:48]):
        p = folder / f"digit-{i:02d}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def odd_pngs(tmp_path_factory) -> list[Path]:
    """Images that are not digits (natural textures, shuffled pixels): the gate rejects most."""
    from skimage import data

    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    out = []
    for i, name in enumerate(("brick", "grass", "gravel", "camera")):
        a = getattr(data, name)()
        a = a if a.ndim == 2 else a[..., 0]
        p = folder / f"odd-{name}.png"
        Image.fromarray(a[:256, :256].astype(np.uint8)).save(p)
        out.append(p)
        p = folder / f"noise-{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(p)
        out.append(p)
    return out


# ----------------------------------------------------------------------------- helpers
def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _gate(port: int, path: Path, **headers: str) -> tuple[int, dict]:
    h = {"Content-Type": "image/png", "X-Filename": path.name, **headers}
    status, _, body = _request(port, "POST", "/v1/gate", path.read_bytes(), h)
    payload = json.loads(body)
    if status == 200:
        ANSWERED.extend(payload if isinstance(payload, list) else [payload])
    return status, payload


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers before it closes (or `wait` s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except socket.timeout:
            pass
        return got


def _metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = _request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


# ------------------------------------------------------------------------------- tests
def test_health_openapi_docs(server):
    port = server["port"]
    status, _, body = _request(port, "GET", "/health/live")
    assert status == 200 and json.loads(body)["status"] == "live"
    status, _, body = _request(port, "GET", "/health/ready")
    ready = json.loads(body)
    assert status == 200 and ready["status"] == "ready" and ready["alpha"] == 0.05
    assert ready["classes"] == [str(i) for i in range(10)]
    status, _, body = _request(port, "GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and "/v1/gate" in spec["paths"] and "/health/ready" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/gate"]["post"]["requestBody"]["content"]
    status, headers, body = _request(port, "GET", "/docs")
    assert status == 200 and b"swagger" in body.lower()
    status, _, body = _request(port, "GET", "/nowhere")
    assert status == 404 and "detail" in json.loads(body)


def test_gate_answers_the_cli_records(server, file_bundle, pngs, mnist):
    """Raw-body answers carry exactly the fields of `gate --json`, the client's file name, and
    the same decisions as the in-process gate on the same files."""
    from verifier.runtime.gatekeeper import Gatekeeper

    port = server["port"]
    answers = [_gate(port, p) for p in pngs[:6]]
    local = Gatekeeper.load(file_bundle).gate(pngs[:6])
    for (status, d), ref, p in zip(answers, local, pngs):
        assert status == 200 and set(d) == FIELDS
        assert d["input"] == p.name and d["error"] is None
        assert d["decision"] == ref.decision and d["predicted_class"] == ref.predicted_class
        assert d["p_value"] == pytest.approx(ref.p_value, rel=1e-4, abs=1e-6)
        assert d["scores"].keys() == ref.scores.keys()
    assert sum(d["predicted_class"] == str(lab) for (_, d), lab in zip(answers, mnist[1][POOL])) >= 5


def test_multipart_several_files_in_order(server, pngs):
    port = server["port"]
    body, ctype = _multipart([(pngs[6].name, pngs[6].read_bytes()), ("broken.png", b"not an image"),
                              (pngs[7].name, pngs[7].read_bytes())])
    status, _, raw = _request(port, "POST", "/v1/gate", body, {"Content-Type": ctype})
    records = json.loads(raw)
    ANSWERED.extend(records)
    assert status == 200 and [r["input"] for r in records] == [pngs[6].name, "broken.png", pngs[7].name]
    assert all(set(r) == FIELDS for r in records)
    broken = records[1]
    assert broken["decision"] == "reject" and broken["reasons"] == ["error"]
    assert "broken.png" in broken["error"] and "verifier-serve-" not in broken["error"]
    assert records[0]["error"] is None and records[2]["error"] is None


def test_bad_requests_get_clear_json_errors(server):
    port = server["port"]
    status, _, body = _request(port, "POST", "/v1/gate", b"", {"Content-Type": "image/png"})
    assert status == 400 and "empty body" in json.loads(body)["error"]
    status, _, body = _request(port, "POST", "/v1/gate", b"hello", {"Content-Type": "text/plain"})
    assert status == 415 and "not an image" in json.loads(body)["error"]
    empty_form, ctype = _multipart([])
    status, _, body = _request(port, "POST", "/v1/gate", empty_form, {"Content-Type": ctype})
    assert status == 400 and "no file" in json.loads(body)["error"]
    # non-image bytes under an image type: a 200 with the input's error record (as `gate --json`)
    junk = server["tmp"] / "x.png"
    junk.write_bytes(b"\x00garbage" * 50)
    status, d = _gate(port, junk)
    assert status == 200 and d["decision"] == "reject" and d["error"] and d["input"] == "x.png"
    # a body over --max-body-mb 1: the client, sending all of it, reads the 413
    status, headers, body = _request(port, "POST", "/v1/gate", b"\x89PNG" + bytes(3 << 20),
                                     {"Content-Type": "image/png"})
    assert status == 413 and "limit" in json.loads(body)["error"]
    # chunked, no Content-Length, still over the limit
    chunks = (bytes(256 << 10) for _ in range(8))
    status, _, body = _request(port, "POST", "/v1/gate", chunks, {"Content-Type": "image/png"})
    assert status == 413


def test_malformed_http_and_slow_clients(server):
    port = server["port"]
    # a Content-Length that is not a number: a 400 answer, then an orderly close (no reset)
    got = _raw(port, b"POST /v1/gate HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: ten\r\n\r\n0123456789")
    assert got.startswith(b"HTTP/1.1 400")
    got = _raw(port, b"POST /v1/gate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n12345")
    assert got.startswith(b"HTTP/1.1 400")
    # a body that stops arriving: 408 after --body-timeout 1.5 s, with a JSON error
    t0 = time.monotonic()
    got = _raw(port, b"POST /v1/gate HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n0123456789", wait=8)
    assert got.startswith(b"HTTP/1.1 408") and b'"error"' in got and time.monotonic() - t0 < 6
    # a head that never ends: 408 after --header-timeout 1.5 s, not a connection held forever
    t0 = time.monotonic()
    got = _raw(port, b"POST /v1/gate HTTP/1.1\r\nHost: x\r\n", wait=8)
    assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 6
    # the server is still fine, and never showed anyone a traceback
    assert _request(port, "GET", "/health/live")[0] == 200
    assert "Traceback" not in server["err"].read_text()


def test_concurrent_requests_share_probe_passes(server, pngs, odd_pngs):
    port = server["port"]
    before = _metrics(port)
    todo = pngs[8:40] + odd_pngs
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: _gate(port, p), todo))
    assert all(s == 200 for s, _ in answers)
    assert [d["input"] for _, d in answers] == [p.name for p in todo]  # routed back to the sender
    after = _metrics(port)
    passes = after["verifier_batch_size_count"] - before["verifier_batch_size_count"]
    images = after["verifier_batch_size_sum"] - before["verifier_batch_size_sum"]
    assert images == len(todo) and passes < len(todo) / 2, (passes, images)
    assert after["verifier_batch_size_bucket|le=1.0"] - before["verifier_batch_size_bucket|le=1.0"] < passes
    outcomes = {k: after[f"verifier_decisions_total|outcome={k}"] for k in ("accept", "reject", "error")}
    assert sum(outcomes.values()) == len(ANSWERED)
    assert outcomes["reject"] >= 6  # the textures and the noise
    assert after["verifier_requests_total|route=/v1/gate|status=200"] >= len(todo)
    assert after["verifier_alpha"] == 0.05 and 0 <= after["verifier_rejection_rate"] <= 1
    assert after["verifier_queue_depth"] == 0
    assert after["verifier_request_seconds_count"] >= len(todo)


def test_token_rule_and_full_queue(file_bundle, tmp_path, pngs, capsys):
    from verifier.cli.main import main

    # beyond loopback without a token: refused at start-up, saying why, exit 2
    assert main(["serve", "--bundle", str(file_bundle), "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "without a token" in err and "--token-file" in err
    (tmp_path / "short").write_text("abc\n")
    assert main(["serve", "--bundle", str(file_bundle), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 16" in capsys.readouterr().err
    token = "s3cret-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(token + "\n")
    proc, port, err = _start(file_bundle, tmp_path, "--token-file", str(tmp_path / "token"),
                             "--queue", "2", "--batch-wait-ms", "300")
    try:
        data = pngs[0].read_bytes()
        assert _request(port, "POST", "/v1/gate", data, {"Content-Type": "image/png"})[0] == 401
        status, headers, body = _request(port, "POST", "/v1/gate", data,
                                         {"Content-Type": "image/png", "Authorization": "Bearer wrong"})
        assert status == 401 and "token" in json.loads(body)["error"]
        assert headers.get("www-authenticate", "").startswith("Bearer")
        assert _request(port, "GET", "/metrics")[0] == 401
        assert _request(port, "GET", "/review")[0] == 401
        assert _request(port, "GET", "/health/live")[0] == 200  # probes stay open
        status, _, body = _request(port, "POST", "/v1/gate", data,
                                   {"Content-Type": "image/png", "Authorization": f"Bearer {token}"})
        assert status == 200 and set(json.loads(body)) == FIELDS
        status, headers, _ = _request(port, "GET", f"/review?token={token}")
        assert status == 303 and "verifier_token=" in headers.get("set-cookie", "")
        # --queue 2 and a 300 ms gathering window: of 10 requests at once most are turned away
        auth = {"Content-Type": "image/png", "Authorization": f"Bearer {token}"}
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda p: _request(port, "POST", "/v1/gate", p.read_bytes(), auth),
                                    pngs[:10]))
        full = [(h, json.loads(b)) for s, h, b in answers if s == 503]
        assert {s for s, _, _ in answers} == {200, 503} and len(full) >= 5
        assert all(h.get("retry-after") == "1" and "retry" in e["error"] for h, e in full)
        assert "Traceback" not in err.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_review_page_in_a_browser(server):
    """What a person sees: the day's tally against alpha, rejected images with their overlays,
    one rejected image's reasons and checks, and the drift report link."""
    if not CHROMIUM.exists() or not _has_playwright():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test: /usr/bin/chromium or playwright is missing "
                        "(.ci/run installs chromium with apt-get)")
        pytest.skip("Debian's chromium (/usr/bin/chromium) or the playwright package is not installed; "
                    "apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    port = server["port"]
    m = _metrics(port)
    n_reject = int(m["verifier_decisions_total|outcome=reject"])
    n_accept = int(m["verifier_decisions_total|outcome=accept"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/review")
            assert page.locator("h1").inner_text().startswith("Gate review")
            status = page.locator("#status").inner_text()
            rate = 100 * n_reject / (n_accept + n_reject)
            assert f"Rejection rate {rate:.1f}%" in status and "alpha 5.0%" in status
            assert "above alpha" in status  # textures and noise drive it far over 5%
            summary = page.locator("#summary").inner_text()
            assert f"rejected\t{n_reject}" in summary and f"accepted\t{n_accept}" in summary
            cards = page.locator(".card")
            assert 1 <= cards.count() <= 24
            overlay = cards.first.locator("img[alt^='attention overlay']")
            assert overlay.is_visible()
            assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
            name = cards.first.locator("a.open").inner_text()
            cards.first.locator("a.open").click()
            page.wait_for_url("**/review/rejected/*")
            assert page.locator("h1").inner_text() == f"Rejected: {name}"
            why = page.locator("#why").inner_text()
            assert "Rejected because of" in why and any(r in why for r in ("garbage", "attention", "early_features"))
            assert page.locator("#checks tr").count() > 5
            page.locator("#back").click()
            page.wait_for_url("**/review")
            page.locator("#drift-link").click()
            assert page.locator("h1").inner_text() == "Drift report 2026-12-01"
        finally:
            browser.close()


def test_sigterm_answers_in_flight_and_flushes_the_log(server, pngs):
    """Nothing is written before the stop (flush every 600 s or 100,000 rows here); on SIGTERM the
    requests in flight are answered, then every answered decision is in the Parquet log, under
    the client's file name, in one file."""
    proc, port = server["proc"], server["port"]
    assert not list(server["log"].glob("date=*/part-*.parquet"))
    assert _metrics(port)["verifier_log_pending_rows"] == len(ANSWERED)

    def send(p: Path) -> int | str:
        try:
            return _gate(port, p)[0]
        except (ConnectionError, http.client.RemoteDisconnected):  # not accepted: the server was stopping
            return "not accepted"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, p) for p in pngs[40:48]]
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert proc.wait(timeout=60) == 0
    assert set(results) <= {200, "not accepted"} and 200 in results, results
    files = list(server["log"].glob("date=*/part-*.parquet"))
    table = pq.read_table(files[0]) if len(files) == 1 else None
    assert table is not None and table.num_rows == len(ANSWERED)
    assert sorted(table["input"].to_pylist()) == sorted(d["input"] for d in ANSWERED)
    assert "Traceback" not in server["err"].read_text()


def _ready_worker(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/health/ready")
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 200, body
    return body["worker"]


def _connections_to_each_worker(port: int, workers: int, each: int) -> dict[int, list]:
    """Keep-alive connections, `each` per worker (the kernel hashes each new connection to one
    listening worker's socket; /health/ready says which answered). Tries for up to 60 s, so a
    worker still starting is waited for; once all listen, a worker is missed by 20 tries in a
    row with probability 2**-20."""
    found: dict[int, list] = {k: [] for k in range(workers)}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            k = _ready_worker(conn)
            if len(found[k]) < each:
                found[k].append(conn)
            else:
                conn.close()
            if all(len(v) == each for v in found.values()):
                return found
        time.sleep(0.2)
    raise AssertionError(f"connections per worker after 60 s: { {k: len(v) for k, v in found.items()} }")


def _post_on(conn: http.client.HTTPConnection, path: Path) -> dict:
    conn.request("POST", "/v1/gate", body=path.read_bytes(),
                 headers={"Content-Type": "image/png", "X-Filename": path.name})
    r = conn.getresponse()
    record = json.loads(r.read())
    assert r.status == 200, record
    return record


def test_workers_share_the_port_log_metrics_and_review(file_bundle, tmp_path, pngs, odd_pngs):
    """`--workers 2`: both workers answer on one port with the gate's own decisions; a killed
    worker is started again; /metrics and /review count every worker's decisions and show every
    worker's rejected images; the internal route needs the run's secret; SIGTERM stops both with
    every answered decision in the log, and the private run folder is removed."""
    from prometheus_client.parser import text_string_to_metric_families

    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.service.workers import _exclusive_bind_check

    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    os.environ["TMPDIR"], old_tmp = str(run_tmp), os.environ.get("TMPDIR")
    try:
        proc, port, err = _start(file_bundle, tmp_path, "--workers", "2", "--log", str(tmp_path / "log"),
                                 "--log-flush-s", "600", "--log-flush-rows", "100000", "--review-keep", "8")
    finally:
        if old_tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old_tmp
    try:
        deadline = time.monotonic() + 60  # every worker up: the supervisor has said so
        while "verifier serving" not in err.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.1)
        assert len(list(run_tmp.glob("verifier-serve-*"))) == 1
        with pytest.raises(OSError):  # a second service never shares the port (SO_REUSEPORT would)
            _exclusive_bind_check("127.0.0.1", port)
        conns = _connections_to_each_worker(port, 2, 1)
        # a worker killed outright is started again by the supervisor
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 2
        os.kill(children[1], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            time.sleep(0.5)
            now = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            if len(now) == 2 and children[1] not in now:
                try:
                    conns = _connections_to_each_worker(port, 2, 2)
                    break
                except (OSError, AssertionError):
                    pass
            assert time.monotonic() < deadline, err.read_text()
        files = pngs[:12] + odd_pngs
        answered: list[dict] = []
        for i, path in enumerate(files):  # alternate the workers' connections
            answered.append(_post_on(conns[i % 2][(i // 2) % 2], path))
        expected = Gatekeeper.load(file_bundle).gate(files)
        assert [a["decision"] for a in answered] == [e.decision for e in expected]
        # the same p-values to the bit's noise: a process with 1 BLAS thread (the workers) and
        # this one (CI: 2) preprocess to the same pixels, whose hash breaks ties
        differ = [(a["input"], a["p_value"], e.p_value) for a, e in zip(answered, expected)
                  if abs(a["p_value"] - e.p_value) > 1e-9]
        assert not differ, differ
        rejected = sum(a["decision"] == "reject" for a in answered)
        assert rejected >= 6  # the textures and the noise
        for k in (0, 1):  # either worker tells the whole service's figures
            conn = conns[k][0]
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            m = {s.name + "".join(f"|{a}={b}" for a, b in sorted(s.labels.items())): s.value
                 for fam in text_string_to_metric_families(text) for s in fam.samples}
            assert m["verifier_requests_total|route=/v1/gate|status=200"] == len(files)
            assert m["verifier_decisions_total|outcome=reject"] == rejected
            assert m["verifier_decisions_total|outcome=accept"] == len(files) - rejected
            assert m["verifier_rejection_rate"] == pytest.approx(rejected / len(files))
            assert m["verifier_log_pending_rows"] == len(files)
            conn.request("GET", "/review")
            page = conn.getresponse().read().decode()
            assert f'<tr><th>rejected</th><td class="num">{rejected}</td></tr>' in page
            assert "of each of its 2 workers" in page and 'id="missing"' not in page
            ids = [int(v) for v in re.findall(r'id="rejected-(\d+)"', page)]
            assert len(ids) == rejected and {i % 2 for i in ids} == {0, 1}
        for item in (min(i for i in ids if i % 2 == 0), min(i for i in ids if i % 2 == 1)):
            status, _, body = _request(port, "GET", f"/review/rejected/{item}")
            assert status == 200 and any(a["input"] in body.decode() for a in answered
                                         if a["decision"] == "reject")
        for headers in ({}, {"X-Verifier-Internal": "guess" * 8}):
            status, _, _ = _request(port, "GET", "/internal/review", headers=headers)
            assert status == 404
    finally:
        for group in locals().get("conns", {}).values():
            for c in group:
                c.close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
    assert rc == 0, err.read_text()
    parts = sorted(tmp_path.glob("log/date=*/part-*.parquet"))
    assert len(parts) == 2  # one flush per worker, on its graceful stop
    names = [n for f in parts for n in pq.read_table(f)["input"].to_pylist()]
    assert sorted(names) == sorted(p.name for p in files)
    assert not list(run_tmp.glob("verifier-serve-*"))
    assert "Traceback" not in err.read_text()


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def test_log_buffer_writes_by_size_by_time_and_on_stop(tmp_path):
    """The service's log buffer: a part once `rows` are pending, a part every `seconds`, the
    rest on stop; every row once, with its own decision time."""
    import asyncio
    from datetime import datetime, timezone

    from verifier.runtime.decision import Decision
    from verifier.runtime.log import DecisionLog
    from verifier.service.log import _LogBuffer
    from verifier.service.metrics import _Metrics

    def batch(n: int, tag: str) -> list[Decision]:
        return [Decision.from_error(f"{tag}-{i}.png", "unreadable", None) for i in range(n)]

    def parts(root: Path) -> list[Path]:
        return sorted(root.glob("date=*/part-*.parquet"))

    async def until(done, limit: float = 60.0) -> None:
        """Wait for a write on the writer thread: no fixed deadline to miss on a busy machine
        (a 2 s poll failed once under load), only a generous upper bound."""
        for _ in range(int(limit / 0.02)):
            if done():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not written within {limit} s")

    async def scenario() -> None:
        by_size = _LogBuffer(DecisionLog(tmp_path / "a"), "bundle-x", 0.05, 4, _Metrics(0.05))
        by_size.start(asyncio.get_running_loop(), 600.0)
        by_size.add(batch(5, "a"), datetime.now(timezone.utc))   # over 4 rows: written now
        await until(lambda: by_size.written == 5)  # long before the 600 s timer
        assert len(parts(tmp_path / "a")) == 1
        by_size.add(batch(2, "b"), datetime.now(timezone.utc))   # under 4 rows: waits
        await asyncio.sleep(0.1)
        assert len(parts(tmp_path / "a")) == 1
        await by_size.stop()                                      # the rest on stop
        assert len(parts(tmp_path / "a")) == 2 and by_size.written == 7

        by_time = _LogBuffer(DecisionLog(tmp_path / "b"), "bundle-x", 0.05, 1000, _Metrics(0.05))
        by_time.start(asyncio.get_running_loop(), 0.05)
        by_time.add(batch(3, "c"), datetime.now(timezone.utc))   # under 1000 rows: by age
        await until(lambda: by_time.written == 3)
        assert len(parts(tmp_path / "b")) == 1
        await by_time.stop()

    asyncio.run(scenario())
    rows = pq.read_table(parts(tmp_path / "a")).to_pydict()
    assert sorted(rows["input"]) == sorted([f"a-{i}.png" for i in range(5)] + ["b-0.png", "b-1.png"])
    assert set(rows["bundle_id"]) == {"bundle-x"} and set(rows["decision"]) == {"reject"}


def test_batch_window_closes_once_every_request_is_in():
    """The gathering window waits for requests the server holds (one still reading its body),
    but not for company that is not on its way: a request alone in the server goes after a
    fifth of the window without new arrivals, not after the whole window."""
    import asyncio

    from verifier.runtime.decision import Decision
    from verifier.service.batching import _Batcher, _Job
    from verifier.service.config import ServiceConfig
    from verifier.service.metrics import _Metrics

    class Host:  # the part of the service state the batcher reads
        cfg = ServiceConfig(batch_wait_ms=1000, max_batch=8)
        metrics = _Metrics(0.05)
        inflight = 0
        probe_pool = ThreadPoolExecutor(1)

    passes: list[list[str]] = []

    class Batcher(_Batcher):
        def _gate(self, batch: list[_Job]) -> list[Decision]:
            passes.append([j.name for j in batch])
            return [Decision.from_error(j.name, "stub") for j in batch]

    async def scenario() -> float:
        host = Host()
        b = Batcher(host)  # type: ignore[arg-type]
        b.start()
        loop = asyncio.get_running_loop()

        def job(name: str) -> list[_Job]:
            return [_Job(b"", name, ".png", loop.create_future())]

        host.inflight = 1  # alone in the server: goes after the 0.2 s quiet spell
        t0 = loop.time()
        await b.submit(job("alone.png"))
        lone = loop.time() - t0
        host.inflight = 2  # two held, one still reading its body: the window waits for it
        first = asyncio.ensure_future(b.submit(job("first.png")))
        await asyncio.sleep(0.5)
        await asyncio.gather(first, b.submit(job("late.png")))
        await b.stop()
        return lone

    lone = asyncio.run(scenario())
    assert lone < 0.6, lone
    assert passes == [["alone.png"], ["first.png", "late.png"]]


def test_review_merge_of_workers():
    """/review with workers: today's counts summed (a worker still on yesterday's tally adds
    nothing), recent decisions and rejected images newest first across workers, and a worker
    that did not answer is counted as missing."""
    from verifier.service.review_page import merge_review, rejection_rate

    def part(day: str, counts: dict, times: list[str], rejected: list[tuple[int, str]]) -> dict:
        return {"day": day, "counts": counts,
                "recent": [{"at": f"{day}T{t}+00:00", "name": t} for t in times],
                "rejected": [{"id": i, "at": f"{day}T{t}+00:00"} for i, t in rejected]}

    a = part("2026-12-07", {"accept": 90, "reject": 6}, ["10:00:01", "10:00:05"], [(0, "10:00:01")])
    b = part("2026-12-07", {"accept": 3, "reject": 1, "error": 2}, ["10:00:03"], [(1, "10:00:03"), (3, "09:00:00")])
    old = part("2026-12-06", {"accept": 500, "reject": 400}, ["23:59:59"], [(5, "23:59:59")])
    m = merge_review([a, b, old, None], recent_keep=3)
    assert m["day"] == "2026-12-07"
    assert m["counts"] == {"accept": 93, "reject": 7, "error": 2}
    assert rejection_rate(m["counts"]) == pytest.approx(7 / 100)
    assert [r["name"] for r in m["recent"]] == ["10:00:05", "10:00:03", "10:00:01"]
    assert [r["id"] for r in m["rejected"]] == [1, 0, 3, 5]
    assert (m["missing"], m["workers"]) == (1, 4)
