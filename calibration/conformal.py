"""Split-conformal p-values of raw scores against held-out in-distribution calibration scores.

Per class where the class has enough calibration points, pooled over all classes
otherwise. Higher p-value = more in-distribution.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["ConformalCalibrator", "conformal_p_values", "pac_p_values", "digest_uniforms",
           "GUARANTEES"]

#: guarantee modes: "marginal" (P(p <= alpha) = alpha over calibration draw and input) and
#: "pac" (with probability >= 1 - delta over the calibration draw, P(p <= alpha | draw) <= alpha)
GUARANTEES = ("marginal", "pac")


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

    def p_values(self, scores: Mapping[str, np.ndarray], classes: np.ndarray,
                 u: np.ndarray | None = None, pac_delta: float | None = None) -> dict[str, np.ndarray]:
        """{name: (m,) float64 p-values in [0, 1]} (0 for NaN scores); classes (m,) int.

        u: (m,) uniforms in [0, 1) for randomised tie-breaking (`conformal_p_values`); None
        counts ties against the input (conservative). pac_delta: calibration-conditional
        p-values (`pac_p_values`) instead; u is then ignored."""
        classes = _check_classes(classes, self.num_classes_)
        m = len(classes)
        # the rows of each calibration block, found once for every score: the pooled block,
        # then each class with enough calibration images of its own
        pooled_rows = self.uses_pooled_[classes]
        groups: list[tuple[int | None, np.ndarray]] = []
        if pooled_rows.any():
            groups.append((None, np.flatnonzero(pooled_rows)))
        for k in np.unique(classes[~pooled_rows]):
            groups.append((int(k), np.flatnonzero((classes == k) & ~pooled_rows)))
        n = np.where(pooled_rows, int(self.class_counts_.sum()), self.class_counts_[classes])
        uu = None if u is None else np.asarray(u, dtype=np.float64)
        out: dict[str, np.ndarray] = {}
        lo, hi = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
        for name, worse_high in self.higher_is_worse.items():
            if name not in scores:
                raise ValueError(f"scores lack {name!r}")
            s = np.asarray(scores[name], dtype=np.float64)
            if s.shape != classes.shape:
                raise ValueError(f"score {name!r} has shape {s.shape}, classes {classes.shape}")
            for k, rows in groups:  # two binary searches per block; the rest once for all rows
                ref = (self.pooled_[name] if k is None
                       else self.sorted_[name][self.offsets_[name][k]:self.offsets_[name][k + 1]])
                v = s[rows]
                lo[rows] = ref.searchsorted(v, side="left")
                hi[rows] = ref.searchsorted(v, side="right")
            strict = n - hi if worse_high else lo.copy()
            out[name] = _p_from_counts(strict, hi - lo, n, s, uu, pac_delta)
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


def conformal_p_values(sorted_ref: np.ndarray, s: np.ndarray, higher_is_worse: bool,
                       u: np.ndarray | None = None) -> np.ndarray:
    """(m,) p-values of scores `s` against one ascending array of n calibration scores.

    Without `u`: (1 + #{ref at least as extreme}) / (n + 1), ties against the input, so
    P(p <= alpha) <= alpha (reaching floor(alpha (n + 1)) / (n + 1), below alpha).
    With `u` (m,) uniforms in [0, 1): (#{ref strictly more extreme} + u (1 + #{ties}))
    / (n + 1), the smoothed p-value of Vovk et al. (2005), exactly uniform for
    exchangeable data, so P(p <= alpha) = alpha. NaN scores -> 0.
    """
    s = np.asarray(s, dtype=np.float64)
    strict, ties = _counts(sorted_ref, s, higher_is_worse)
    return _p_from_counts(strict, ties, len(sorted_ref), s,
                          None if u is None else np.asarray(u, dtype=np.float64), None)


def pac_p_values(sorted_ref: np.ndarray, s: np.ndarray, higher_is_worse: bool,
                 delta: float) -> np.ndarray:
    """(m,) calibration-conditional p-values: with probability >= 1 - delta over the draw
    of the n calibration scores, P(p <= alpha | draw) <= alpha, for each fixed alpha.

    With C = #{ref at least as extreme}, p = Beta(C + 1, n - C).ppf(1 - delta) (p = 1 when
    C = n). Rejecting at p <= alpha means C < j*, j* the largest j whose Beta(j, n + 1 - j)
    upper (1 - delta) quantile is <= alpha; the conditional false-rejection rate of that
    rule is the tail mass beyond the j*-th most extreme calibration score, which is
    Beta(j*, n + 1 - j*) distributed for continuous scores (ties only make it smaller):
    the order-statistic form of Vovk (2012) and Bates et al. (2023, "Testing for outliers
    with conformal p-values", calibration-conditional p-values at a fixed level).
    NaN scores -> 0.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    s = np.asarray(s, dtype=np.float64)
    strict, ties = _counts(sorted_ref, s, higher_is_worse)
    return _p_from_counts(strict, ties, len(sorted_ref), s, None, delta)


def digest_uniforms(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """(m, ...) array -> (m,) float64 uniforms in [0, 1), a hash of each row's bytes.

    The tie-breaking randomisation of a decision: the same input (the same preprocessed
    pixels) always draws the same u, on any machine, in any batch; no global RNG.
    """
    return (hash_rows(rows, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_rows(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """(m, ...) -> (m,) uint64: a keyed BLAKE2b hash of each row's raw bytes (one C call per
    row; the cost grows with the bytes, not with a Python step per word). Batches of more than
    `_PARALLEL_BYTES` are hashed on a few threads (hashlib releases the GIL over large buffers):
    the same values, in about half the time on two cores."""
    a = np.ascontiguousarray(rows)
    m = a.shape[0] if a.ndim else 1
    raw = a.reshape(m, -1).view(np.uint8)
    key = (int(seed) % 2**64).to_bytes(8, "little")

    def one(r: np.ndarray) -> int:
        return int.from_bytes(hashlib.blake2b(r, digest_size=8, key=key).digest(), "little")

    rows_iter = _hash_pool().map(one, raw) if m > 1 and raw.nbytes > _PARALLEL_BYTES else map(one, raw)
    return np.fromiter(rows_iter, dtype=np.uint64, count=m)


_PARALLEL_BYTES = 4 << 20


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    """One small thread pool per process for `hash_rows`, made on first use."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="hash_rows")


def _counts(sorted_ref: np.ndarray, s: np.ndarray, higher_is_worse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(#{ref strictly more extreme than s}, #{ref equal to s}), each (m,) int64."""
    lo = np.searchsorted(sorted_ref, s, side="left")
    hi = np.searchsorted(sorted_ref, s, side="right")
    strict = len(sorted_ref) - hi if higher_is_worse else lo
    return strict.astype(np.int64), (hi - lo).astype(np.int64)


def _p_from_counts(strict: np.ndarray, ties: np.ndarray, n: np.ndarray | int, s: np.ndarray,
                   u: np.ndarray | None, pac_delta: float | None) -> np.ndarray:
    """p-values from #{ref strictly more extreme}, #{ties} and n (each row's block size):
    `conformal_p_values` (u None: ties against the input; else smoothed) or, with
    `pac_delta`, `pac_p_values`. NaN scores -> 0."""
    if pac_delta is not None:
        from scipy.stats import beta

        if not 0.0 < pac_delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {pac_delta}")
        c = (strict + ties).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = beta.ppf(1.0 - pac_delta, c + 1.0, np.maximum(n - c, 1e-300))
        p = np.where(c >= n, 1.0, p)
    elif u is None:
        p = (1.0 + strict + ties) / (n + 1.0)
    else:
        p = (strict + u * (1.0 + ties)) / (n + 1.0)
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
