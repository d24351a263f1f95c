"""Score-CAM (Wang et al. 2020), as pytorch-grad-cam's ScoreCAM before resizing; no gradients.

Each channel's activation, upsampled (bilinear, corners aligned) to the input and min-max
scaled to [0, 1], masks the input; w = softmax over channels of the masked inputs' class
scores; map = ReLU(sum_k w_k A_k).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import Method, register


def scorecam_torch(p) -> np.ndarray:
    _, act, _ = p.base()
    n, k = act.shape[:2]
    scores = torch.empty(n * k, dtype=torch.float64)
    step = _rows(p.x[0].numel())
    for lo in range(0, n * k, step):
        rows = torch.arange(lo, min(n * k, lo + step), device=act.device)
        img, ch = rows // k, rows % k
        up = F.interpolate(act[img, ch][:, None], size=p.x.shape[2:], mode="bilinear",
                           align_corners=True)
        flat = up.flatten(1)
        lo_, hi_ = flat.min(dim=1).values, flat.max(dim=1).values
        up = (up - lo_[:, None, None, None]) / (hi_ - lo_ + 1e-8)[:, None, None, None]
        logits = p.forward(p.x[img] * up)
        scores[lo:lo + len(rows)] = logits.gather(1, p.targets[img][:, None])[:, 0].double().cpu()
    w = torch.softmax(scores.view(n, k), dim=1)
    return np.maximum(np.einsum("nk,nkhw->nhw", w.numpy(), act.double().cpu().numpy()), 0.0)


def scorecam_onnx(p) -> np.ndarray:
    _, act = p.base()
    n, k, h, w = act.shape
    H, W = p.x.shape[2:]
    rh, rw = _align_corners_matrix(h, H), _align_corners_matrix(w, W)
    scores = np.empty(n * k, dtype=np.float64)
    step = _rows(p.x[0].size)
    a32 = act.astype(np.float32)
    for lo in range(0, n * k, step):
        rows = np.arange(lo, min(n * k, lo + step))
        img, ch = rows // k, rows % k
        up = np.einsum("oh,rhw,pw->rop", rh, a32[img, ch], rw).astype(np.float32)
        mn = up.min(axis=(1, 2), keepdims=True)
        mx = up.max(axis=(1, 2), keepdims=True)
        up = (up - mn) / (mx - mn + np.float32(1e-8))
        logits = p.forward(p.x[img] * up[:, None])
        scores[rows] = logits[np.arange(len(rows)), p.targets[img]]
    e = np.exp(scores.reshape(n, k) - scores.reshape(n, k).max(axis=1, keepdims=True))
    wts = e / e.sum(axis=1, keepdims=True)
    return np.maximum(np.einsum("nk,nkhw->nhw", wts, act), 0.0)


def _align_corners_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32 bilinear interpolation weights with corners aligned."""
    m = np.zeros((dst, src), dtype=np.float32)
    if src == 1 or dst == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(dst) * (src - 1) / (dst - 1)
    i0 = np.minimum(np.floor(pos).astype(int), src - 2)
    frac = (pos - i0).astype(np.float32)
    m[np.arange(dst), i0] = 1.0 - frac
    m[np.arange(dst), i0 + 1] += frac
    return m


METHOD = register(Method(
    name="scorecam", needs=frozenset({"layer_activation", "masked_forward"}), grid="layer",
    torch=scorecam_torch, onnx=scorecam_onnx, signed=False,
    summary="Score-CAM: channel weights from the class scores of activation-masked inputs"))
