"""Nightly drift, reading the decision log: one day's sample, the trend, the most rejected
inputs (DuckDB over the Parquet parts, verified first), and the night's report."""
from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from verifier.drift.report import DriftReport, TrendPoint
from verifier.drift.statistics import (DaySample, DriftConfig, DriftError, DriftReference, _f,
                                       evaluate)
from verifier.runtime.log import SCORE_PREFIX, DecisionLog, LogError

__all__ = ["default_day", "load_day", "load_trend", "load_most_rejected", "drift_report"]


# -- reading the log ----------------------------------------------------------------------
def default_day() -> date:
    """Yesterday in UTC: the last complete day when the nightly job runs."""
    return (datetime.now(timezone.utc) - timedelta(days=1)).date()


def load_day(log: DecisionLog, day: date, reference: DriftReference,
             exclude: Iterable[Path] = ()) -> DaySample:
    """Aggregate one day in DuckDB; only the score columns are fetched, one at a time.
    `exclude`: parts to leave out (found damaged or foreign by `DecisionLog.check`)."""
    con = _connect(log, [day], exclude)
    try:
        cols = {r[0] for r in con.execute("DESCRIBE decisions").fetchall()}
        bid = reference.bundle_id
        n, rejected, errors, other = con.execute(
            "SELECT count(*) FILTER (WHERE bundle_id = $1), "
            "count(*) FILTER (WHERE bundle_id = $1 AND decision = 'reject'), "
            "count(error) FILTER (WHERE bundle_id = $1), "
            "count(*) FILTER (WHERE bundle_id <> $1) FROM decisions", [bid]).fetchone()
        if n == 0:
            raise DriftError(f"no decisions of bundle {bid!r} logged on {day} "
                             f"({other} rows of other bundles)")
        per_class = {c: (int(a), int(b)) for c, a, b in con.execute(
            "SELECT predicted_class, count(*), count(*) FILTER (WHERE decision = 'reject') "
            "FROM decisions WHERE bundle_id = $1 AND predicted_class IS NOT NULL "
            "GROUP BY 1", [bid]).fetchall()}
        scores = {}
        for name in reference.calibration_scores:
            col = SCORE_PREFIX + name
            if col in cols:
                scores[name] = _column(con, col, bid)
        p_values = _column(con, "p_value", bid)
    except duckdb.Error as e:
        raise _explained(log, [day], e) from None
    finally:
        con.close()
    return DaySample(day=day, n=int(n), rejected=int(rejected), errors=int(errors),
                     per_class=per_class, scores=scores, p_values=p_values)


def load_trend(log: DecisionLog, day: date, n_days: int, reference: DriftReference,
               exclude: Iterable[Path] = ()) -> list[TrendPoint]:
    """The p-chart of the `n_days` days ending at `day` (days without rows are skipped)."""
    skip = set(exclude)
    window = [d for d in log.days() if day - timedelta(days=n_days) < d <= day
              and any(p not in skip for p in log.files([d]))]
    if not window:
        return []
    con = _connect(log, window, skip)
    try:
        rows = con.execute(
            "SELECT date, count(*), count(*) FILTER (WHERE decision = 'reject') FROM decisions "
            "WHERE bundle_id = $1 GROUP BY date ORDER BY date", [reference.bundle_id]).fetchall()
    except duckdb.Error as e:
        raise _explained(log, window, e) from None
    finally:
        con.close()
    a = reference.alpha
    out = []
    for d, n, x in rows:
        half = 3.0 * math.sqrt(a * (1 - a) / n)
        out.append(TrendPoint(day=d, n=int(n), rejected=int(x), rate=x / n,
                              lower=max(0.0, a - half), upper=min(1.0, a + half)))
    return out


def load_most_rejected(log: DecisionLog, day: date, reference: DriftReference,
                       k: int, exclude: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """The day's `k` rejects with the lowest p-value (errors, without one, last)."""
    con = _connect(log, [day], exclude)
    try:
        rel = con.execute(
            "SELECT epoch_us(time) AS time, input, digest, predicted_class, p_value, reasons, error "
            "FROM decisions WHERE bundle_id = $1 AND decision = 'reject' "
            "ORDER BY p_value ASC NULLS LAST, time LIMIT $2", [reference.bundle_id, k])
        names = [d[0] for d in rel.description]
        rows = [dict(zip(names, r)) for r in rel.fetchall()]
    except duckdb.Error as e:
        raise _explained(log, [day], e) from None
    finally:
        con.close()
    for r in rows:
        # epoch microseconds: DuckDB's TIMESTAMPTZ -> Python conversion needs pytz
        r["time"] = (_EPOCH + timedelta(microseconds=int(r["time"]))).isoformat()
        r["p_value"] = _f(r["p_value"])
    return rows


def drift_report(log: DecisionLog, reference: DriftReference, day: date | None = None,
                 config: DriftConfig = DriftConfig()) -> DriftReport:
    """Everything the nightly job says about `day` (default: yesterday, UTC)."""
    day = day or default_day()
    if not log.root.is_dir():
        raise DriftError(f"decision log folder not found: {log.root}")
    if day not in log.days():
        have = log.days()
        hint = f"latest logged day: {have[-1]}" if have else "the log holds no decisions"
        raise DriftError(f"no decisions logged on {day} under {log.root} ({hint})")
    # Every part of the window is verified first (page checksums, schema). A damaged part
    # of the tested day makes the day's figures unknowable: an error. One of an earlier day
    # only thins the trend: it is left out and named in the notes, and the night goes on.
    window = [d for d in log.days() if day - timedelta(days=config.trend_days) < d <= day]
    log.clean_stale_temporaries([log.root / f"date={d.isoformat()}" for d in window])
    health = log.check(window)
    tonight = [(p, m) for p, m in health.corrupt if p.parent.name == f"date={day.isoformat()}"]
    if tonight:
        raise DriftError("damaged Parquet part(s) in the decision log for " f"{day}: "
                         + "; ".join(f"{p}: {m}" for p, m in tonight[:5]))
    skip = health.bad
    sample = load_day(log, day, reference, skip)
    trend = load_trend(log, day, config.trend_days, reference, skip)
    before = [p for p in trend if p.day < day]
    history = (sum(p.n for p in before), sum(p.rejected for p in before)) if before else None
    notes = [f"left out of this report: {m}" for m in health.messages()]
    notes += [f"score {n!r} of the calibration reference is not in the day's log"
              for n in sorted(set(reference.calibration_scores) - set(sample.scores))]
    if sample.errors:
        notes.append(f"{sample.errors} inputs could not be read or probed (counted as rejects)")
    return DriftReport(day=day, n=sample.n, bundle_id=reference.bundle_id, alpha=reference.alpha,
                       config=config, tests=evaluate(sample, reference, config, history),
                       trend=trend,
                       most_rejected=load_most_rejected(log, day, reference, config.top_rejected,
                                                        skip),
                       notes=notes, sample=sample, reference=reference)


# -- helpers ------------------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _connect(log: DecisionLog, days: list[date],
             exclude: Iterable[Path] = ()) -> duckdb.DuckDBPyConnection:
    try:
        return log.connect(days, exclude=exclude)
    except LogError as e:
        raise DriftError(str(e)) from None


def _explained(log: DecisionLog, days: list[date], err: Exception) -> DriftError:
    return DriftError(str(log._explain(log.files(days), err)))


def _column(con: duckdb.DuckDBPyConnection, col: str, bundle_id: str) -> np.ndarray:
    q = f'SELECT "{col}" AS v FROM decisions WHERE bundle_id = $1 AND "{col}" IS NOT NULL'
    v = con.execute(q, [bundle_id]).fetchnumpy()["v"]
    return np.asarray(v, dtype=np.float64)
