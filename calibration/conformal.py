"""Split-conformal p-values of raw scores against held-out in-distribution calibration scores.

Per class where the class has enough calibration points, pooled over all classes
otherwise. Higher p-value = more in-distribution.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["ConformalCalibrator", "conformal_p_values"]


class ConformalCalibrator:
    """Per-score conformal p-values, class-conditional where a class has >= `min_class_size`
    calibration points and pooled otherwise.

    For a test score s against n calibration scores of its group,
    p = (1 + #{calibration scores at least as extreme as s}) / (n + 1), where "at least
    as extreme" is >= s when `higher_is_worse[name]` and <= s otherwise. Ties count
    against the test point, so P(p <= alpha) <= alpha for exchangeable in-distribution
    data (conservative with ties). A NaN test score gets p = 0: maximally suspicious,
    so a broken measurement is rejected, never waved through. Calibration scores must not
    be NaN (±inf are fine). `classes` must be assigned the same way at calibration and at
    test time (the gate uses the predicted class).
    """

    def __init__(self, higher_is_worse: Mapping[str, bool], min_class_size: int = 50) -> None:
        self.higher_is_worse = {str(k): bool(v) for k, v in higher_is_worse.items()}
        self.min_class_size = int(min_class_size)

    def fit(self, scores: Mapping[str, np.ndarray], classes: np.ndarray,
            num_classes: int) -> ConformalCalibrator:
        """Store the sorted calibration scores: scores {name: (n,)}, classes (n,) int."""
        classes = _check_classes(classes, num_classes)
        if classes.size == 0:
            raise ValueError("no calibration points: every p-value would be 1")
        self.num_classes_ = int(num_classes)
        self.sorted_: dict[str, np.ndarray] = {}   # per score: (n,) sorted within class blocks
        self.offsets_: dict[str, np.ndarray] = {}  # per score: (K + 1,) block boundaries
        self.pooled_: dict[str, np.ndarray] = {}   # per score: (n,) all sorted
        order = np.argsort(classes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(classes, minlength=num_classes))])
        for name in self.higher_is_worse:
            if name not in scores:
                raise ValueError(f"calibration scores lack {name!r}")
            s = np.asarray(scores[name], dtype=np.float64)
            if s.shape != classes.shape:
                raise ValueError(f"score {name!r} has shape {s.shape}, classes {classes.shape}")
            if np.isnan(s).any():
                raise ValueError(f"calibration score {name!r} holds {int(np.isnan(s).sum())} NaN; "
                                 f"calibrate on in-distribution images that probe cleanly")
            blocks = s[order]
            for k in range(num_classes):
                blocks[bounds[k]:bounds[k + 1]].sort()
            self.sorted_[name], self.offsets_[name] = blocks, bounds.astype(np.int64)
            self.pooled_[name] = np.sort(s)
        self.class_counts_ = np.diff(bounds).astype(np.int64)
        return self

    @property
    def uses_pooled_(self) -> np.ndarray:
        """(K,) bool: which classes fall back to the pooled calibration scores."""
        return self.class_counts_ < self.min_class_size

    def p_values(self, scores: Mapping[str, np.ndarray],
                 classes: np.ndarray) -> dict[str, np.ndarray]:
        """{name: (m,) float64 p-values in (0, 1]} (0 for NaN scores); classes (m,) int."""
        classes = _check_classes(classes, self.num_classes_)
        out: dict[str, np.ndarray] = {}
        for name, worse_high in self.higher_is_worse.items():
            if name not in scores:
                raise ValueError(f"scores lack {name!r}")
            s = np.asarray(scores[name], dtype=np.float64)
            if s.shape != classes.shape:
                raise ValueError(f"score {name!r} has shape {s.shape}, classes {classes.shape}")
            p = np.empty(len(s), dtype=np.float64)
            pooled_rows = self.uses_pooled_[classes]
            p[pooled_rows] = conformal_p_values(self.pooled_[name], s[pooled_rows], worse_high)
            for k in np.unique(classes[~pooled_rows]):
                rows = classes == k
                ref = self.sorted_[name][self.offsets_[name][k]:self.offsets_[name][k + 1]]
                p[rows] = conformal_p_values(ref, s[rows], worse_high)
            out[name] = p
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no object dtype) that `from_arrays` turns back into this calibrator."""
        names = list(self.higher_is_worse)
        arrays = {"score_names": np.array(names, dtype=str),
                  "higher_is_worse": np.array([self.higher_is_worse[n] for n in names], dtype=bool),
                  "min_class_size": np.array(self.min_class_size, dtype=np.int64),
                  "num_classes": np.array(self.num_classes_, dtype=np.int64),
                  "class_counts": self.class_counts_.copy()}
        for i, n in enumerate(names):
            arrays[f"sorted_{i}"] = self.sorted_[n].copy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ConformalCalibrator:
        """Rebuild from `to_arrays()` output; exact round trip."""
        names = [str(n) for n in np.asarray(arrays["score_names"]).reshape(-1)]
        flags = np.asarray(arrays["higher_is_worse"], dtype=bool).reshape(-1)
        if len(flags) != len(names):
            raise ValueError("score_names and higher_is_worse differ in length")
        self = cls(dict(zip(names, flags.tolist())), int(arrays["min_class_size"]))
        self.num_classes_ = int(arrays["num_classes"])
        self.class_counts_ = np.asarray(arrays["class_counts"], dtype=np.int64).copy()
        if self.class_counts_.shape != (self.num_classes_,) or (self.class_counts_ < 0).any():
            raise ValueError("class_counts must be (num_classes,) non-negative")
        bounds = np.concatenate([[0], np.cumsum(self.class_counts_)]).astype(np.int64)
        self.sorted_, self.offsets_, self.pooled_ = {}, {}, {}
        for i, n in enumerate(names):
            blocks = np.asarray(arrays[f"sorted_{i}"], dtype=np.float64).copy()
            if blocks.shape != (int(bounds[-1]),):
                raise ValueError(f"sorted_{i} has shape {blocks.shape}, expected ({bounds[-1]},)")
            self.sorted_[n], self.offsets_[n] = blocks, bounds.copy()
            self.pooled_[n] = np.sort(blocks)
        return self


def conformal_p_values(sorted_ref: np.ndarray, s: np.ndarray, higher_is_worse: bool) -> np.ndarray:
    """(m,) p-values of scores `s` against one ascending array of n calibration scores:
    (1 + #{ref at least as extreme}) / (n + 1); NaN scores -> 0."""
    n = len(sorted_ref)
    if higher_is_worse:
        count = n - np.searchsorted(sorted_ref, s, side="left")   # ref >= s
    else:
        count = np.searchsorted(sorted_ref, s, side="right")      # ref <= s
    p = (1.0 + count) / (n + 1.0)
    return np.where(np.isnan(s), 0.0, p)


def _check_classes(classes: np.ndarray, num_classes: int) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.ndim != 1 or not (np.issubdtype(classes.dtype, np.integer) or classes.size == 0):
        raise ValueError(f"classes must be a 1-D integer array, got {classes.dtype} {classes.shape}")
    classes = classes.astype(np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes}), got "
                         f"[{classes.min()}, {classes.max()}]")
    return classes
