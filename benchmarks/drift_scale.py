"""Benchmark of `verifier drift`: report time over 10 million logged rows, false-alarm and detection rates.

Run: .venv/bin/python benchmarks/drift_scale.py [--rows 10000000] [--days 30] [--nights 1000]
Prints a table and writes benchmarks/results/drift_scale.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from verifier.drift import DriftConfig, DriftReference, drift_report, evaluate  # noqa: E402
from verifier.reports.drift import render_html  # noqa: E402
from verifier.runtime.log import DecisionLog, log_schema  # noqa: E402

CLASSES = ("normal", "pneumonia", "effusion", "nodule")
FREQ = np.array([0.4, 0.3, 0.2, 0.1])
MEASURES = ("iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein")
SCORES = ("garbage", *MEASURES, *(f"early_{m}" for m in MEASURES), "early_mahalanobis")
HIGHER_IS_WORSE = {s: s.endswith(("kl", "wasserstein", "mahalanobis", "garbage")) for s in SCORES}
BUNDLE = "bench-bundle"
ALPHA = 0.05
PARTS_PER_DAY = 24  # one part an hour, as a gate service flushing hourly would write
END = date(2024, 6, 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--nights", type=int, default=1000, help="simulated clean nights")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/drift_scale.json")
    ap.add_argument("--skip-scale", action="store_true",
                    help="only the statistics; keep the scale figures already in --out")
    a = ap.parse_args()
    results: dict = {"machine": {"python": platform.python_version(), "cpus": mp.cpu_count(),
                                 "platform": platform.platform()}}
    if a.skip_scale and a.out.exists():
        results["scale"] = json.loads(a.out.read_text()).get("scale")
    else:
        with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
            results["scale"] = scale(Path(tmp) / "log", a.rows, a.days)
    results["statistics"] = rates(a.nights)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {a.out}")


# -- scale ----------------------------------------------------------------------------------
def scale(root: Path, rows: int, days: int) -> dict:
    """Write `rows` rows over `days` days (in a child process), then time reports here."""
    t0 = time.perf_counter()
    child = mp.get_context("spawn").Process(target=_write_log, args=(str(root), rows, days))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit("log generation failed")
    write_s = time.perf_counter() - t0
    log = DecisionLog(root)
    size = sum(p.stat().st_size for p in log.files())
    ref = _reference(np.random.default_rng(0))
    out = {"rows": rows, "days": days, "rows_per_day": rows // days, "parts": len(log.files()),
           "score_columns": len(SCORES), "log_bytes": size, "write_s": round(write_s, 1)}
    for label, trend in (("one_day", 1), ("trend_30_days", days)):
        cfg = DriftConfig(trend_days=trend)
        t = time.perf_counter()
        report = drift_report(log, ref, END, cfg)
        t_report = time.perf_counter() - t
        t = time.perf_counter()
        html = render_html(report)
        out[label] = {"report_s": round(t_report, 2), "html_s": round(time.perf_counter() - t, 2),
                      "html_bytes": len(html.encode()), "tests": len(report.tests),
                      "trend_points": len(report.trend), "alert": report.alert}
    # the whole process never held the log: this is the reader's own peak
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"\n{'rows':>11} {'days':>5} {'parts':>6} {'GiB':>6} {'write s':>8} "
          f"{'1-day s':>8} {'30-day s':>9} {'html s':>7} {'peak RSS MiB':>13}")
    print(f"{rows:>11,} {days:>5} {out['parts']:>6} {size / 2**30:>6.2f} {write_s:>8.1f} "
          f"{out['one_day']['report_s']:>8.2f} {out['trend_30_days']['report_s']:>9.2f} "
          f"{out['trend_30_days']['html_s']:>7.2f} {out['peak_rss_mib']:>13.1f}")
    return out


def _reference(rng: np.random.Generator, n: int = 2000) -> DriftReference:
    cls = rng.choice(len(CLASSES), n, p=FREQ)
    return DriftReference(bundle_id=BUNDLE, alpha=ALPHA, classes=CLASSES,
                          calibration_scores=_scores(rng, cls), calibration_classes=cls,
                          higher_is_worse=HIGHER_IS_WORSE)


def _scores(rng: np.random.Generator, cls: np.ndarray) -> dict[str, np.ndarray]:
    n, out = len(cls), {}
    for k, s in enumerate(SCORES):
        if HIGHER_IS_WORSE[s]:
            out[s] = rng.gamma(2.0 + 0.1 * k, 1.0 + 0.05 * cls)
        else:
            out[s] = rng.beta(6 + cls, 3, n)
    return out


def _write_log(root: str, rows: int, days: int) -> None:
    rng = np.random.default_rng(1)
    ref = _reference(np.random.default_rng(0))
    cc = ref.calibration_classes  # class-conditional calibration, as the real gate does
    cal_sorted = {(s, k): np.sort(v[cc == k]) for s, v in ref.calibration_scores.items()
                  for k in range(len(CLASSES))}
    log = DecisionLog(root)
    per_day = rows // days
    schema = log_schema(SCORES, SCORES)
    for d in range(days):
        day = END - timedelta(days=days - 1 - d)
        start = datetime.combine(day, datetime.min.time(), timezone.utc)
        for h, n in enumerate(np.diff(np.linspace(0, per_day, PARTS_PER_DAY + 1).astype(int))):
            log.append_table(_part(rng, n, start + timedelta(hours=h), cal_sorted, schema))


def _part(rng: np.random.Generator, n: int, start: datetime, cal_sorted: dict, schema: pa.Schema
          ) -> pa.Table:
    cls = rng.choice(len(CLASSES), n, p=FREQ)
    scores = _scores(rng, cls)
    p_each = {}
    for s, v in scores.items():
        p_each[s] = np.empty(n)
        for k in range(len(CLASSES)):
            c, at = cal_sorted[s, k], cls == k
            worse = (len(c) - np.searchsorted(c, v[at])) if HIGHER_IS_WORSE[s] \
                else np.searchsorted(c, v[at], "right")
            p_each[s][at] = (1 + worse) / (len(c) + 1)
    p = np.minimum(1.0, len(SCORES) * np.min(np.vstack(list(p_each.values())), axis=0))
    reject = p < ALPHA
    us = np.sort(rng.integers(0, 3600 * 10**6, n))
    t0 = int(start.timestamp() * 10**6)
    names = np.array(CLASSES, dtype=object)[cls]
    empty_or_attention = pa.ListArray.from_arrays(
        np.concatenate([[0], np.cumsum(reject)]).astype(np.int32), pa.array(["attention"] * int(reject.sum())))
    cols = {
        "time": pa.array(t0 + us, pa.timestamp("us", tz="UTC")),
        "input": pa.array([f"/pacs/study{t0 + u}.dcm" for u in us]),
        "digest": pa.array([b.hex() for b in np.frombuffer(rng.bytes(32 * n), dtype="S32")]),
        "bundle_id": pa.array([BUNDLE] * n),
        "alpha": pa.array(np.full(n, ALPHA)),
        "predicted_class": pa.array(names, pa.string()),
        "confidence": pa.array(rng.uniform(0.5, 1.0, n)),
        "decision": pa.array(np.where(reject, "reject", "accept").astype(object), pa.string()),
        "p_value": pa.array(p),
        "reasons": empty_or_attention,
        "error": pa.nulls(n, pa.string()),
    }
    cols.update({f"score_{s}": pa.array(v) for s, v in scores.items()})
    cols.update({f"p_{s}": pa.array(v) for s, v in p_each.items()})
    return pa.Table.from_pydict(cols, schema=schema)


# -- false-alarm and detection rates ----------------------------------------------------------
def rates(nights: int) -> dict:
    """Simulated nights of 2,000 decisions from the synthetic gate of tests/test_drift.py."""
    from test_drift import SyntheticGate

    out = {}
    per_gate = 50
    for contamination in (0.0, 0.01, 0.05, 0.20):
        n_nights = nights if contamination == 0 else max(nights // 5, 100)
        alarms, fired = 0, {}
        for g in range((n_nights + per_gate - 1) // per_gate):  # fresh calibration per 50 nights
            gate = SyntheticGate(seed=1000 + g + int(contamination * 1e4))
            ref = gate.reference()
            # 14 clean days of the same bundle before the nights: the trend window's history
            history = (14 * 2000, int(sum(gate.day(n=2000)[2].sum() for _ in range(14))))
            for _ in range(min(per_gate, n_nights - g * per_gate)):
                tests = evaluate(gate.sample(n=2000, contamination=contamination), ref,
                                 DriftConfig(), history)
                hit = [t.family for t in tests if t.alert]
                alarms += bool(hit)
                for fam in set(hit):
                    fired[fam] = fired.get(fam, 0) + 1
        lo, hi = _wilson(alarms, n_nights)
        key = "clean" if contamination == 0 else f"contamination_{contamination:.0%}"
        out[key] = {"contamination": contamination, "nights": n_nights, "alarms": alarms,
                    "rate": alarms / n_nights, "wilson95": [lo, hi],
                    "families_fired": {k: v / n_nights for k, v in sorted(fired.items())}}
        print(f"{key:>20}: {alarms:>4}/{n_nights} nights alarmed = {alarms / n_nights:.3f} "
              f"(95% CI {lo:.3f}-{hi:.3f}) {out[key]['families_fired']}")
    return out


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)


if __name__ == "__main__":
    main()
