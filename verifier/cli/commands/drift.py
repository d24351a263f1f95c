"""verifier drift: test one day of logged gate decisions against the bundle's calibration reference.

Exit code 0 no alert, 1 alert, 2 error (missing log, no rows for the day, corrupt Parquet file,
unreadable bundle). Alerts are Holm-controlled at --family-alpha per night; see docs/drift.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from verifier.drift import DriftConfig, DriftError, DriftReference, default_day, drift_report
from verifier.reports.drift import render_html
from verifier.runtime.log import DecisionLog, LogError

EXIT_OK, EXIT_ALERT, EXIT_ERROR = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (its calibration reference)")
    p.add_argument("--log", required=True, help="decision log folder (LOG/date=YYYY-MM-DD/...)")
    p.add_argument("--day", type=_day, default=None,
                   help="day to test, YYYY-MM-DD (default: yesterday, UTC)")
    p.add_argument("--days", type=int, default=14, help="days in the rejection-rate trend (14)")
    p.add_argument("--report", type=Path, help="write the HTML report here")
    p.add_argument("--json", type=Path, help="write the JSON result here")
    p.add_argument("--family-alpha", type=float, default=0.01,
                   help="family-wise false-alarm rate per night, Holm-corrected (0.01)")
    p.add_argument("--min-rate-excess", type=float, default=0.01,
                   help="effect floor for rate tests: absolute excess over the expected rate (0.01)")
    p.add_argument("--min-score-shift", type=float, default=0.10,
                   help="effect floor for score tests: Wasserstein distance in calibration SDs (0.1)")
    p.add_argument("--min-class-shift", type=float, default=0.05,
                   help="effect floor for the class test: total-variation distance (0.05)")
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.family_alpha < 1 or args.days < 1:
        return _error("--family-alpha must be in (0, 1) and --days >= 1")
    try:
        # (one argument without a key: tests stand in for _load_reference with a stub)
        reference = (_load_reference(Path(args.bundle)) if args.verify_key is None
                     else _load_reference(Path(args.bundle), args.verify_key))
    except Exception as e:  # any bundle problem is the user's to fix: say which
        return _error(f"cannot load bundle {args.bundle}: {e}")
    config = DriftConfig(family_alpha=args.family_alpha, trend_days=args.days,
                         min_rate_excess=args.min_rate_excess,
                         min_score_shift=args.min_score_shift,
                         min_class_shift=args.min_class_shift)
    try:
        report = drift_report(DecisionLog(args.log), reference, args.day or default_day(), config)
    except (DriftError, LogError) as e:
        return _error(str(e))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if args.report:
        args.report.write_text(render_html(report), encoding="utf-8")
    status = "ALERT" if report.alert else "no alert"
    print(f"drift {report.day}: {status} ({report.n} decisions, {len(report.tests)} tests, "
          f"family alpha {config.family_alpha:g})")
    for reason in report.reasons:
        print(f"  - {reason}")
    return EXIT_ALERT if report.alert else EXIT_OK


def _load_reference(path: Path, key: str | None = None) -> DriftReference:
    from verifier.bundle.directory import Bundle

    return DriftReference.from_bundle(Bundle.load(path, check_model=False, key=key))


def _day(s: str) -> date:
    try:
        return date.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {s!r}") from None


def _error(msg: str) -> int:
    print(f"verifier drift: error: {msg}", file=sys.stderr)
    return EXIT_ERROR
