"""verifier: a verification gatekeeper for medical-image classifiers.

Grad-CAM and early-feature checks against a per-class reference, calibrated
accept/reject gating, pre-deployment audits and nightly drift reports.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from verifier.runtime.decision import Decision
from verifier.spec import ModelSpec, SpecError, load_spec

__version__ = "0.1.0"
__all__ = ["Decision", "Gatekeeper", "ModelSpec", "SpecError", "load_spec", "__version__"]

if TYPE_CHECKING:
    from verifier.runtime.gatekeeper import Gatekeeper


def __getattr__(name: str) -> Any:
    # Gatekeeper pulls in torch/onnxruntime; import it only when asked for.
    if name == "Gatekeeper":
        from verifier.runtime.gatekeeper import Gatekeeper
        return Gatekeeper
    raise AttributeError(name)
