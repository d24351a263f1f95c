"""Nightly drift, the statistics: one day's sample tested against the bundle's calibration reference.

Tests (one family per night, Holm-corrected at `family_alpha`, alerts need an effect above a floor):
rejection rate vs alpha (overall, per class), score distributions (KS + Wasserstein), score tails,
uniformity of the combined p-values, and predicted-class frequencies. See docs/drift.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["DriftReference", "DriftConfig", "DaySample", "DriftTest", "DriftError", "evaluate",
           "holm"]


class DriftError(RuntimeError):
    """The drift report cannot be produced as asked (no rows for the day, unreadable log)."""


@dataclass(frozen=True)
class DriftReference:
    """What drift compares a day with: the bundle's calibration data (no model needed).

    calibration_scores: score name -> (n,) float64, the same names as the log's score_ columns
    calibration_classes: (n,) int, predicted class index of each calibration image
    higher_is_worse: score name -> direction (True: a larger score is less in-distribution)
    """

    bundle_id: str
    alpha: float
    classes: tuple[str, ...]
    calibration_scores: dict[str, np.ndarray]
    calibration_classes: np.ndarray
    higher_is_worse: dict[str, bool]

    @classmethod
    def from_bundle(cls, bundle: Any) -> DriftReference:
        """Take the reference fields from a `verifier.bundle.directory.Bundle` (or anything shaped so)."""
        return cls(
            bundle_id=str(bundle.bundle_id), alpha=float(bundle.alpha),
            classes=tuple(str(c) for c in bundle.classes),
            calibration_scores={str(k): np.asarray(v, dtype=np.float64).ravel()
                                for k, v in bundle.calibration_scores.items()},
            calibration_classes=np.asarray(bundle.calibration_classes, dtype=np.int64).ravel(),
            higher_is_worse={str(k): bool(v) for k, v in bundle.higher_is_worse.items()})

    @property
    def n_calibration(self) -> int:
        return int(self.calibration_classes.shape[0])

    def class_counts(self) -> np.ndarray:
        """(K,) int64 calibration images per predicted class, in `classes` order."""
        return np.bincount(self.calibration_classes, minlength=len(self.classes))[:len(self.classes)]


@dataclass(frozen=True)
class DriftConfig:
    """Alerting policy. Floors are effect sizes a significant test must also reach to alert.

    min_rate_excess: absolute excess of a rate over its expectation (rejection rate over alpha,
      tail exceedance over its calibration rate).
    min_score_shift: Wasserstein distance between day and calibration scores, in calibration SDs.
    min_pvalue_shift: one-sided KS distance of the day's combined p-values above Uniform(0,1);
      None = max(0.02, 1/sqrt(calibration images per class)): a bundle's finite calibration set
      bends its p-value distribution by about that much even on clean data.
    min_class_shift: total-variation distance between day and calibration class frequencies.
    min_class_n / min_class_calibration: a per-class rejection test needs this many decisions of
      the class that day / calibration images of it (the gate's per-class threshold, default 50).
    min_history: decisions the previous days of the trend window need for the day-vs-history test.
    """

    family_alpha: float = 0.01
    trend_days: int = 14
    min_rate_excess: float = 0.01
    min_score_shift: float = 0.10
    min_pvalue_shift: float | None = None
    min_class_shift: float = 0.05
    tail_level: float = 0.05
    min_class_n: int = 30
    min_class_calibration: int = 50
    min_history: int = 1000
    min_sample: int = 20
    min_expected: float = 5.0
    top_rejected: int = 20

    def pvalue_floor(self, reference: DriftReference) -> float:
        if self.min_pvalue_shift is not None:
            return self.min_pvalue_shift
        per_class = reference.n_calibration / max(len(reference.classes), 1)
        return max(0.02, 1.0 / math.sqrt(max(per_class, 1.0)))


@dataclass
class DaySample:
    """The figures of one day that the tests need (only rows of the reference's bundle).

    per_class: predicted class -> (decisions, rejections); scores: name -> (n_name,) float64
    non-null values; p_values: (n_p,) float64 non-null combined p-values.
    """

    day: date
    n: int
    rejected: int
    errors: int
    per_class: dict[str, tuple[int, int]]
    scores: dict[str, np.ndarray]
    p_values: np.ndarray


@dataclass(frozen=True)
class DriftTest:
    """One hypothesis test of the night. `p_value` is the test's own p-value (not adjusted);
    `threshold` is the Holm level it is compared with; `alert` needs significance and effect."""

    name: str
    family: str
    method: str
    statistic: float
    statistic_name: str
    p_value: float
    threshold: float
    effect_size: float
    effect_size_name: str
    effect_floor: float
    significant: bool
    alert: bool
    n: int
    detail: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "method": self.method,
                "statistic": _f(self.statistic), "statistic_name": self.statistic_name,
                "p_value": _f(self.p_value), "threshold": _f(self.threshold),
                "effect_size": _f(self.effect_size), "effect_size_name": self.effect_size_name,
                "effect_floor": _f(self.effect_floor), "significant": self.significant,
                "alert": self.alert, "n": self.n,
                "detail": {k: _f(v) for k, v in self.detail.items()}}


# -- the tests ----------------------------------------------------------------------------
def evaluate(sample: DaySample, reference: DriftReference, config: DriftConfig = DriftConfig(),
             history: tuple[int, int] | None = None) -> list[DriftTest]:
    """Run the night's family of tests on `sample` and apply Holm at `config.family_alpha`.

    history: (decisions, rejections) of the previous days of the trend window, same bundle;
    with at least `config.min_history` decisions it adds the day-vs-history rejection test.
    """
    raw: list[dict[str, Any]] = []
    raw += _rejection_tests(sample, reference, config)
    if history is not None and history[0] >= config.min_history:
        raw.append(_vs_history(sample, history, config))
    raw += _score_tests(sample, reference, config)
    raw += _uniformity_test(sample, reference, config)
    raw += _class_test(sample, reference, config)
    thresholds, significant = holm([r["p_value"] for r in raw], config.family_alpha)
    return [DriftTest(**r, threshold=t, significant=s,
                      alert=bool(s and r["effect_size"] >= r["effect_floor"]))
            for r, t, s in zip(raw, thresholds, significant)]


def holm(p_values: list[float], family_alpha: float) -> tuple[list[float], list[bool]]:
    """Holm step-down: each test's level family_alpha/(k - rank) and whether it is rejected.

    Controls the family-wise error rate at family_alpha for any dependence between tests.
    """
    k = len(p_values)
    order = sorted(range(k), key=lambda i: (p_values[i], i))
    thresholds, significant = [0.0] * k, [False] * k
    still = True
    for rank, i in enumerate(order):
        thresholds[i] = family_alpha / (k - rank)
        still = still and p_values[i] <= thresholds[i]
        significant[i] = still
    return thresholds, significant


def _rejection_tests(s: DaySample, ref: DriftReference, cfg: DriftConfig) -> list[dict]:
    out = [_rejections("rejection_rate", s.rejected, s.n, ref.alpha, ref.n_calibration,
                       cfg.min_rate_excess)]
    # The gate promises alpha per class only where it calibrated per class (enough calibration
    # images of that class); elsewhere the promise is marginal and a per-class test would be
    # wrong by design, so it is not run.
    cal_counts = dict(zip(ref.classes, ref.class_counts().tolist()))
    for cls in sorted(s.per_class):
        n_c, x_c = s.per_class[cls]
        m_c = cal_counts.get(cls, 0)
        if n_c >= cfg.min_class_n and m_c >= cfg.min_class_calibration:
            out.append(_rejections(f"rejection_rate[{cls}]", x_c, n_c, ref.alpha, m_c,
                                   cfg.min_rate_excess))
    return out


def _rejections(name: str, x: int, n: int, alpha: float, m: int, floor: float) -> dict:
    # A conformal gate keeps alpha on average over calibration sets; the rate a given bundle
    # realises is itself random, ~Beta(alpha(m+1), (1-alpha)(m+1)) for m calibration images.
    # The count is then Beta-Binomial, which stays valid however many decisions a day has.
    # The plain exact binomial p-value (no calibration noise) is kept in `detail`.
    a, b = alpha * (m + 1), (1 - alpha) * (m + 1)
    p = float(stats.betabinom.sf(int(x) - 1, int(n), a, b)) if n else 1.0
    p_binom = stats.binomtest(int(x), int(n), alpha, alternative="greater").pvalue if n else 1.0
    rate = x / n if n else 0.0
    return dict(name=name, family="rejection_rate",
                method="beta-binomial (binomial + calibration noise), one-sided (rate > alpha)",
                statistic=float(x), statistic_name="rejections", p_value=min(1.0, p),
                effect_size=rate - alpha, effect_size_name="rate_minus_alpha",
                effect_floor=floor, n=int(n),
                detail={"rate": rate, "alpha": alpha, "calibration_size": float(m),
                        "binomial_p_value": float(p_binom)})


def _vs_history(s: DaySample, history: tuple[int, int], cfg: DriftConfig) -> dict:
    # The bundle's own realised rejection rate, learnt from the previous days, is free of the
    # calibration noise that makes the test against alpha weak for small calibration sets.
    nh, xh = int(history[0]), int(history[1])
    table = [[s.rejected, s.n - s.rejected], [xh, nh - xh]]
    p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    rate, base = s.rejected / s.n, xh / nh
    return dict(name="rejection_rate_vs_history", family="rejection_rate",
                method="Fisher exact, one-sided (day rate > previous days' rate)",
                statistic=float(s.rejected), statistic_name="rejections", p_value=p,
                effect_size=rate - base, effect_size_name="rate_minus_history_rate",
                effect_floor=cfg.min_rate_excess, n=s.n,
                detail={"rate": rate, "history_rate": base, "history_decisions": float(nh)})


def _score_tests(s: DaySample, ref: DriftReference, cfg: DriftConfig) -> list[dict]:
    out = []
    for name in sorted(ref.calibration_scores):
        day = s.scores.get(name)
        cal = ref.calibration_scores[name]
        cal = cal[np.isfinite(cal)]
        if day is None or len(day) < cfg.min_sample or len(cal) < cfg.min_sample:
            continue
        ks = stats.ks_2samp(day, cal)
        w = float(stats.wasserstein_distance(day, cal))
        sd = float(np.std(cal))
        shift = w / sd if sd > 0 else (math.inf if w > 0 else 0.0)
        out.append(dict(name=f"score_distribution[{name}]", family="score_distribution",
                        method="two-sample Kolmogorov-Smirnov, two-sided", statistic=float(ks.statistic),
                        statistic_name="ks_distance", p_value=float(ks.pvalue),
                        effect_size=shift, effect_size_name="wasserstein_in_calibration_sd",
                        effect_floor=cfg.min_score_shift, n=len(day),
                        detail={"wasserstein": w, "calibration_sd": sd,
                                "day_median": float(np.median(day)),
                                "calibration_median": float(np.median(cal))}))
        if name in ref.higher_is_worse:
            out.append(_tail_test(name, day, cal, ref.higher_is_worse[name], cfg))
    return out


def _tail_test(name: str, day: np.ndarray, cal: np.ndarray, higher_is_worse: bool,
               cfg: DriftConfig) -> dict:
    # Threshold = the k-th worst calibration score. Under exchangeability the mass beyond it is
    # Beta(k, m+1-k), so the day's count beyond it is Beta-Binomial: exact, and it carries the
    # calibration set's own sampling noise (a plain binomial would not).
    sign = 1.0 if higher_is_worse else -1.0
    worse_cal, worse_day = np.sort(sign * cal), sign * day
    m, n = len(cal), len(day)
    k = max(1, int(round(cfg.tail_level * (m + 1))))
    cut = worse_cal[m - k]
    x = int(np.count_nonzero(worse_day > cut))
    expected = k / (m + 1)
    p = float(stats.betabinom.sf(x - 1, n, k, m + 1 - k))
    return dict(name=f"score_tail[{name}]", family="score_tail",
                method="beta-binomial exceedance of the calibration tail, one-sided",
                statistic=float(x), statistic_name="exceedances", p_value=min(1.0, p),
                effect_size=x / n - expected, effect_size_name="exceedance_rate_minus_expected",
                effect_floor=cfg.min_rate_excess, n=n,
                detail={"threshold_score": float(sign * cut), "expected_rate": expected,
                        "rate": x / n})


def _uniformity_test(s: DaySample, ref: DriftReference, cfg: DriftConfig) -> list[dict]:
    # Conformal p-values are super-uniform (P(p <= t) <= t, on a grid), so only a surplus of
    # small p-values is evidence of drift: test that one side only; the test stays valid.
    p = s.p_values
    if len(p) < cfg.min_sample:
        return []
    ks = stats.ks_1samp(p, stats.uniform.cdf, alternative="greater")
    grid = (np.arange(2000) + 0.5) / 2000
    return [dict(name="p_value_uniformity", family="p_value_uniformity",
                 method="one-sample Kolmogorov-Smirnov vs Uniform(0,1), one-sided (p-values too small)",
                 statistic=float(ks.statistic), statistic_name="ks_distance_above_uniform",
                 p_value=float(ks.pvalue), effect_size=float(ks.statistic),
                 effect_size_name="ks_distance_above_uniform", effect_floor=cfg.pvalue_floor(ref),
                 n=len(p), detail={"wasserstein_to_uniform": float(stats.wasserstein_distance(p, grid)),
                                   "median_p_value": float(np.median(p))})]


def _class_test(s: DaySample, ref: DriftReference, cfg: DriftConfig) -> list[dict]:
    # Two-sample homogeneity (day counts vs calibration counts), not a goodness of fit to
    # fixed frequencies: the calibration frequencies are themselves a finite sample.
    names = list(ref.classes)
    day = np.array([s.per_class.get(c, (0, 0))[0] for c in names]
                   + [sum(v[0] for c, v in s.per_class.items() if c not in ref.classes)], float)
    cal = np.append(ref.class_counts().astype(float), 0.0)
    table = _merge_small(np.vstack([day, cal]), names + ["(other)"], cfg.min_expected)
    if table is None or day.sum() < cfg.min_sample:
        return []
    counts, _ = table
    res = stats.chi2_contingency(counts)
    f_day, f_cal = day / day.sum(), cal / cal.sum()
    tvd = 0.5 * float(np.abs(f_day - f_cal).sum())
    detail = {f"day_share[{c}]": float(v) for c, v in zip(names + ["(other)"], f_day)}
    detail.update({f"calibration_share[{c}]": float(v) for c, v in zip(names, f_cal)})
    return [dict(name="class_frequency", family="class_frequency",
                 method="chi-square homogeneity, day vs calibration counts",
                 statistic=float(res.statistic), statistic_name="chi_square",
                 p_value=float(res.pvalue), effect_size=tvd,
                 effect_size_name="total_variation_distance", effect_floor=cfg.min_class_shift,
                 n=int(day.sum()), detail=detail)]


def _merge_small(t: np.ndarray, names: list[str], min_expected: float
                 ) -> tuple[np.ndarray, list[str]] | None:
    """Pool columns whose expected count is below `min_expected` into one; None if < 2 remain."""
    t = t[:, t.sum(axis=0) > 0]
    while t.shape[1] >= 2:
        expected = np.outer(t.sum(axis=1), t.sum(axis=0)) / t.sum()
        small = np.where((expected < min_expected).any(axis=0))[0]
        if len(small) == 0:
            return t, names
        if len(small) == 1:  # pool the lone small cell with the next-smallest column
            rest = [j for j in np.argsort(t.sum(axis=0)) if j != small[0]]
            small = np.array([small[0], rest[0]])
        pooled = t[:, small].sum(axis=1, keepdims=True)
        t = np.hstack([np.delete(t, small, axis=1), pooled])
    return None


# -- helpers ------------------------------------------------------------------------------
def _f(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None

