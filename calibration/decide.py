"""The accept/reject rule at a target false-rejection rate alpha.

Reject iff p <= alpha; with valid p-values the in-distribution rejection rate is <= alpha.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["decide", "false_rejection_sd"]


def decide(p_value: np.ndarray, alpha: float) -> np.ndarray:
    """(m,) p-values -> (m,) bool, True = accept, accept iff p_value > alpha.

    Tie convention: p == alpha is rejected. That is what validity allows: a valid
    p-value has P(p <= alpha) <= alpha, so rejecting on p <= alpha keeps the false
    rejection rate <= alpha (a conformal p-value with n calibration points reaches it
    at most floor(alpha (n + 1)) / (n + 1)). NaN p-values are rejected (fail closed).
    """
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p = np.asarray(p_value, dtype=np.float64)
    return p > alpha  # NaN > alpha is False: rejected


def false_rejection_sd(alpha: float, n_test: int, calibration_sizes: Sequence[int]) -> float:
    """Standard deviation of the false-rejection rate seen on `n_test` in-distribution
    inputs with ONE calibration draw, around its expectation (<= alpha).

    Two sources add up: the test sample (binomial, alpha (1 - alpha) / n_test) and the
    calibration draw itself: a conformal threshold set on n points leaves a conditional
    rejection rate of variance about alpha (1 - alpha) / (n + 2) (a Beta law). With
    per-class calibration (`calibration_sizes` = points per class, test inputs spread
    evenly over the classes) the class terms average: mean_k(1 / (n_k + 2)) / K.
    Pass `[n]` for pooled calibration.
    """
    sizes = np.asarray(calibration_sizes, dtype=np.float64)
    if sizes.size == 0 or n_test < 1:
        raise ValueError("need at least one calibration size and one test input")
    var = alpha * (1 - alpha) * (1.0 / n_test + np.mean(1.0 / (sizes + 2)) / sizes.size)
    return float(np.sqrt(var))
