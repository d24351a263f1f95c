"""Saliency activation map (SAM; Philbrick et al., AJR 2018, the CT contrast-phase paper).

The input-pixel gradient of the target layer's class-weighted activation map: with
alpha_k = mean_ij dy_c/dA_k (Grad-CAM's weights, held constant) and
L = sum_ij ReLU(sum_k alpha_k A_k)_ij, SAM = max over channels of |dL/dx|; voxel-level
at any layer, shallow ones included (derivation: docs/attribution.md).
"""
from __future__ import annotations

import numpy as np
import torch

from verifier.attribution.registry import Method, register


def sam_torch(p) -> np.ndarray:
    from verifier.attribution.torch_pass import hooked

    box: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        box["a"] = output
        return output.clone()  # a later in-place op cannot modify the kept activation

    xi = p.x.detach().clone().requires_grad_(True)
    with hooked((p.layer_module, "forward", keep)), torch.enable_grad():
        logits = p._logits(p.model(xi))
        tgt = p.resolve_targets(logits)
        a = box["a"]
        (ga,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), a, retain_graph=True)
        alpha = ga.mean(dim=(2, 3), keepdim=True).detach()
        level = torch.relu((alpha * a).sum(dim=1)).sum()
        (gx,) = torch.autograd.grad(level, xi)
    return gx.abs().amax(dim=1).double().cpu().numpy()


METHOD = register(Method(
    name="sam", needs=frozenset({"input_gradient", "layer_activation"}), grid="input",
    torch=sam_torch, onnx=None, signed=False,
    summary="saliency activation map: input gradient of the layer's class-weighted activation map"))
