"""Tests of the decision log: schema contract, atomic writes, concurrent writers, readers.

Rows are read back through both DuckDB and pyarrow, the two readers DESIGN.md promises.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from verifier.runtime.decision import Decision
from verifier.runtime.log import FIXED_SCHEMA, DecisionLog, LogError

T0 = datetime(2024, 5, 1, 23, 59, 30, tzinfo=timezone.utc)


def _decision(i: int, *, reject: bool = False, extra: bool = False) -> Decision:
    scores = {"garbage": 0.01 * i, "iou": 0.5 + 0.001 * i}
    p_values = {"garbage": 0.9, "iou": 0.4}
    if extra:
        scores["early_mahalanobis"] = 3.0 + i
    return Decision(input=f"img{i}.png", decision="reject" if reject else "accept",
                    p_value=0.01 if reject else 0.5, predicted_class="normal",
                    confidence=0.9, reasons=["attention"] if reject else [],
                    scores=scores, p_values=p_values, digest=f"sha{i}")


def test_schema_contract_and_round_trip(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "log")
    err = Decision.from_error("broken.png", "cannot decode", digest="abc")
    [path] = log.append([_decision(1), _decision(2, reject=True), err],
                        bundle_id="b1", alpha=0.05, time=T0)
    assert path.parent.name == "date=2024-05-01"
    assert path.name.startswith("part-") and path.suffix == ".parquet"
    table = pq.read_table(path)
    assert table.schema.names[:len(FIXED_SCHEMA)] == FIXED_SCHEMA.names
    assert table.schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("reasons").type == pa.list_(pa.string())
    assert set(table.schema.names[len(FIXED_SCHEMA):]) == {
        "score_garbage", "score_iou", "p_garbage", "p_iou"}
    rows = table.to_pylist()
    assert rows[1]["decision"] == "reject" and rows[1]["reasons"] == ["attention"]
    assert rows[0]["digest"] == "sha1" and rows[2]["digest"] == "abc"
    assert rows[2]["error"] == "cannot decode" and rows[2]["score_iou"] is None
    assert rows[2]["p_value"] is None and rows[2]["predicted_class"] is None
    assert log.days() == [date(2024, 5, 1)]


def test_one_part_per_utc_date_and_naive_time_refused(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    times = [T0, T0 + timedelta(minutes=1), T0 + timedelta(days=2)]  # crosses midnight UTC
    paths = log.append([_decision(i) for i in range(3)], bundle_id="b", alpha=0.05, time=times)
    assert sorted(p.parent.name for p in paths) == [
        "date=2024-05-01", "date=2024-05-02", "date=2024-05-03"]
    with pytest.raises(ValueError, match="timezone-aware"):
        log.append([_decision(0)], bundle_id="b", alpha=0.05, time=datetime(2024, 5, 1))


def test_duckdb_and_pyarrow_read_mixed_score_sets(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.append([_decision(i) for i in range(5)], bundle_id="b", alpha=0.05, time=T0)
    log.append([_decision(i, extra=True) for i in range(5, 8)], bundle_id="b", alpha=0.05,
               time=T0)
    got = log.query("SELECT count(*) AS n, count(score_early_mahalanobis) AS m, "
                    "min(date) AS d FROM decisions").to_pylist()[0]
    assert got == {"n": 8, "m": 3, "d": date(2024, 5, 1)}
    dataset = ds.dataset(tmp_path, format="parquet", partitioning="hive",
                         exclude_invalid_files=False)
    assert dataset.to_table(columns=["input"]).num_rows == 8


def _crash_between_write_and_rename(root: str) -> None:
    # Simulates a process killed after the temporary file is complete but before rename.
    os.replace = lambda *a, **k: os._exit(3)  # type: ignore[assignment]
    DecisionLog(root).append([_decision(0)], bundle_id="b", alpha=0.05, time=T0)


def test_crash_leaves_no_visible_part(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.append([_decision(1)], bundle_id="b", alpha=0.05, time=T0)
    proc = mp.get_context("spawn").Process(target=_crash_between_write_and_rename,
                                           args=(str(tmp_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    folder = tmp_path / "date=2024-05-01"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1  # the crash really happened after the temporary write
    assert len(log.files()) == 1
    assert log.query("SELECT count(*) AS n FROM decisions").to_pylist() == [{"n": 1}]


def test_failed_write_cleans_its_temporary(tmp_path: Path, monkeypatch) -> None:
    import verifier.runtime.log_parts as dl  # the atomic write lives there

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(dl.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        DecisionLog(tmp_path).append([_decision(1)], bundle_id="b", alpha=0.05, time=T0)
    assert list((tmp_path / "date=2024-05-01").iterdir()) == []


def _writer(root: str, worker: int, n_appends: int) -> None:
    log = DecisionLog(root)
    for k in range(n_appends):
        log.append([_decision(1000 * worker + k)], bundle_id=f"w{worker}", alpha=0.05, time=T0)


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = DecisionLog(tmp_path)
    assert len(log.files()) == 80
    rows = log.query("SELECT bundle_id, count(DISTINCT input) AS n FROM decisions "
                     "GROUP BY bundle_id ORDER BY bundle_id").to_pylist()
    assert rows == [{"bundle_id": f"w{w}", "n": 20} for w in range(4)]
    assert pq.ParquetDataset(tmp_path).read(columns=["input"]).num_rows == 80


def test_clear_errors_for_missing_folder_and_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="not found"):
        DecisionLog(tmp_path / "nope").connect()
    log = DecisionLog(tmp_path)
    log.append([_decision(1)], bundle_id="b", alpha=0.05, time=T0)
    bad = tmp_path / "date=2024-05-01" / "part-zzz-corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert [p for p, _ in log.corrupt_files()] == [bad]
    with pytest.raises(LogError, match="corrupt.*part-zzz-corrupt"):
        log.query("SELECT count(*) FROM decisions")
