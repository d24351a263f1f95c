"""calibration: conformal p-values and accept/reject decisions at a target false-rejection rate (framework-free).

Never imports torch, onnxruntime or `verifier` (numpy, scipy, scikit-learn only).
"""
from .combine import MERGERS, merge_bonferroni, merge_twice_mean
from .conformal import ConformalCalibrator, conformal_p_values
from .decide import decide
from .fusion import FusedConformal

__all__ = ["ConformalCalibrator", "conformal_p_values", "FusedConformal", "MERGERS",
           "merge_bonferroni", "merge_twice_mean", "decide"]
