"""Gradient saliency (Simonyan et al. 2014): max over input channels of |dy_c/dx|.

As captum's `Saliency(abs=True)` reduced over channels by the maximum; at input resolution.
"""
from __future__ import annotations

import numpy as np
import torch

from verifier.attribution.registry import Method, register


def input_gradient(p, hooks=()) -> torch.Tensor:
    """dy_c/dx (N, C, H, W) in one batched backward (images are independent in eval mode)."""
    from verifier.attribution.torch_pass import hooked

    xi = p.x.detach().clone().requires_grad_(True)
    with hooked(*hooks), torch.enable_grad():
        logits = p._logits(p.model(xi))
        tgt = p.resolve_targets(logits)
        (g,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), xi)
    return g


def saliency_torch(p) -> np.ndarray:
    return input_gradient(p).abs().amax(dim=1).double().cpu().numpy()


def saliency_seg(p) -> np.ndarray:
    """(N, H', W') float64: max over kernels of |d y / d A_l| per decoder layer (saliency with
    the layer as the input), upsampled to the output grid and summed over the layers."""
    from verifier.attribution.seg_pass import per_layer_sum

    return per_layer_sum(p, lambda a, g: g.abs().amax(dim=1))


METHOD = register(Method(
    name="saliency", needs=frozenset({"input_gradient"}), grid="input",
    torch=saliency_torch, onnx=None, signed=False, segmentation=saliency_seg,
    summary="gradient saliency: max over channels of |d y_c / d x|"))
