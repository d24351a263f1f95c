"""The gate's result for one input: accept/reject, the calibrated p-value, and why.

`Decision.to_dict()` is the JSON object of DESIGN.md (`gate --json`, one per line).
Sign convention: every p-value is "higher = more in-distribution"; `scores`
hold raw measures whose direction is given by `verifier.scoring.measures.MEASURES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Decision", "REASONS"]

#: reasons a decision can carry: which family of checks failed
REASONS = ("garbage", "attention", "early_features", "features", "output", "error")


@dataclass
class Decision:
    """One input's decision. An unreadable input is a reject with `error` set."""

    input: str
    decision: Literal["accept", "reject"]
    p_value: float | None
    predicted_class: str | None
    confidence: float | None
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    p_values: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    digest: str | None = None  # sha256 of the input's bytes (file) or pixels (array)

    @property
    def accepted(self) -> bool:
        return self.decision == "accept"

    @classmethod
    def from_error(cls, input: str, error: str, digest: str | None = None) -> Decision:
        """The record for an input that could not be read or probed (fails closed: reject)."""
        return cls(input=input, decision="reject", p_value=None, predicted_class=None,
                   confidence=None, reasons=["error"], error=error, digest=digest)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of DESIGN.md; NaN/inf become null so the line is valid JSON."""
        return {
            "input": self.input,
            "decision": self.decision,
            "p_value": _num(self.p_value),
            "predicted_class": self.predicted_class,
            "confidence": _num(self.confidence),
            "reasons": list(self.reasons),
            "scores": {k: _num(v) for k, v in self.scores.items()},
            "p_values": {k: _num(v) for k, v in self.p_values.items()},
            "error": self.error,
        }


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
