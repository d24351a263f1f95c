"""The decision log: append-only Parquet files under `LOG/date=YYYY-MM-DD/`, one row per decision.

Each append writes a hidden temporary file (`.part-*.parquet.tmp`, outside a reader's
`**/*.parquet` glob), fsyncs it and renames it into place, so readers (DuckDB, pyarrow) never
see a half file and concurrent writers never collide. Parts carry Parquet page checksums;
`check` / `read` verify them and name every damaged or foreign file.
"""
from __future__ import annotations

import math
import re
import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from verifier.runtime.decision import Decision
from verifier.runtime.log_parts import (_TEMP_NAME, FIXED_SCHEMA, PVALUE_PREFIX, SCORE_PREFIX,
                                        LogError, _check_table, _temporaries, _verify_part,
                                        _write_atomic)

__all__ = ["DecisionLog", "LogError", "LogHealth", "FIXED_SCHEMA", "log_schema",
           "decisions_to_table", "SCORE_PREFIX", "PVALUE_PREFIX", "STALE_TEMP_SECONDS"]

_PART_GLOB = "part-*.parquet"
_DAY_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
#: a temporary older than this is left by a killed writer (a live one renames within seconds)
STALE_TEMP_SECONDS: float = 60.0


@dataclass
class LogHealth:
    """What `DecisionLog.check` found: (path, reason) of damaged and of foreign files.

    corrupt: parts that fail to read (footer, page headers, page checksums, decoding);
    foreign: files in a day folder that are not this log's parts (other names, other schema);
    temporaries: this tool's unfinished temporary files still present (a writer at work, or
    killed less than `STALE_TEMP_SECONDS` ago).
    """

    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    foreign: list[tuple[Path, str]] = field(default_factory=list)
    temporaries: list[Path] = field(default_factory=list)

    @property
    def bad(self) -> set[Path]:
        """Every part a reader should leave out."""
        return {p for p, _ in self.corrupt} | {p for p, _ in self.foreign}

    def messages(self) -> list[str]:
        return ([f"damaged part {p}: {m}" for p, m in self.corrupt]
                + [f"foreign file {p}: {m}" for p, m in self.foreign])


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
        "input": [_text(d.input) for d in decisions],
        "digest": [d.digest for d in decisions],
        "bundle_id": [bundle_id] * n,
        "alpha": [float(alpha)] * n,
        "predicted_class": [d.predicted_class for d in decisions],
        "confidence": [_num(d.confidence) for d in decisions],
        "decision": [_decision(d.decision) for d in decisions],
        "p_value": [_num(d.p_value) for d in decisions],
        "reasons": [list(d.reasons) for d in decisions],
        "error": [None if d.error is None else _text(d.error) for d in decisions],
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
        self._swept: set[Path] = set()  # day folders already cleaned of stale temporaries

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
            if folder not in self._swept:  # once per folder and log object: appends stay cheap
                self.clean_stale_temporaries([folder])
                self._swept.add(folder)
            written.append(_write_atomic(part, folder))
        return written

    def clean_stale_temporaries(self, folders: Iterable[Path] | None = None,
                                max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Delete this tool's temporary files older than `max_age` seconds (left by killed
        writers); nothing else is touched. Returns the files removed."""
        removed = []
        now = _time.time()
        for folder in (self._day_folders() if folders is None else folders):
            for p in _temporaries(folder):
                try:
                    if now - p.lstat().st_mtime > max_age:
                        p.unlink()
                        removed.append(p)
                except FileNotFoundError:  # its writer renamed it, or another cleaner won
                    continue
        return removed

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
                con: duckdb.DuckDBPyConnection | None = None,
                exclude: Iterable[Path] = ()) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with a view `decisions` over the parts of `days` (or all).

        The view has every log column plus the hive partition column `date` (DATE).
        Parts written with different score sets are unioned by name (missing = NULL).
        Restricting to `days` means DuckDB opens only those folders' files; `exclude`
        leaves out parts `check` found damaged or foreign.
        """
        if not self.root.is_dir():
            raise LogError(f"decision log folder not found: {self.root}")
        skip = set(exclude)
        files = [p for p in self.files(days) if p not in skip]
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
        """Parts that cannot be read back intact (page checksums verified), with the reason."""
        return self.check(days).corrupt

    def check(self, days: Sequence[date] | None = None) -> LogHealth:
        """Read every file of the day folders of `days` (or all) and say what is wrong.

        Each part is read in full with its page checksums verified (a flipped bit in the
        data is caught, not decoded into wrong numbers) and its schema checked against
        the log's; any other file in a day folder is reported as foreign.
        """
        health = LogHealth()
        folders = self._day_folders(days)
        for folder in folders:
            try:
                entries = sorted(folder.iterdir())
            except OSError as e:
                health.corrupt.append((folder, f"cannot list folder ({e.strerror or e})"))
                continue
            for p in entries:
                if _TEMP_NAME.match(p.name):
                    health.temporaries.append(p)
                elif p.name.startswith("."):
                    continue
                elif not (p.match(_PART_GLOB) and p.is_file()):
                    health.foreign.append((p, "not a decision-log part (expected part-*.parquet)"))
                else:
                    kind, msg = _verify_part(p)
                    if kind:
                        (health.corrupt if kind == "corrupt" else health.foreign).append((p, msg))
        return health

    def read(self, days: Sequence[date] | None = None, columns: Sequence[str] | None = None,
             ) -> pa.Table:
        """Every row of `days` (or all) as one Arrow table, parts verified first.

        Raises `LogError` naming each damaged or foreign part; nothing is read back silently.
        Parts with different score sets are unified by name (missing = null).
        """
        health = self.check(days)
        if health.corrupt or health.foreign:
            raise LogError("decision log holds unusable file(s): " + "; ".join(health.messages()[:5]))
        files = self.files(days)
        if not files:
            raise LogError(f"no decision-log parts under {self.root}")
        tables = [pq.read_table(p, columns=list(columns) if columns else None,
                                page_checksum_verification=True) for p in files]
        return pa.concat_tables(tables, promote_options="default")

    def _day_folders(self, days: Sequence[date] | None = None) -> list[Path]:
        if days is None:
            if not self.root.is_dir():
                return []
            return sorted(p for p in self.root.iterdir() if _DAY_DIR.match(p.name) and p.is_dir())
        return [f for f in (self.root / f"date={d.isoformat()}" for d in days) if f.is_dir()]

    def _explain(self, files: Sequence[Path], err: Exception) -> LogError:
        # DuckDB's message does not always say which file is broken; find it for the user.
        bad = self.corrupt_files(sorted({date.fromisoformat(p.parent.name[5:]) for p in files}))
        if bad:
            names = "; ".join(f"{p}: {msg}" for p, msg in bad[:5])
            return LogError(f"corrupt Parquet file(s) in decision log: {names}")
        return LogError(f"cannot read decision log {self.root}: {str(err).splitlines()[0]}")


# -- helpers ------------------------------------------------------------------------------
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


def _text(s: str) -> str:
    """Valid UTF-8 for Arrow: a name holding undecodable file-name bytes (lone surrogates)
    has them escaped as `\\xNN`, as `verifier.data.safe_name` does for inputs it reads."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
