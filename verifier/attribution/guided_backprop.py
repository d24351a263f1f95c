"""Guided back-propagation (Springenberg et al. 2015): max over channels of |guided gradient|.

As captum's `GuidedBackprop`: through every nn.ReLU module the backward passes only
positive gradients at positive inputs, relu(g_out) * (x > 0).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from verifier.attribution.registry import Method, register
from verifier.attribution.saliency import input_gradient


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * (x > 0).to(g.dtype)


def _guided(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _GuidedReLU.apply(inputs[0])


def guided_backprop_torch(p) -> np.ndarray:
    relus = [(m, "forward", _guided) for m in p.model.modules() if isinstance(m, nn.ReLU)]
    return input_gradient(p, relus).abs().amax(dim=1).double().cpu().numpy()


METHOD = register(Method(
    name="guided_backprop", needs=frozenset({"input_gradient"}), grid="input",
    torch=guided_backprop_torch, onnx=None, signed=False,
    summary="guided back-propagation: max over channels of |guided gradient|"))
