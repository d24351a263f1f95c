"""Kernel-Weighted Contribution (KWC) for segmentation models (docs/segmentation.md).

Each kernel k of each post-bottleneck layer l is weighted by its contribution to the region
score y: dependent D = y(all) - y(all but k) (removed in the presence of the others) and
independent I = y(only k) - y(none) (alone, the others absent); w = (D + I) / 2, and
KWC = ReLU(sum_l upsample(sum_k w_lk A_lk)). Every ablation is a row of one batched pass.
"""
from __future__ import annotations

import numpy as np
import torch

from verifier.attribution.registry import AttributionError, Method, register

__all__ = ["kwc_torch", "kernel_contributions"]


def kernel_contributions(p, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dependent D, independent I), float64 (N, k_l), of decoder layer `layer`'s kernels.

    Rows, all in one chunked pass: for each image, k_l rows with one kernel off, k_l rows
    with only one kernel on, and one row with every kernel off.
    """
    scores, acts = p.base()
    n, k = acts[layer].shape[:2]
    y = p.region_score(scores, torch.arange(n, device=scores.device))  # (N,)
    eye = torch.eye(k, dtype=torch.float64, device=scores.device)
    keep = torch.cat([1.0 - eye, eye, torch.zeros(1, k, dtype=torch.float64,
                                                  device=scores.device)])  # (2k + 1, k)
    rows = torch.arange(n, device=scores.device).repeat_interleave(2 * k + 1)
    out = p.ablate(layer, keep.repeat(n, 1), rows).view(n, 2 * k + 1)
    dependent = y[:, None] - out[:, :k]
    independent = out[:, k:2 * k] - out[:, 2 * k:]
    return dependent, independent


def kwc_torch(p) -> np.ndarray:
    """(N, H', W') float64 KWC map at the output grid from a SegPass (or an OnnxSegPass:
    the same tensors, so one code path serves both backends)."""
    from verifier.attribution.seg_pass import upsample

    _, acts = p.base()
    total = None
    for layer, a in enumerate(acts):
        dep, ind = kernel_contributions(p, layer)
        w = 0.5 * (dep + ind)
        m = upsample(torch.einsum("nk,nkhw->nhw", w, a.double()), p.output_size())
        total = m if total is None else total + m
    return total.clamp_min(0).cpu().numpy()


def _classifier_refused(p) -> np.ndarray:
    raise AttributionError("kwc explains segmentation models (output (N, K, H, W)); this model "
                           "is a classifier: use gradcam, crm or another method")


METHOD = register(Method(
    name="kwc", needs=frozenset({"layer_activation", "tail"}), grid="input",
    torch=_classifier_refused, onnx=None, signed=False, segmentation=kwc_torch,
    classification=False, segmentation_onnx=kwc_torch,
    summary="Kernel-Weighted Contribution: decoder kernels weighted by their dependent and "
            "independent contributions to the segmented region"))
