"""Merging several p-values per input into one, valid under any dependence between them.

Each merger maps (m, k) p-values to (m,) p-values with P(merged <= alpha) <= alpha
whenever each column is a valid p-value, however the columns depend on each other.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["merge_bonferroni", "merge_twice_mean", "MERGERS"]


def merge_bonferroni(p: np.ndarray) -> np.ndarray:
    """(m, k) -> (m,) float64 min(1, k * min_j p_j): valid under any dependence (union bound).
    NaN p-values count as 0 (fail closed)."""
    p = _as_matrix(p)
    return np.minimum(1.0, p.shape[1] * p.min(axis=1))


def merge_twice_mean(p: np.ndarray) -> np.ndarray:
    """(m, k) -> (m,) float64 min(1, 2 * mean_j p_j): valid under any dependence
    (Vovk & Wang 2020, "Combining p-values via averaging", Biometrika; the factor 2 is
    the smallest that works for every k). NaN p-values count as 0 (fail closed)."""
    p = _as_matrix(p)
    return np.minimum(1.0, 2.0 * p.mean(axis=1))


#: registry of mergers by name, each (m, k) -> (m,)
MERGERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "bonferroni": merge_bonferroni,
    "twice_mean": merge_twice_mean,
}


def _as_matrix(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"p-values must be (m, k) with k >= 1, got {p.shape}")
    return np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)
