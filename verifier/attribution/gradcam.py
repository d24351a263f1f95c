"""Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k mean_ij(dy_c/dA_k) A_k) at the target layer.

As captum's `LayerGradCam(relu_attributions=True)`; the gradient runs through the tail only.
"""
from __future__ import annotations

import numpy as np

from verifier.attribution.registry import Method, register


def gradcam_torch(p) -> np.ndarray:
    """(N, h, w) float64 from the torch pass's activation and tail-only gradient."""
    _, act, grad = p.base()
    a, g = act.double(), grad.double()
    return g.mean(dim=(2, 3), keepdim=True).mul(a).sum(dim=1).clamp_min(0).cpu().numpy()


def gradcam_seg(p) -> np.ndarray:
    """(N, H', W') float64: sum over the decoder layers of each layer's Grad-CAM of the region
    score, upsampled to the output grid (docs/segmentation.md)."""
    from verifier.attribution.seg_pass import per_layer_sum

    return per_layer_sum(p, lambda a, g: g.mean(dim=(2, 3), keepdim=True).mul(a).sum(dim=1)
                         .clamp_min(0))


def gradcam_onnx(p) -> np.ndarray:
    """(N, h, w) float64 by the ONNX probe: exact gradient for a global-average-pooling +
    affine tail, central finite differences on the tail sub-model otherwise."""
    return p.gradcam()


METHOD = register(Method(
    name="gradcam", needs=frozenset({"layer_activation", "layer_gradient"}), grid="layer",
    torch=gradcam_torch, onnx=gradcam_onnx, signed=False, segmentation=gradcam_seg,
    summary="Grad-CAM: ReLU of the activation weighted by its spatially averaged gradient"))
