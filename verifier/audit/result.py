"""What an audit returns: the verdict, its checks with figures and reasons, the evidence
arrays behind the report, and the JSON form of `verifier audit --json`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AuditResult", "Check", "AuditEvidence", "SwapEvidence", "PatternEvidence", "AuditError",
           "CHECK_NAMES", "AUDIT_FORMAT_VERSION", "plain", "plain_number"]

AUDIT_FORMAT_VERSION = 1

#: every fixed check an audit can run, in report order; a bundle storing further attribution
#: methods adds <method>_attention_per_image / _per_class after the Grad-CAM ones
CHECK_NAMES = ("evidence_region_swap", "evidence_label_pattern", "accuracy", "attention_per_image", "attention_per_class",
               "early_per_image", "early_per_class", "early_channel_statistics",
               "attribution_randomisation", "attribution_faithfulness", "garbage_rejection",
               "regions_attention_mass", "regions_pointing_game")

class AuditError(ValueError):
    """The audit cannot run as asked (class mismatch, no readable image, bad mask); says why."""


@dataclass
class Check:
    """One audit check. `passed` is None when the check was skipped (`reason` says why).

    figure and threshold are the numbers compared (`figure >= threshold` passes when
    `higher_is_better`, else `figure <= threshold`); `details` holds per-measure or
    per-class figures behind them.
    """

    name: str
    family: str
    figure: float
    threshold: float
    passed: bool | None
    reason: str
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    decisive: bool = True  # False: reported (a warning when it fails), the verdict does not rest on it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "figure": plain_number(self.figure),
                "threshold": plain_number(self.threshold), "higher_is_better": self.higher_is_better,
                "result": {True: "pass", False: "fail", None: "skipped"}[self.passed],
                "passed": self.passed, "decisive": self.decisive, "reason": self.reason,
                "details": plain(self.details)}


@dataclass
class AuditEvidence:
    """Arrays behind the checks, for the HTML report (not part of the JSON).

    labels (N,) int; ref_cam, cand_cam (N, G, G) canonical Grad-CAM maps of the true class;
    agreement / self_agreement: {measure: (N,)} candidate-vs-reference and
    reference-vs-class-reference (the same for early_ names); ref_class_cam, cand_class_cam,
    store_cam (K, G, G) per-class mean maps; worst: indices of the images where the candidate
    disagrees most, with their pixels (n, H, W) in [0, 1] and sources.
    """

    labels: np.ndarray
    ref_cam: np.ndarray
    cand_cam: np.ndarray
    agreement: dict[str, np.ndarray]
    self_agreement: dict[str, np.ndarray]
    class_agreement: dict[str, np.ndarray]
    ref_class_cam: np.ndarray
    cand_class_cam: np.ndarray
    store_cam: np.ndarray
    worst: np.ndarray
    worst_pixels: np.ndarray
    worst_sources: list[str]
    swaps: SwapEvidence | None = None
    patterns: PatternEvidence | None = None


@dataclass
class SwapEvidence:
    """The region-swap images where the candidate moved most toward the swapped-in class.

    pixels / swapped: (n, H, W) in [0, 1] (reference preprocessing undone, channel mean);
    cells: (n, G, G) the swapped cells; cand_reliance / ref_reliance: (n, G, G) drop of the
    label's probability per swapped cell; shift_cand / shift_ref: (n,) rise of the swapped-in
    class's probability; labels / toward: (n,) true and swapped-in class; sources: file names.
    """

    pixels: np.ndarray
    swapped: np.ndarray
    cells: np.ndarray
    cand_reliance: np.ndarray
    ref_reliance: np.ndarray
    shift_cand: np.ndarray
    shift_ref: np.ndarray
    labels: np.ndarray
    toward: np.ndarray
    sources: list[str]


@dataclass
class PatternEvidence:
    """The images where the candidate moved most when given another class's label-coded pattern.

    mask: (H, W) share of channels in the pattern (reference preprocessing); pixels / changed:
    (n, H, W) in [0, 1] before and after; labels / toward: (n,) true class and the class whose
    pattern was put in; pull_cand / pull_ref: (n,) specific log-probability pull toward it.
    """

    mask: np.ndarray
    pixels: np.ndarray
    changed: np.ndarray
    labels: np.ndarray
    toward: np.ndarray
    pull_cand: np.ndarray
    pull_ref: np.ndarray
    sources: list[str]


@dataclass
class AuditResult:
    """Verdict ("PASS"/"FAIL") and the checks behind it. FAIL when any run check failed."""

    verdict: str
    checks: list[Check]
    classes: tuple[str, ...]
    n_images: int
    quantile: float
    reference: dict[str, Any]
    candidate: dict[str, Any]
    evidence: AuditEvidence | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def reasons(self) -> list[str]:
        """Plain-language reasons of the failed decisive checks (empty for a PASS)."""
        return [c.reason for c in self.checks if c.passed is False and c.decisive]

    @property
    def warnings(self) -> list[str]:
        """Failed checks the verdict does not rest on (reported for a person to weigh)."""
        return [c.reason for c in self.checks if c.passed is False and not c.decisive]

    def check(self, name: str) -> Check:
        """The check called `name` (KeyError if it did not run)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `verifier audit --json`."""
        return {"format_version": AUDIT_FORMAT_VERSION, "verdict": self.verdict,
                "reasons": self.reasons, "warnings": self.warnings, "n_images": self.n_images, "quantile": self.quantile,
                "classes": list(self.classes), "reference": plain(self.reference),
                "candidate": plain(self.candidate),
                "checks": [c.to_dict() for c in self.checks]}


def plain_number(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return plain_number(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj
