"""Attribution maps: one verb (`attribute`) and one registry (`METHODS`) for every method.

Each method is one module here plus one `register(Method(...))` entry declaring what it
needs; the torch and onnxruntime passes compute only that (docs/attribution.md).
"""
from __future__ import annotations

# registration, in DESIGN.md's order (the order `METHODS` lists and --help shows)
from . import gradcam, gradcam_pp, scorecam, cam, saliency, guided_backprop, sam, crm  # noqa: F401,I001
from .core import attribute, attribute_many, backend_of
from .registry import METHODS, NEEDS, AttributionError, Method, get_method, onnx_methods, register

__all__ = ["attribute", "attribute_many", "backend_of", "METHODS", "NEEDS", "Method",
           "AttributionError", "register", "get_method", "onnx_methods"]
