"""Nightly drift over the decision log: `statistics` (the tests, Holm-corrected, and the
report object), `load` (DuckDB reading of the log), `summary` (the sentences a person acts on).
The HTML page is `verifier.reports.drift.render_html`. See docs/drift.md."""
from __future__ import annotations

from verifier.drift.load import default_day, drift_report, load_day, load_most_rejected, load_trend
from verifier.drift.report import DriftReport, TrendPoint
from verifier.drift.statistics import (DaySample, DriftConfig, DriftError, DriftReference,
                                       DriftTest, evaluate, holm)

__all__ = ["DriftReference", "DriftConfig", "DaySample", "DriftTest", "TrendPoint", "DriftReport",
           "DriftError", "evaluate", "holm", "load_day", "load_trend", "load_most_rejected",
           "drift_report", "default_day"]
