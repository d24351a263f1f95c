"""CAM (Zhou et al. 2016) for global-average-pooling + linear heads: sum_k w_ck A_k.

The head is checked on the batch, not assumed: the last linear layer's input must equal
the spatial mean of the target activation and its output must be the logits.
"""
from __future__ import annotations

import numpy as np
import torch

from verifier.attribution.registry import AttributionError, Method, register

_REFUSAL = ("cam needs the target layer to be followed by global average pooling and one "
            "linear layer that gives the logits; {why}. Use gradcam (on such a head it equals "
            "CAM / (h w), ReLU applied) or crm / scorecam, which need no particular head")


def cam_torch(p) -> np.ndarray:
    logits, act, _ = p.base()
    lin_in, lin_out = p.head_io
    if lin_in is None or p.linear is None:
        raise AttributionError(_REFUSAL.format(why="the model has no nn.Linear layer"))
    pooled = act.mean(dim=(2, 3))
    scale = float(pooled.abs().max()) or 1.0
    if lin_in.shape != pooled.shape or not torch.allclose(lin_in, pooled, rtol=1e-4,
                                                          atol=1e-5 * scale):
        raise AttributionError(_REFUSAL.format(
            why=f"the input of '{p.linear}' is not the spatial mean of '{p.layer}'"))
    if lin_out is None or lin_out.shape != logits.shape or not torch.equal(lin_out, logits):
        raise AttributionError(_REFUSAL.format(why=f"'{p.linear}' does not give the logits"))
    weight = dict(p.model.named_modules())[p.linear].weight.detach().double()
    w = weight[p.targets]  # (N, k)
    return torch.einsum("nk,nkhw->nhw", w, act.double()).cpu().numpy()


def cam_onnx(p) -> np.ndarray:
    import verifier.probe.onnx_graph as og

    _, act = p.base()
    tail = og.gap_linear_tail(p.info, p.layer)
    if tail is None:
        raise AttributionError(_REFUSAL.format(
            why=f"the graph after {p.layer!r} is not pooling + affine layers"))
    jac, relu = tail
    a = np.maximum(act, 0.0) if relu else act
    return np.einsum("nk,nkhw->nhw", jac[p.targets], a)


METHOD = register(Method(
    name="cam", needs=frozenset({"layer_activation", "head_weights"}), grid="layer",
    torch=cam_torch, onnx=cam_onnx, signed=True,
    summary="CAM: class weights of a GAP + linear head times the activation (no ReLU)"))
