"""calibration: conformal p-values and accept/reject decisions at a target false-rejection rate (framework-free)."""
