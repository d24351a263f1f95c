"""Pre-deployment audit of a candidate model against a bundle's reference: `run` (the engine),
`checks` (maps, channels, accuracy, garbage, regions), `evidence` (region swaps, attribution
sanity), `perturb` (forward-only perturbations), `result` (the verdict and its checks). The
HTML page is `verifier.reports.audit`; the audit never imports a report."""
from __future__ import annotations

from verifier.audit.result import AuditError, AuditResult, Check
from verifier.audit.run import audit

__all__ = ["audit", "AuditError", "AuditResult", "Check"]
