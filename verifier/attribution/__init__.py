"""Attribution maps: one verb (`attribute`) and one registry (`METHODS`) for every method.

Each method is one module here plus one `register(Method(...))` entry declaring what it
needs; the torch and onnxruntime passes compute only that (docs/attribution.md).
"""
from __future__ import annotations

from . import cam, crm, gradcam, gradcam_pp, guided_backprop, saliency, sam, scorecam  # noqa: F401  (registration)
from .core import attribute, attribute_many, backend_of
from .registry import METHODS, NEEDS, AttributionError, Method, get_method, onnx_methods, register

__all__ = ["attribute", "attribute_many", "backend_of", "METHODS", "NEEDS", "Method",
           "AttributionError", "register", "get_method", "onnx_methods"]
