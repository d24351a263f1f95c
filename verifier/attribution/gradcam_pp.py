"""Grad-CAM++ (Chattopadhay et al. 2018), as pytorch-grad-cam's GradCAMPlusPlus before resizing.

alpha_kij = g^2 / (2 g^2 + sum_ij(A_k) g^3 + 1e-6) (0 where g = 0), w_k = sum_ij alpha ReLU(g),
map = ReLU(sum_k w_k A_k), with g = dy_c/dA the gradient of the raw class score.
"""
from __future__ import annotations

import numpy as np

from verifier.attribution.registry import Method, register


def gradcam_pp_from(act: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(N, h, w) float64 from activation and gradient (N, k, h, w)."""
    a = np.asarray(act, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    g2 = g * g
    denom = 2.0 * g2 + a.sum(axis=(2, 3), keepdims=True) * g2 * g + 1e-6
    alpha = np.where(g != 0, g2 / denom, 0.0)
    w = (alpha * np.maximum(g, 0.0)).sum(axis=(2, 3))
    return np.maximum(np.einsum("nk,nkhw->nhw", w, a), 0.0)


def gradcam_pp_torch(p) -> np.ndarray:
    _, act, grad = p.base()
    return gradcam_pp_from(act.cpu().numpy(), grad.cpu().numpy())


def gradcam_pp_seg(p) -> np.ndarray:
    """(N, H', W') float64: Grad-CAM++ of the region score per decoder layer, upsampled, summed."""
    import torch

    from verifier.attribution.seg_pass import per_layer_sum

    return per_layer_sum(p, lambda a, g: torch.as_tensor(
        gradcam_pp_from(a.cpu().numpy(), g.cpu().numpy())))


METHOD = register(Method(
    name="gradcam++", needs=frozenset({"layer_activation", "layer_gradient"}), grid="layer",
    torch=gradcam_pp_torch, onnx=None, signed=False, segmentation=gradcam_pp_seg,
    summary="Grad-CAM++: per-position second/third-order gradient weights"))
