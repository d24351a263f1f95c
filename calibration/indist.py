"""A combination of k scores fitted on in-distribution data only, then conformalised on a disjoint split.

No outlier examples are needed, so the combination cannot over-fit to one kind of
out-of-distribution input; validity comes from the conformal split alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .conformal import GUARANTEES, ConformalCalibrator

__all__ = ["InDistributionConformal", "COMBINE_METHODS", "GROUPED_METHODS", "POOLED", "ARRAYS_VERSION"]

#: a `min_class_size` no class reaches: one pooled calibration set, the finest p-value grid
POOLED = 2**62

#: statistics of the k oriented per-score values (see `InDistributionConformal`)
COMBINE_METHODS = ("fisher", "gaussian", "maxz", "fisher_groups", "stouffer_groups")

#: methods that combine within groups of scores first (`fit`'s `groups`)
GROUPED_METHODS = ("fisher_groups", "stouffer_groups")

#: layout of `to_arrays`: 2 added `groups` and the group tails (`fisher_groups`), 3 the method
#: `stouffer_groups` (same arrays; software reading up to 2 refuses it by its layout); arrays
#: without a `version` are layout 1 and load as one group
ARRAYS_VERSION = 3


class InDistributionConformal:
    """Combine k scores into one statistic learned from in-distribution rows only.

    Each score is first oriented (higher = worse) and turned into an in-distribution
    tail probability q_j = (1 + #{fit rows at least as extreme}) / (n_fit + 2) against
    the fit split (per-score ECDF, so scores on any scale combine), and beyond the fit
    split's range continued by a Gaussian tail fitted to its upper half (so far outliers
    stay ordered instead of tying at 1 / (n_fit + 1)). Statistics (higher = worse):

    - "fisher": sum_j -log q_j (Fisher 1932); dependence only costs power, since the
      result is conformalised, never compared with a chi-square law.
    - "gaussian": Mahalanobis distance of the normal scores z_j = Phi^-1(1 - q_j),
      clipped below at 0 (being unusually typical is no evidence), with the OAS-shrunk
      covariance of the fit split's z (the Gaussian-copula model of the score vector).
    - "maxz": max_j z_j (a Tippett-type rule).
    - "fisher_groups": Fisher within each group of scores (`fit`'s `groups`), each group's
      sum mapped to its own fit-split tail probability Q_g (the same ECDF + Gaussian tail),
      then Fisher over the groups, sum_g -log Q_g: a group of a few scores weighs as much as
      a group of many. With one group it is "fisher".
    - "stouffer_groups": the same, but within each group the normal scores are summed
      (Stouffer), sum_{j in g} z_j, which pools evidence spread thinly over many correlated
      scores; with one group it is that sum.

    `calibrate` conformalises the statistic on in-distribution rows disjoint from `fit`'s
    (pooled by default: the statistic does not depend on the predicted class, and one
    pooled set gives p-values on a grid of 1 / (n + 1), not 1 / (n_k + 1); per class where
    a class has >= `min_class_size` points if given). `guarantee="pac"` always pools and
    uses calibration-conditional p-values at level `delta`. Learned state: oriented
    sorted fit columns `ref_` (n_fit, k), score names `names_` (k,), tail parameters `tail_loc_`, `tail_scale_` (k,),
    `z_mean_` (k,), `z_precision_` (k, k), group labels `groups_` (k,) and, for the grouped methods,
    the sorted fit-split group sums `group_ref_` (n_fit, G) and their tails `group_loc_`,
    `group_scale_` (G,), `calibrator_`.
    """

    def __init__(self, method: str = "fisher", min_class_size: int = POOLED,
                 guarantee: str = "marginal", delta: float = 0.1) -> None:
        if method not in COMBINE_METHODS:
            raise ValueError(f"method must be one of {COMBINE_METHODS}, got {method!r}")
        if guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.method, self.guarantee, self.delta = method, guarantee, float(delta)
        self.min_class_size = int(min_class_size)

    # ------------------------------------------------------------------ fitting
    def fit(self, features_id: np.ndarray, higher_is_worse: Sequence[bool],
            names: Sequence[str] | None = None,
            groups: Sequence[int] | None = None) -> InDistributionConformal:
        """Learn the per-score transforms from in-distribution rows (n, k) (finite values);
        `names` (k,) records which scores the columns are (`names_`); `groups` (k,) ints put
        the columns in groups for the grouped methods (default: one group)."""
        x = np.asarray(features_id, dtype=np.float64)
        sign = np.where(np.asarray(higher_is_worse, dtype=bool), 1.0, -1.0)
        if x.ndim != 2 or x.shape[1] != len(sign) or len(x) < 10:
            raise ValueError(f"need (n >= 10, k={len(sign)}) in-distribution rows, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("in-distribution fit rows hold NaN or inf")
        self.sign_ = sign
        self.names_ = [str(n) for n in (names if names is not None else range(len(sign)))]
        if len(self.names_) != len(sign):
            raise ValueError("names and higher_is_worse differ in length")
        self.groups_ = np.zeros(len(sign), dtype=np.int64) if groups is None else \
            np.asarray(groups, dtype=np.int64).reshape(-1)
        if len(self.groups_) != len(sign) or (self.groups_ < 0).any():
            raise ValueError(f"groups must be {len(sign)} non-negative ints, got {groups!r}")
        self.ref_, self.tail_loc_, self.tail_scale_ = _tails(x * sign)
        z = self._z(x)
        self.group_ref_, self.group_loc_, self.group_scale_ = _tails(self._group_sums(z))
        self.z_mean_ = np.zeros(x.shape[1])
        self.z_precision_ = np.eye(x.shape[1])
        if self.method == "gaussian":
            from sklearn.covariance import OAS

            self.z_mean_ = z.mean(axis=0)
            self.z_precision_ = OAS().fit(z).precision_
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """(m, k) -> (m,) float64 combined statistic (higher = worse; a row with NaN -> NaN)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.ref_.shape[1]:
            raise ValueError(f"features must be (m, {self.ref_.shape[1]}), got {x.shape}")
        bad = np.isnan(x).any(axis=1)
        z = self._z(np.nan_to_num(x))
        if self.method == "fisher" or (self.method == "fisher_groups" and self.group_ref_.shape[1] < 2):
            from scipy.stats import norm

            out = -norm.logsf(z).sum(axis=1)
        elif self.method == "stouffer_groups" and self.group_ref_.shape[1] < 2:
            out = z.sum(axis=1)
        elif self.method in GROUPED_METHODS:
            from scipy.stats import norm

            zg = _normal_scores(self._group_sums(z), self.group_ref_, self.group_loc_, self.group_scale_)
            out = -norm.logsf(zg).sum(axis=1)
        elif self.method == "maxz":
            out = z.max(axis=1)
        else:
            d = np.maximum(z, 0.0) - np.maximum(self.z_mean_, 0.0)
            out = np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", d, self.z_precision_, d), 0.0))
        return np.where(bad, np.nan, out)  # NaN: p = 0, a broken measurement is rejected

    def calibrate(self, features_cal: np.ndarray, classes: np.ndarray,
                  num_classes: int) -> InDistributionConformal:
        """Conformalise the statistic on in-distribution rows (n, k) disjoint from `fit`'s."""
        size = self.min_class_size if self.guarantee == "marginal" else np.iinfo(np.int64).max
        self.calibrator_ = ConformalCalibrator({"combined": True}, int(size))
        self.calibrator_.fit({"combined": self.score(features_cal)}, classes, num_classes)
        return self

    def p_values(self, features: np.ndarray, classes: np.ndarray,
                 u: np.ndarray | None = None) -> np.ndarray:
        """(m, k) features, (m,) int classes -> (m,) p-values; `u` (m,) uniforms break
        ties (marginal mode: exact rate alpha), ignored in pac mode."""
        stat = {"combined": self.score(features)}
        delta = self.delta if self.guarantee == "pac" else None
        return self.calibrator_.p_values(stat, classes, u=u, pac_delta=delta)["combined"]

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no object dtype, no pickle); `from_arrays` round-trips exactly."""
        arrays = {"version": np.array(ARRAYS_VERSION), "groups": self.groups_.copy(),
                  "group_ref": self.group_ref_.copy(), "group_loc": self.group_loc_.copy(),
                  "group_scale": self.group_scale_.copy(),
                  "method": np.array(self.method), "guarantee": np.array(self.guarantee),
                  "delta": np.array(self.delta), "min_class_size": np.array(self.min_class_size),
                  "names": np.array(self.names_, dtype=str), "sign": self.sign_.copy(), "ref": self.ref_.copy(),
                  "tail_loc": self.tail_loc_.copy(), "tail_scale": self.tail_scale_.copy(),
                  "z_mean": self.z_mean_.copy(), "z_precision": self.z_precision_.copy()}
        if hasattr(self, "calibrator_"):
            arrays.update({f"cal_{k}": v for k, v in self.calibrator_.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> InDistributionConformal:
        """Rebuild from `to_arrays()` output (shapes checked); layout 1 (no `version`: bundles
        before "fisher_groups") loads as one group and scores as before."""
        version = int(arrays["version"]) if "version" in arrays else 1
        if version > ARRAYS_VERSION:
            raise ValueError(f"in-distribution combiner arrays in layout {version}; this software "
                             f"reads up to {ARRAYS_VERSION}")
        self = cls(str(arrays["method"]), int(arrays["min_class_size"]),
                   str(arrays["guarantee"]), float(arrays["delta"]))
        for key in ("sign", "ref", "tail_loc", "tail_scale", "z_mean", "z_precision"):
            setattr(self, f"{key}_", np.asarray(arrays[key], dtype=np.float64).copy())
        self.names_ = [str(n) for n in np.asarray(arrays["names"]).reshape(-1)]
        k = len(self.sign_)
        if version >= 2:
            self.groups_ = np.asarray(arrays["groups"], dtype=np.int64).reshape(-1).copy()
            for key in ("group_ref", "group_loc", "group_scale"):
                setattr(self, f"{key}_", np.asarray(arrays[key], dtype=np.float64).copy())
        else:  # one group: its tails are never used ("fisher_groups" did not exist)
            self.groups_ = np.zeros(k, dtype=np.int64)
            self.group_ref_, self.group_loc_, self.group_scale_ = np.zeros((1, 1)), np.zeros(1), np.ones(1)
        if len(self.groups_) != k or self.group_ref_.ndim != 2 or \
                self.group_ref_.shape[1] != len(np.unique(self.groups_)):
            raise ValueError("in-distribution combiner group arrays have inconsistent shapes")
        if len(self.names_) != k or self.ref_.ndim != 2 or self.ref_.shape[1] != k or self.z_precision_.shape != (k, k):
            raise ValueError("in-distribution combiner arrays have inconsistent shapes")
        cal = {key[4:]: v for key, v in arrays.items() if key.startswith("cal_")}
        if cal:
            self.calibrator_ = ConformalCalibrator.from_arrays(cal)
        return self

    # ------------------------------------------------------------------ helpers
    def _z(self, x: np.ndarray) -> np.ndarray:
        """(m, k) raw -> (m, k) normal scores of the in-distribution tail probability."""
        return _normal_scores(x * self.sign_, self.ref_, self.tail_loc_, self.tail_scale_)

    def _group_sums(self, z: np.ndarray) -> np.ndarray:
        """(m, k) normal scores -> (m, G) group statistics in label order: Stouffer sums
        sum_{j in g} z_j for "stouffer_groups", else Fisher sums sum_{j in g} -log q_j."""
        from scipy.stats import norm

        terms = z if self.method == "stouffer_groups" else -norm.logsf(z)
        return np.column_stack([terms[:, self.groups_ == g].sum(axis=1) for g in np.unique(self.groups_)])


def _tails(oriented: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, k) oriented fit values -> (sorted columns, median, RMS deviation of the upper half
    from the median (1 where 0)): the ECDF and its Gaussian tail continuation."""
    ref = np.sort(oriented, axis=0)
    loc = np.median(ref, axis=0)
    sd = np.sqrt(np.mean((ref[len(ref) // 2:] - loc) ** 2, axis=0))
    return ref, loc, np.where(sd > 0, sd, 1.0)


def _normal_scores(o: np.ndarray, ref: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(m, k) oriented values -> (m, k) z = Phi^-1(1 - q), q = (1 + #{ref >= o}) / (n + 2);
    beyond the fit range the Gaussian tail (o - loc) / scale, never below the ECDF's last step."""
    from scipy.stats import norm

    n = ref.shape[0]
    count = np.empty(o.shape, dtype=np.float64)
    for j in range(o.shape[1]):  # one searchsorted per score column, vectorised over rows
        count[:, j] = n - np.searchsorted(ref[:, j], o[:, j], side="left")
    z_ecdf = norm.isf((1.0 + count) / (n + 2.0))  # < 1 even at count = n: finite z
    z_tail = (o - loc) / scale
    return np.where(count == 0, np.maximum(z_tail, z_ecdf), z_ecdf)
