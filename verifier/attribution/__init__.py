"""Attribution maps: one verb (`attribute`) and one registry (`METHODS`) for every method.

Each method is one module here plus one `register(Method(...))` entry declaring what it
needs; the torch and onnxruntime passes compute only that (docs/attribution.md).
"""
from __future__ import annotations

# registration, in DESIGN.md's order (the order `METHODS` lists and --help shows)
from verifier.attribution import gradcam, gradcam_pp, scorecam, cam, saliency  # noqa: F401,I001
from verifier.attribution import guided_backprop, sam, crm, kwc  # noqa: F401,I001
from verifier.attribution.core import (Explanation, attribute, attribute_many, backend_of, explain,
                                       predictor)
from verifier.attribution.faithfulness import Faithfulness, deletion_insertion
from verifier.attribution.preserved import Preserved, preserved
from verifier.attribution.registry import (METHODS, NEEDS, AttributionError, Method, get_method,
                                           onnx_methods, register, segmentation_methods)

__all__ = ["attribute", "attribute_many", "explain", "Explanation", "predictor", "backend_of",
           "deletion_insertion", "Faithfulness", "preserved", "Preserved", "METHODS", "NEEDS", "Method",
           "AttributionError", "register", "get_method", "onnx_methods", "segmentation_methods"]
