"""Issue 10, decision log: damaged parts found by name, stale temporaries cleaned and outside a
reader's glob, foreign files reported, a killed gate run keeps what it decided, and an earlier
day's damaged part does not stop tonight's drift report."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_decision_log import T0, _decision

from verifier.runtime.log import DecisionLog, LogError


def _glob_count(root: Path) -> int:
    """What a user runs by hand: DuckDB over every .parquet file under the log."""
    sql = f"SELECT count(*) FROM read_parquet('{root.as_posix()}/**/*.parquet')"
    with duckdb.connect() as con:
        return con.execute(sql).fetchone()[0]


def test_twenty_seeded_byte_flips_are_each_detected_by_name(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    [part] = log.append([_decision(i, reject=i % 3 == 0, extra=True) for i in range(200)],
                        bundle_id="b", alpha=0.05, time=T0)
    original = part.read_bytes()
    want = log.read().to_pylist()
    rng = np.random.default_rng(20)
    refused = harmless = 0
    for _ in range(20):
        data = bytearray(original)
        pos = int(rng.integers(4, len(data) - 4))  # anywhere but the magic bytes
        data[pos] ^= 1 << int(rng.integers(0, 8))
        part.write_bytes(bytes(data))
        try:
            got = log.read().to_pylist()
        except LogError as e:
            assert part.name in str(e)
            assert [p for p, _ in log.check().corrupt] == [part]
            refused += 1
            continue
        assert got == want, f"flip at byte {pos} read back as different rows, silently"
        harmless += 1  # the flip hit bytes no reader uses (e.g. the writer's name)
    assert refused + harmless == 20 and refused >= 15, (refused, harmless)


def test_parts_carry_page_checksums(tmp_path: Path) -> None:
    [part] = DecisionLog(tmp_path).append([_decision(i) for i in range(50)], bundle_id="b",
                                          alpha=0.05, time=T0)
    col = pq.ParquetFile(part).metadata.row_group(0).column(
        pq.ParquetFile(part).schema_arrow.names.index("confidence"))
    data = bytearray(part.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 3] ^= 0x10  # inside the page body
    part.write_bytes(bytes(data))
    with pytest.raises(OSError, match="(?i)crc|checksum"):
        pq.read_table(part, page_checksum_verification=True)


def _killed_writer(root: str) -> None:
    # a writer killed after its temporary file is complete, before the rename
    os.replace = lambda *a, **k: os._exit(3)  # type: ignore[assignment]
    DecisionLog(root).append([_decision(0)], bundle_id="b", alpha=0.05, time=T0)


def test_stale_temporaries_are_cleaned_and_never_break_a_glob(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.append([_decision(i) for i in range(3)], bundle_id="b", alpha=0.05, time=T0)
    proc = mp.get_context("spawn").Process(target=_killed_writer, args=(str(tmp_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    folder = tmp_path / "date=2024-05-01"
    [fresh] = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert _glob_count(tmp_path) == 3  # today's temporaries are outside '**/*.parquet'
    # what older versions left: '.tmp-part-*.parquet', torn, matched by the glob
    old = [folder / f".tmp-part-killed{k}.parquet" for k in range(5)]
    for p in old:
        p.write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(duckdb.Error):
        _glob_count(tmp_path)  # the finding
    notes = folder / "README.txt"
    notes.write_text("someone's notes: never deleted")
    stale = time.time() - 120
    for p in [*old[:4], fresh]:
        os.utime(p, (stale, stale))
    log2 = DecisionLog(tmp_path)
    log2.append([_decision(9)], bundle_id="b", alpha=0.05, time=T0)  # sweeps the folder once
    left = sorted(p.name for p in folder.iterdir() if not p.name.startswith("part-"))
    assert left == [".tmp-part-killed4.parquet", "README.txt"]  # a young one may be a live writer
    assert log2.clean_stale_temporaries(max_age=0) == [old[4]]
    assert _glob_count(tmp_path) == 4 and notes.exists()


def test_foreign_files_in_a_day_folder_are_reported(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.append([_decision(i) for i in range(4)], bundle_id="b", alpha=0.05, time=T0)
    folder = tmp_path / "date=2024-05-01"
    pq.write_table(pa.table({"patient": ["x"], "weight": [3.0]}), folder / "part-export.parquet")
    pq.write_table(pa.table({"a": [1]}), folder / "other.parquet")
    health = log.check()
    assert sorted(p.name for p, _ in health.foreign) == ["other.parquet", "part-export.parquet"]
    assert "schema is not the decision log's" in dict(health.foreign)[folder / "part-export.parquet"]
    assert health.corrupt == []
    with pytest.raises(LogError, match="part-export.parquet"):
        log.read()
    con = log.connect(exclude=health.bad)
    assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 4


def test_earlier_day_damage_is_named_but_does_not_stop_tonight(tmp_path: Path) -> None:
    from test_drift import DAY, SyntheticGate, _log_days

    from verifier.drift import DriftConfig, DriftError, drift_report

    gate = SyntheticGate(seed=5)
    ref = gate.reference()
    log = _log_days(tmp_path / "log", gate, {DAY - timedelta(days=k): {"n": 600} for k in range(4)})
    earlier = next((log.root / f"date={DAY - timedelta(days=2)}").glob("part-*.parquet"))
    data = bytearray(earlier.read_bytes())
    data[len(data) // 3] ^= 0xFF
    earlier.write_bytes(bytes(data))
    (log.root / f"date={DAY - timedelta(days=1)}" / "stray.csv").write_text("a,b\n")
    rep = drift_report(log, ref, DAY, DriftConfig())
    assert rep.n == 600 and len(rep.trend) == 3  # the damaged day is left out of the trend
    assert any(earlier.name in n and "damaged" in n for n in rep.notes)
    assert any("stray.csv" in n and "foreign" in n for n in rep.notes)
    assert any(earlier.name in n for n in rep.to_dict()["notes"])
    tonight = next((log.root / f"date={DAY}").glob("part-*.parquet"))
    tonight.write_bytes(tonight.read_bytes()[:-40])
    with pytest.raises(DriftError, match=tonight.name):  # the tested day itself: an error
        drift_report(log, ref, DAY, DriftConfig())


@pytest.fixture(scope="module")
def file_bundle(tmp_path_factory, mnist, gap_model) -> Path:
    from conftest import CAL, TRAIN, write_onnx_model

    from verifier.cli.main import main
    from verifier.data import save_dataset

    root = tmp_path_factory.mktemp("killbundle")
    write_onnx_model(root, gap_model)
    x, y = mnist
    classes = [str(i) for i in range(10)]
    save_dataset(x[TRAIN][:1000], y[TRAIN][:1000], classes, root / "ref")
    save_dataset(x[CAL], y[CAL], classes, root / "cal")
    assert main(["build", "--spec", str(root / "model.toml"), "--data", str(root / "ref"),
                 "--calibration", str(root / "cal"), "--out", str(root / "bundle")]) == 0
    return root / "bundle"


def test_killed_gate_run_keeps_every_decision_it_printed(file_bundle, mnist, tmp_path) -> None:
    from conftest import POOL

    from verifier.data import save_dataset

    x, y = mnist
    idx = np.arange(1400) % 1400
    save_dataset(x[POOL][idx], y[POOL][idx], [str(i) for i in range(10)], tmp_path / "in")
    log = tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier.cli.main", "gate", "--bundle", str(file_bundle),
         str(tmp_path / "in"), "--json", "--log", str(log), "--batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    printed = []
    assert proc.stdout is not None
    for line in proc.stdout:
        printed.append(line)
        if len(printed) == 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    import json

    printed_inputs = {json.loads(line)["input"] for line in printed}
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT input FROM read_parquet('{log.as_posix()}/**/*.parquet')").fetchall()
    logged = [r[0] for r in rows]
    assert len(logged) == len(set(logged)) and len(logged) % 8 == 0  # whole batches only
    assert printed_inputs <= set(logged)  # rows lost: none of what was decided and shown
    assert 40 <= len(logged) < 1400  # it really was killed midway


def test_cli_non_utf8_name_gated_printed_and_logged(file_bundle, mnist, tmp_path) -> None:
    """The issue's run: `gate --json --log` on a folder holding a file whose name is not UTF-8
    (it used to exit 2 with 0 records and nothing logged)."""
    import json

    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(mnist[0][4000 + i]).save(folder / f"d{i}.png")
    Image.fromarray(mnist[0][4003]).save(os.fsencode(folder) + b"/\xff\xfe scan.png")
    os.symlink("loop", folder / "loop")
    log = tmp_path / "log"
    res = subprocess.run([sys.executable, "-m", "verifier.cli.main", "gate", "--bundle",
                          str(file_bundle), os.fsencode(folder), "--json", "--log", str(log)],
                         capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-500:]
    lines = [json.loads(line) for line in res.stdout.decode("utf-8").splitlines()]
    assert len(lines) == 5
    by_name = {Path(d["input"]).name: d for d in lines}
    assert by_name["\\xff\\xfe scan.png"]["error"] is None
    assert "link loop" in by_name["loop"]["error"]
    with duckdb.connect() as con:
        logged = con.execute(f"SELECT input FROM read_parquet('{log.as_posix()}/**/*.parquet')"
                             ).fetchall()
    assert sorted(r[0] for r in logged) == sorted(d["input"] for d in lines)
