"""A combination of k scores fitted on in-distribution data only, then conformalised on a disjoint split.

No outlier examples are needed, so the combination cannot over-fit to one kind of
out-of-distribution input; validity comes from the conformal split alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .conformal import GUARANTEES, ConformalCalibrator

__all__ = ["InDistributionConformal", "COMBINE_METHODS", "POOLED"]

#: a `min_class_size` no class reaches: one pooled calibration set, the finest p-value grid
POOLED = 2**62

#: statistics of the k oriented per-score values (see `InDistributionConformal`)
COMBINE_METHODS = ("fisher", "gaussian", "maxz")


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

    `calibrate` conformalises the statistic on in-distribution rows disjoint from `fit`'s
    (pooled by default: the statistic does not depend on the predicted class, and one
    pooled set gives p-values on a grid of 1 / (n + 1), not 1 / (n_k + 1); per class where
    a class has >= `min_class_size` points if given). `guarantee="pac"` always pools and
    uses calibration-conditional p-values at level `delta`. Learned state: oriented
    sorted fit columns `ref_` (n_fit, k), score names `names_` (k,), tail parameters `tail_loc_`, `tail_scale_` (k,),
    `z_mean_` (k,), `z_precision_` (k, k), `calibrator_`.
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
            names: Sequence[str] | None = None) -> InDistributionConformal:
        """Learn the per-score transforms from in-distribution rows (n, k) (finite values);
        `names` (k,) records which scores the columns are (`names_`)."""
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
        self.ref_ = np.sort(x * sign, axis=0)
        upper = self.ref_[len(x) // 2:]
        self.tail_loc_ = np.median(self.ref_, axis=0)
        sd = np.sqrt(np.mean((upper - self.tail_loc_) ** 2, axis=0))
        self.tail_scale_ = np.where(sd > 0, sd, 1.0)
        z = self._z(x)
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
        if self.method == "fisher":
            from scipy.stats import norm

            out = -norm.logsf(z).sum(axis=1)
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
        arrays = {"method": np.array(self.method), "guarantee": np.array(self.guarantee),
                  "delta": np.array(self.delta), "min_class_size": np.array(self.min_class_size),
                  "names": np.array(self.names_, dtype=str), "sign": self.sign_.copy(), "ref": self.ref_.copy(),
                  "tail_loc": self.tail_loc_.copy(), "tail_scale": self.tail_scale_.copy(),
                  "z_mean": self.z_mean_.copy(), "z_precision": self.z_precision_.copy()}
        if hasattr(self, "calibrator_"):
            arrays.update({f"cal_{k}": v for k, v in self.calibrator_.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> InDistributionConformal:
        """Rebuild from `to_arrays()` output (shapes checked)."""
        self = cls(str(arrays["method"]), int(arrays["min_class_size"]),
                   str(arrays["guarantee"]), float(arrays["delta"]))
        for key in ("sign", "ref", "tail_loc", "tail_scale", "z_mean", "z_precision"):
            setattr(self, f"{key}_", np.asarray(arrays[key], dtype=np.float64).copy())
        self.names_ = [str(n) for n in np.asarray(arrays["names"]).reshape(-1)]
        k = len(self.sign_)
        if len(self.names_) != k or self.ref_.ndim != 2 or self.ref_.shape[1] != k or self.z_precision_.shape != (k, k):
            raise ValueError("in-distribution combiner arrays have inconsistent shapes")
        cal = {key[4:]: v for key, v in arrays.items() if key.startswith("cal_")}
        if cal:
            self.calibrator_ = ConformalCalibrator.from_arrays(cal)
        return self

    # ------------------------------------------------------------------ helpers
    def _z(self, x: np.ndarray) -> np.ndarray:
        """(m, k) raw -> (m, k) normal scores of the in-distribution tail probability."""
        from scipy.stats import norm

        o = x * self.sign_
        n = self.ref_.shape[0]
        count = np.empty(o.shape, dtype=np.float64)
        for j in range(o.shape[1]):  # one searchsorted per score column, vectorised over rows
            count[:, j] = n - np.searchsorted(self.ref_[:, j], o[:, j], side="left")
        z_ecdf = norm.isf((1.0 + count) / (n + 2.0))  # < 1 even at count = n: finite z
        # beyond the fit range (count == 0): the Gaussian tail, never below the ECDF's last step
        z_tail = (o - self.tail_loc_) / self.tail_scale_
        return np.where(count == 0, np.maximum(z_tail, z_ecdf), z_ecdf)
