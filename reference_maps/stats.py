"""Streaming, mergeable per-class moments (count, mean, centred second moments) and OAS shrinkage.

Batches are folded in with the pairwise update of Chan, Golub & LeVeque (1979), so
the result matches a one-shot two-pass computation to rounding (~1e-12 relative).
"""
from __future__ import annotations

import numpy as np

__all__ = ["GroupedMoments", "oas_shrink"]


class GroupedMoments:
    """Per-group count, mean and centred second moments of D-dimensional rows, in float64.

    State (constant memory in the number of rows):
      count_ (K,) int64; mean_ (K, D) float64 (0 for empty groups);
      m2_ (K, D) sums of squared deviations, or (K, D, D) sums of centred outer
      products when `full=True`.
    """

    def __init__(self, num_groups: int, dim: int, full: bool = False) -> None:
        self.num_groups = int(num_groups)
        self.dim = int(dim)
        self.full = bool(full)
        self.count_ = np.zeros(self.num_groups, dtype=np.int64)
        self.mean_ = np.zeros((self.num_groups, self.dim), dtype=np.float64)
        shape = (self.num_groups, self.dim, self.dim) if full else (self.num_groups, self.dim)
        self.m2_ = np.zeros(shape, dtype=np.float64)

    def update(self, groups: np.ndarray, x: np.ndarray) -> GroupedMoments:
        """Fold in rows `x` (N, D) with group indices `groups` (N,) int in [0, K)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(groups), self.dim)
        groups = np.asarray(groups, dtype=np.int64)
        n_b = np.bincount(groups, minlength=self.num_groups).astype(np.int64)
        onehot = np.zeros((len(groups), self.num_groups), dtype=np.float64)
        onehot[np.arange(len(groups)), groups] = 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.where(n_b[:, None] > 0, (onehot.T @ x) / n_b[:, None], 0.0)
        xc = x - mean_b[groups]  # centred on the batch's own group mean: no cancellation
        if self.full:  # one (C, N_k) @ (N_k, C) product per class present: BLAS, no per-row loop
            m2_b = np.zeros((self.num_groups, self.dim, self.dim))
            for k in np.flatnonzero(n_b):
                rows = xc[groups == k]
                m2_b[k] = rows.T @ rows
        else:
            m2_b = onehot.T @ (xc * xc)
        return self._combine(n_b, mean_b, m2_b)

    def merge(self, other: GroupedMoments) -> GroupedMoments:
        """Fold in another accumulator's state (exact, order-independent up to rounding)."""
        if (other.num_groups, other.dim, other.full) != (self.num_groups, self.dim, self.full):
            raise ValueError(f"cannot merge moments of shape (K={other.num_groups}, D={other.dim}, "
                             f"full={other.full}) into (K={self.num_groups}, D={self.dim}, "
                             f"full={self.full})")
        return self._combine(other.count_, other.mean_, other.m2_)

    def variance(self) -> np.ndarray:
        """(K, D) population variance (ddof=0); NaN for empty groups."""
        diag = np.diagonal(self.m2_, axis1=1, axis2=2) if self.full else self.m2_
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count_[:, None] > 0, diag / self.count_[:, None], np.nan)

    def covariance(self, ddof: int = 0) -> np.ndarray:
        """(K, D, D) covariance with `ddof` (needs `full=True`); NaN where count <= ddof."""
        if not self.full:
            raise ValueError("covariance needs full=True moments")
        denom = (self.count_ - ddof).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom[:, None, None] > 0, self.m2_ / denom[:, None, None], np.nan)

    def _combine(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> GroupedMoments:
        n_a = self.count_
        n = n_a + n_b
        safe = np.where(n > 0, n, 1).astype(np.float64)
        delta = mean_b - self.mean_
        w = (n_a * n_b) / safe  # Chan et al.: M2 = M2_a + M2_b + delta delta^T n_a n_b / n
        self.mean_ = self.mean_ + delta * (n_b / safe)[:, None]
        if self.full:
            self.m2_ = self.m2_ + m2_b + w[:, None, None] * np.einsum("kc,kd->kcd", delta, delta)
        else:
            self.m2_ = self.m2_ + m2_b + w[:, None] * delta * delta
        self.count_ = n
        return self


def oas_shrink(emp_cov: np.ndarray, n_samples: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Oracle Approximating Shrinkage of (K, D, D) maximum-likelihood (ddof=0) covariances.

    Returns the shrunk (K, D, D) covariances and the (K,) shrinkage weights; identical
    to `sklearn.covariance.OAS(assume_centered=False)` fitted on the same rows
    (Chen, Wiesel, Eldar & Hero 2010, in scikit-learn's formulation).
    """
    emp_cov = np.asarray(emp_cov, dtype=np.float64)
    k, d, _ = emp_cov.shape
    n = np.broadcast_to(np.asarray(n_samples, dtype=np.float64), (k,))
    if d == 1:  # one feature: shrinkage changes nothing
        return emp_cov.copy(), np.zeros(k)
    alpha = np.mean(emp_cov ** 2, axis=(1, 2))
    mu = np.trace(emp_cov, axis1=1, axis2=2) / d
    num = alpha + mu ** 2
    den = (n + 1.0) * (alpha - mu ** 2 / d)
    with np.errstate(invalid="ignore", divide="ignore"):
        shrinkage = np.where(den == 0, 1.0, np.minimum(num / np.where(den == 0, 1.0, den), 1.0))
    shrunk = (1.0 - shrinkage)[:, None, None] * emp_cov
    shrunk[:, np.arange(d), np.arange(d)] += (shrinkage * mu)[:, None]
    return shrunk, shrinkage
