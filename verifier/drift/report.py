"""The night's drift report object: the tests' outcome, the rejection-rate trend (p-chart
points), the most rejected inputs, and the sentences a person acts on."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from verifier.drift.statistics import DaySample, DriftConfig, DriftReference, DriftTest
from verifier.drift.summary import summarize

__all__ = ["TrendPoint", "DriftReport"]


@dataclass(frozen=True)
class TrendPoint:
    """One day of the p-chart: rejection rate with 3-sigma binomial limits around alpha."""

    day: date
    n: int
    rejected: int
    rate: float
    lower: float
    upper: float

    @property
    def out_of_control(self) -> bool:
        return self.rate > self.upper

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day.isoformat(), "n": self.n, "rejected": self.rejected,
                "rate": self.rate, "lower_limit": self.lower, "upper_limit": self.upper,
                "out_of_control": self.out_of_control}


@dataclass
class DriftReport:
    """The night's result; `sample` and `reference` are kept for the HTML figures only."""

    day: date
    n: int
    bundle_id: str
    alpha: float
    config: DriftConfig
    tests: list[DriftTest]
    trend: list[TrendPoint]
    most_rejected: list[dict[str, Any]]
    notes: list[str]
    sample: DaySample
    reference: DriftReference

    @property
    def alert(self) -> bool:
        return any(t.alert for t in self.tests)

    @property
    def reasons(self) -> list[str]:
        return [_reason(t, self.alpha) for t in self.tests if t.alert]

    @property
    def summary(self) -> list[str]:
        """A few sentences a person acts on: what moved, how much, which classes, since when."""
        return summarize(self)

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert, "day": self.day.isoformat(), "n": self.n,
                "rejected": self.sample.rejected, "errors": self.sample.errors,
                "bundle_id": self.bundle_id, "alpha": self.alpha,
                "family_alpha": self.config.family_alpha, "correction": "holm",
                "summary": self.summary,
                "tests": [t.to_dict() for t in self.tests], "reasons": self.reasons,
                "trend": [p.to_dict() for p in self.trend],
                "most_rejected": self.most_rejected, "notes": self.notes}


def _reason(t: DriftTest, alpha: float) -> str:
    d = t.detail
    if t.name == "rejection_rate_vs_history":
        what = (f"{t.name}: {d['rate']:.1%} rejected vs {d['history_rate']:.1%} over the "
                f"previous {int(d['history_decisions'])} decisions")
    elif t.family == "rejection_rate":
        what = f"{t.name}: {d['rate']:.1%} rejected ({int(t.statistic)}/{t.n}) vs alpha {alpha:.1%}"
    elif t.family == "score_distribution":
        what = (f"{t.name}: distribution shifted by {t.effect_size:.2f} calibration SD "
                f"(KS {t.statistic:.3f}, median {d['day_median']:.4g} vs {d['calibration_median']:.4g})")
    elif t.family == "score_tail":
        what = (f"{t.name}: {d['rate']:.1%} of scores beyond the calibration's "
                f"{d['expected_rate']:.1%} tail")
    elif t.family == "p_value_uniformity":
        what = f"{t.name}: p-values too small (KS distance {t.statistic:.3f} above uniform)"
    else:
        what = f"{t.name}: class mix shifted (total variation {t.effect_size:.3f})"
    return f"{what}; p={t.p_value:.2e} <= Holm level {t.threshold:.2e}"
