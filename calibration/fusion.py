"""A learned fusion of several scores into one, then conformalised on a disjoint split.

The fusion may be fitted any way at all; validity comes from calibrating the single
fused score on in-distribution data the fusion never saw.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression

from .conformal import ConformalCalibrator

__all__ = ["FusedConformal", "TRANSFORMS"]

#: feature transforms applied before standardising: "identity" for raw scores,
#: "neglog" (-log p, p clipped to [1e-300, 1]) for p-value features
TRANSFORMS = ("identity", "neglog")


class FusedConformal:
    """Logistic-regression fusion of k scores, conformalised per class (pooled fallback).

    fit: in-distribution rows (label 0) vs negative/garbage rows (label 1), balanced
    class weights, on standardised transformed features. The fused score is the
    log-odds of "negative": higher is worse. calibrate: conformal calibration of that
    score on a disjoint in-distribution split. p_values: (m,) in (0, 1], higher = more
    in-distribution; a NaN feature gives p = 0. Learned state: mean_, scale_ (k,),
    coef_ (k,), intercept_ (float), calibrator_.
    """

    def __init__(self, transform: str = "identity", C: float = 1.0,
                 min_class_size: int = 50) -> None:
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        self.transform = transform
        self.C = float(C)
        self.min_class_size = int(min_class_size)

    def fit(self, features_id: np.ndarray, features_neg: np.ndarray) -> FusedConformal:
        """Fit the fusion: features_id (n1, k) in-distribution, features_neg (n2, k) negatives."""
        a, b = self._transform(features_id), self._transform(features_neg)
        if a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
            raise ValueError(f"need non-empty (n, k) arrays with equal k, got {a.shape}, {b.shape}")
        x = np.concatenate([a, b])
        if not np.isfinite(x).all():
            raise ValueError("fusion training features hold NaN or inf")
        self.mean_ = x.mean(axis=0)
        sd = x.std(axis=0)
        self.scale_ = np.where(sd > 0, sd, 1.0)
        y = np.concatenate([np.zeros(len(a), dtype=np.int64), np.ones(len(b), dtype=np.int64)])
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000)
        model.fit((x - self.mean_) / self.scale_, y)
        self.coef_ = model.coef_.reshape(-1).astype(np.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """(m, k) -> (m,) float64 fused score (log-odds of negative; higher = worse)."""
        x = self._transform(features)
        if x.shape[1] != len(self.coef_):
            raise ValueError(f"features must have k={len(self.coef_)} columns, got {x.shape}")
        return ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def calibrate(self, features_cal: np.ndarray, classes: np.ndarray,
                  num_classes: int) -> FusedConformal:
        """Conformalise the fused score on in-distribution rows (n, k) disjoint from `fit`'s."""
        self.calibrator_ = ConformalCalibrator({"fused": True}, self.min_class_size)
        self.calibrator_.fit({"fused": self.score(features_cal)}, classes, num_classes)
        return self

    def p_values(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(m, k) features, (m,) int classes -> (m,) float64 conformal p-values."""
        return self.calibrator_.p_values({"fused": self.score(features)}, classes)["fused"]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no object dtype, no pickle); `from_arrays` round-trips exactly."""
        arrays = {"transform": np.array(self.transform), "C": np.array(self.C),
                  "mean": self.mean_.copy(), "scale": self.scale_.copy(),
                  "coef": self.coef_.copy(), "intercept": np.array(self.intercept_)}
        if hasattr(self, "calibrator_"):
            arrays.update({f"cal_{k}": v for k, v in self.calibrator_.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FusedConformal:
        """Rebuild from `to_arrays()` output."""
        cal = {k[4:]: v for k, v in arrays.items() if k.startswith("cal_")}
        self = cls(str(arrays["transform"]), float(arrays["C"]),
                   int(cal["min_class_size"]) if cal else 50)
        self.mean_ = np.asarray(arrays["mean"], dtype=np.float64).copy()
        self.scale_ = np.asarray(arrays["scale"], dtype=np.float64).copy()
        self.coef_ = np.asarray(arrays["coef"], dtype=np.float64).copy()
        self.intercept_ = float(arrays["intercept"])
        if not self.mean_.shape == self.scale_.shape == self.coef_.shape or self.coef_.ndim != 1:
            raise ValueError("mean, scale and coef must all be (k,)")
        if cal:
            self.calibrator_ = ConformalCalibrator.from_arrays(cal)
        return self

    def _transform(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (n, k), got {x.shape}")
        if self.transform == "neglog":
            x = -np.log(np.clip(x, 1e-300, 1.0))  # NaN stays NaN
        return x
