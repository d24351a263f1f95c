"""The accept/reject rule at a target false-rejection rate alpha.

Reject iff p <= alpha; with valid p-values the in-distribution rejection rate is <= alpha.
"""
from __future__ import annotations

import numpy as np

__all__ = ["decide"]


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
