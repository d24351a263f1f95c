"""The attribution methods a bundle scores: names, score prefixes, and their maps per batch.

Grad-CAM comes from the probe pass (its scores keep their names: `iou`, `kl`, ...). Every
further method (`build --methods gradcam,crm`) is computed with `verifier.attribution` on
the same preprocessed batch, for the class the probe's Grad-CAM explains, at the probe's
target layer, all methods in one shared attribution pass; its scores are named
`<key>_<measure>` (`crm_iou`, `gradcampp_kl`; key = `reference_maps.methods.method_key`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reference_maps.methods import method_key
from verifier.spec import ModelSpec

# verifier.attribution (and with it torch) is imported only where a further method is named:
# a Grad-CAM-only bundle loads, gates through the probe and reports drift without it.

__all__ = ["GRADCAM", "DEFAULT_METHODS", "score_prefix", "check_methods", "MethodPass"]

#: the method the probe computes and every bundle stores
GRADCAM = "gradcam"
DEFAULT_METHODS: tuple[str, ...] = (GRADCAM,)


def score_prefix(method: str) -> str:
    """'' for Grad-CAM (backward-compatible names), else `<method_key>_` (`crm_`)."""
    return "" if method == GRADCAM else method_key(method) + "_"


def check_methods(methods: str | Sequence[str], spec: ModelSpec | None = None) -> tuple[str, ...]:
    """The methods to store, Grad-CAM first (always stored: the probe's own map), each once.

    `methods`: names or one comma-separated string. Unknown names, and (with `spec`) methods
    the spec's backend cannot compute, raise AttributionError naming what is available."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in names if m]
    if all(m == GRADCAM for m in names):
        return DEFAULT_METHODS
    from verifier.attribution.core import check_backend
    from verifier.attribution.registry import METHODS, AttributionError

    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise AttributionError(f"unknown attribution method(s) {', '.join(unknown)}; "
                               f"registered: {', '.join(METHODS)}")
    out = tuple(dict.fromkeys([GRADCAM, *names]))
    if spec is not None:
        check_backend(spec, out[1:])
    return out


class MethodPass:
    """Raw maps of a bundle's further methods for one preprocessed batch.

    spec: the model (its module, or its ONNX / TorchScript file); methods: the further
    methods (Grad-CAM excluded); layer: the probe's resolved target layer."""

    def __init__(self, spec: ModelSpec, methods: Sequence[str], layer: str) -> None:
        self.methods = tuple(methods)
        if GRADCAM in self.methods:
            raise ValueError("Grad-CAM comes from the probe pass, not from MethodPass")
        check_methods(self.methods, spec)
        self.spec, self.layer = spec, layer

    def __call__(self, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
        """{method: float64 (N, h, w) raw map of class classes[i] of image x[i]}; {} when
        there is no further method."""
        if not self.methods or len(x) == 0:
            return {}
        from verifier.attribution.core import attribute_many

        return attribute_many(self.spec, np.asarray(x, dtype=np.float32), self.methods,
                              target=np.asarray(classes, dtype=np.int64), layer=self.layer)
