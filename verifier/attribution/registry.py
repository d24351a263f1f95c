"""The attribution method registry: one entry per method, declaring what it needs.

`register(Method(...))` adds a method; the passes in `verifier.attribution.torch_pass`
and `onnx_pass` read the declared needs and compute only those.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Method", "METHODS", "NEEDS", "AttributionError", "register", "get_method",
           "onnx_methods", "segmentation_methods"]

#: what a method may need from a backend pass
NEEDS = frozenset({
    "layer_activation",   # the target layer's activation A (N, K, h, w)
    "layer_gradient",     # d y_c / d A at the target layer (tail-only backward)
    "input_gradient",     # a backward pass to the input pixels
    "tail",               # re-evaluation of the layers after the target with a modified A
    "masked_forward",     # whole-model forward passes on masked inputs
    "head_weights",       # the weights of a global-average-pooling + linear head
})


class AttributionError(ValueError):
    """A method cannot run as asked: unknown name, unsupported backend or model head."""


@dataclass(frozen=True)
class Method:
    """One attribution method.

    name:   the registry key (`attribute(..., method=name)`)
    needs:  subset of `NEEDS`; the pass computes only these
    grid:   "layer" (map at the target layer's h x w) or "input" (at H x W)
    torch:  fn(TorchPass) -> (N, h, w) float64 on the torch path
    onnx:   fn(OnnxPass) -> the same on the onnxruntime path, or None when ONNX cannot
    signed: True when the raw map has both signs (CRM); False when it is >= 0
    summary: one line for --help and reports
    segmentation: fn(SegPass) -> (N, H', W') float64 on segmentation models (the method
            adapted over the post-bottleneck layers), or None when it is not adapted
    classification: False for a segmentation-only method (kwc): classifiers refuse it
    segmentation_onnx: the same on the onnxruntime path (OnnxSegPass), or None
    """

    name: str
    needs: frozenset[str]
    grid: str
    torch: Callable[[Any], np.ndarray]
    onnx: Callable[[Any], np.ndarray] | None
    signed: bool
    summary: str
    segmentation: Callable[[Any], np.ndarray] | None = None
    classification: bool = True
    segmentation_onnx: Callable[[Any], np.ndarray] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"method {self.name!r} declares unknown needs {sorted(unknown)}")
        if self.grid not in ("layer", "input"):
            raise ValueError("grid must be 'layer' or 'input'")


#: every registered method by name, in registration order
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to `METHODS` (a name registered twice is an error)."""
    if method.name in METHODS:
        raise ValueError(f"attribution method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called `name`, or an AttributionError listing the others."""
    try:
        return METHODS[name]
    except KeyError:
        raise AttributionError(f"unknown attribution method {name!r}; registered: "
                               f"{', '.join(METHODS)}") from None


def segmentation_methods() -> list[str]:
    """Names of the methods that explain segmentation models."""
    return [m.name for m in METHODS.values() if m.segmentation is not None]


def onnx_methods() -> list[str]:
    """Names of the methods the onnxruntime backend can run."""
    return [m.name for m in METHODS.values() if m.onnx is not None]


def resolve_targets(target: object, logits: np.ndarray, spec: Any | None) -> np.ndarray:
    """(N,) int64 classes to explain: the prediction over the spec's real classes (a garbage
    output excluded) when `target` is None, else an int or (N,) ints, checked against K."""
    n, k = logits.shape
    if target is None:
        if spec is None:  # a bare model: every output is a class
            return logits.argmax(axis=1).astype(np.int64)
        real = np.array(logits[:, :spec.num_classes], dtype=np.float64)
        g = spec.garbage_class
        if g is not None and g < spec.num_classes:
            real[:, g] = -np.inf
        return real.argmax(axis=1).astype(np.int64)
    t = np.asarray(target)
    if t.ndim == 0:
        t = np.full(n, int(t))
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise AttributionError(f"target must be None, an int or {n} ints, got {target!r}")
    if t.min() < 0 or t.max() >= k:
        raise AttributionError(f"target classes must lie in [0, {k}), got {t.tolist()[:8]}")
    return t.astype(np.int64)
