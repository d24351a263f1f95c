"""The decision log: append-only Parquet files under `LOG/date=YYYY-MM-DD/`, one row per decision.

Each append writes a dot-prefixed temporary file, fsyncs it and renames it into place, so
readers (DuckDB, pyarrow) never see a half file and concurrent writers never collide.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .decision import Decision

__all__ = ["DecisionLog", "LogError", "FIXED_SCHEMA", "log_schema", "decisions_to_table",
           "SCORE_PREFIX", "PVALUE_PREFIX"]

SCORE_PREFIX = "score_"   # raw measure, direction given by the bundle's higher_is_worse
PVALUE_PREFIX = "p_"      # per-score conformal p-value, higher = more in-distribution

#: the contract columns, in order; score_<name> / p_<name> float64 columns follow
FIXED_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("digest", pa.string()),
    pa.field("bundle_id", pa.string(), nullable=False),
    pa.field("alpha", pa.float64(), nullable=False),
    pa.field("predicted_class", pa.string()),
    pa.field("confidence", pa.float64()),
    pa.field("decision", pa.string(), nullable=False),
    pa.field("p_value", pa.float64()),
    pa.field("reasons", pa.list_(pa.string())),
    pa.field("error", pa.string()),
])

_PART_GLOB = "part-*.parquet"
_DAY_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


class LogError(RuntimeError):
    """The log cannot be read or written as asked (missing folder, corrupt file, bad rows)."""


def log_schema(score_names: Sequence[str], pvalue_names: Sequence[str]) -> pa.Schema:
    """The full schema: FIXED_SCHEMA, then `score_<name>` and `p_<name>` (float64, nullable)."""
    extra = [pa.field(SCORE_PREFIX + n, pa.float64()) for n in score_names]
    extra += [pa.field(PVALUE_PREFIX + n, pa.float64()) for n in pvalue_names]
    fixed = set(FIXED_SCHEMA.names)
    clash = [f.name for f in extra if f.name in fixed]
    if clash:
        raise ValueError(f"score names would overwrite contract columns: {clash}")
    return pa.schema(list(FIXED_SCHEMA) + extra)


def decisions_to_table(decisions: Sequence[Decision], *, bundle_id: str, alpha: float,
                       time: datetime | Sequence[datetime] | None = None) -> pa.Table:
    """One row per decision. `time` is one instant for all, one per decision, or now (UTC).

    Naive datetimes are refused: a log whose day boundaries depend on the writer's local
    zone would put the same instant in different partitions on different machines.
    """
    n = len(decisions)
    times = _times(time, n)
    score_names = sorted({k for d in decisions for k in d.scores})
    pvalue_names = sorted({k for d in decisions for k in d.p_values})
    schema = log_schema(score_names, pvalue_names)
    cols: dict[str, list] = {
        "time": times,
        "input": [d.input for d in decisions],
        "digest": [d.digest for d in decisions],
        "bundle_id": [bundle_id] * n,
        "alpha": [float(alpha)] * n,
        "predicted_class": [d.predicted_class for d in decisions],
        "confidence": [_num(d.confidence) for d in decisions],
        "decision": [_decision(d.decision) for d in decisions],
        "p_value": [_num(d.p_value) for d in decisions],
        "reasons": [list(d.reasons) for d in decisions],
        "error": [d.error for d in decisions],
    }
    for name in score_names:
        cols[SCORE_PREFIX + name] = [_num(d.scores.get(name)) for d in decisions]
    for name in pvalue_names:
        cols[PVALUE_PREFIX + name] = [_num(d.p_values.get(name)) for d in decisions]
    return pa.Table.from_pydict(cols, schema=schema)


class DecisionLog:
    """A folder of daily-partitioned Parquet parts. Nothing is read or written in __init__."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------
    def append(self, decisions: Sequence[Decision], *, bundle_id: str, alpha: float,
               time: datetime | Sequence[datetime] | None = None) -> list[Path]:
        """Log decisions; returns the part files written (one per UTC date touched)."""
        if not decisions:
            return []
        return self.append_table(decisions_to_table(decisions, bundle_id=bundle_id,
                                                    alpha=alpha, time=time))

    def append_table(self, table: pa.Table) -> list[Path]:
        """Log a table already in the log's schema (bulk import); one part per UTC date."""
        _check_table(table)
        if table.num_rows == 0:
            return []
        days = pc.cast(table["time"], pa.date32()).to_numpy(zero_copy_only=False)
        written = []
        for day in np.unique(days):
            mask = pa.array(days == day)
            part = table.filter(mask) if len(np.unique(days)) > 1 else table
            folder = self.root / f"date={np.datetime_as_string(day, unit='D')}"
            written.append(_write_atomic(part, folder))
        return written

    # -- reading ---------------------------------------------------------------------------
    def days(self) -> list[date]:
        """The dates holding at least one visible part file, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for sub in self.root.iterdir():
            m = _DAY_DIR.match(sub.name)
            if m and sub.is_dir() and any(sub.glob(_PART_GLOB)):
                out.append(date.fromisoformat(m.group(1)))
        return sorted(out)

    def files(self, days: Sequence[date] | None = None) -> list[Path]:
        """The visible part files (dot-prefixed temporaries excluded), of `days` or all."""
        if days is None:
            folders = sorted(self.root.glob("date=*"))
        else:
            folders = [self.root / f"date={d.isoformat()}" for d in days]
        return sorted(p for f in folders if f.is_dir() for p in f.glob(_PART_GLOB))

    def connect(self, days: Sequence[date] | None = None,
                con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with a view `decisions` over the parts of `days` (or all).

        The view has every log column plus the hive partition column `date` (DATE).
        Parts written with different score sets are unioned by name (missing = NULL).
        Restricting to `days` means DuckDB opens only those folders' files.
        """
        if not self.root.is_dir():
            raise LogError(f"decision log folder not found: {self.root}")
        files = self.files(days)
        if not files:
            which = "any day" if days is None else ", ".join(d.isoformat() for d in days)
            raise LogError(f"no decision-log parts for {which} under {self.root}")
        con = con or duckdb.connect()
        listing = "[" + ", ".join(_sql_str(p.as_posix()) for p in files) + "]"
        try:
            con.execute(
                "CREATE OR REPLACE VIEW decisions AS SELECT * FROM read_parquet("
                f"{listing}, hive_partitioning=true, union_by_name=true, "
                "hive_types={'date': DATE})")
        except duckdb.Error as e:
            raise self._explain(files, e) from None
        return con

    def query(self, sql: str, params: Sequence[object] | None = None,
              days: Sequence[date] | None = None) -> pa.Table:
        """Run SQL against the view `decisions` (see `connect`) and return an Arrow table."""
        con = self.connect(days)
        try:
            return con.sql(sql, params=list(params) if params else None).to_arrow_table()
        except duckdb.Error as e:
            raise self._explain(self.files(days), e) from None
        finally:
            con.close()

    def corrupt_files(self, days: Sequence[date] | None = None) -> list[tuple[Path, str]]:
        """Parts whose Parquet footer cannot be read, with the reader's message."""
        bad = []
        for p in self.files(days):
            try:
                pq.ParquetFile(p).metadata  # noqa: B018 - reading the footer is the check
            except Exception as e:  # pyarrow raises several types for damaged files
                bad.append((p, str(e).splitlines()[0] if str(e) else type(e).__name__))
        return bad

    def _explain(self, files: Sequence[Path], err: Exception) -> LogError:
        # DuckDB's message does not always say which file is broken; find it for the user.
        bad = self.corrupt_files(sorted({date.fromisoformat(p.parent.name[5:]) for p in files}))
        if bad:
            names = "; ".join(f"{p}: {msg}" for p, msg in bad[:5])
            return LogError(f"corrupt Parquet file(s) in decision log: {names}")
        return LogError(f"cannot read decision log {self.root}: {str(err).splitlines()[0]}")


# -- helpers ------------------------------------------------------------------------------
def _write_atomic(table: pa.Table, folder: Path) -> Path:
    """Write to `.tmp-<final name>`, fsync, rename; a crash leaves only an ignored dot-file."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = folder / f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".tmp-{final.name}"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)  # make the rename itself durable
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_table(table: pa.Table) -> None:
    for f in FIXED_SCHEMA:
        if f.name not in table.schema.names:
            raise LogError(f"log table lacks contract column {f.name!r}")
        if not table.schema.field(f.name).type.equals(f.type):
            raise LogError(f"log column {f.name!r} has type {table.schema.field(f.name).type}, "
                           f"expected {f.type}")
    for name in table.schema.names:
        if name in FIXED_SCHEMA.names:
            continue
        if not (name.startswith(SCORE_PREFIX) or name.startswith(PVALUE_PREFIX)):
            raise LogError(f"unexpected log column {name!r} (score_<name> or p_<name> expected)")
        if not table.schema.field(name).type.equals(pa.float64()):
            raise LogError(f"log column {name!r} must be float64")


def _times(time: datetime | Sequence[datetime] | None, n: int) -> list[datetime]:
    if time is None:
        return [datetime.now(timezone.utc)] * n
    times = [time] * n if isinstance(time, datetime) else list(time)
    if len(times) != n:
        raise ValueError(f"{len(times)} times for {n} decisions")
    for t in times:
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError("decision times must be timezone-aware (use timezone.utc)")
    return [t.astimezone(timezone.utc) for t in times]


def _decision(v: str) -> str:
    if v not in ("accept", "reject"):
        raise ValueError(f"decision must be 'accept' or 'reject', got {v!r}")
    return v


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
