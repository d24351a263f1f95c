"""Class-selective Relevance Mapping (CRM; Kim, Rajaraman & Antani, Diagnostics 2019).

Per spatial element (i, j) of the target layer, zero A[:, i, j] (every channel) and
re-evaluate the tail: R_ij = sum_k [(T_k - S_k(ij))^2 - (T_k - S_k)^2], with S the
softmax outputs, S(ij) those with the element removed and T the one-hot target; signed
(> 0: removing the element hurts the class). Derivation: docs/attribution.md.
"""
from __future__ import annotations

import numpy as np
import torch

from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import Method, register


def crm_torch(p) -> np.ndarray:
    logits, act, _ = p.base()
    n, k, h, w = act.shape
    hw = h * w
    tgt = p.targets
    base_err = _sq_err(torch.softmax(logits.double(), dim=1), tgt)  # (N,)
    rel = torch.empty(n * hw, dtype=torch.float64, device=act.device)
    step = _rows(act[0].numel())
    for lo in range(0, n * hw, step):
        rows = torch.arange(lo, min(n * hw, lo + step), device=act.device)
        img, pos = rows // hw, rows % hw
        a = act[img].reshape(len(rows), k, hw).clone()
        a[torch.arange(len(rows)), :, pos] = 0
        out = p.tail(a.view(len(rows), k, h, w), img)
        rel[lo:lo + len(rows)] = _sq_err(torch.softmax(out.double(), dim=1), tgt[img]) - base_err[img]
    return rel.view(n, h, w).cpu().numpy()


def crm_onnx(p) -> np.ndarray:
    logits, act = p.base()
    n, k, h, w = act.shape
    hw = h * w
    tgt = p.targets
    base_err = _sq_err_np(_softmax(logits), tgt)
    rel = np.empty(n * hw, dtype=np.float64)
    step = _rows(act[0].size)
    for lo in range(0, n * hw, step):
        rows = np.arange(lo, min(n * hw, lo + step))
        img, pos = rows // hw, rows % hw
        a = act[img].reshape(len(rows), k, hw)  # fancy indexing: already a copy
        a[np.arange(len(rows)), :, pos] = 0.0
        out = p.tail(a.reshape(len(rows), k, h, w), img)
        rel[rows] = _sq_err_np(_softmax(out), tgt[img]) - base_err[img]
    return rel.reshape(n, h, w)


def _sq_err(s: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """sum_k (T_k - S_k)^2 for one-hot T at `tgt`: sum S^2 - 2 S_c + 1."""
    return (s * s).sum(dim=1) - 2 * s.gather(1, tgt[:, None])[:, 0] + 1


def _sq_err_np(s: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    return (s * s).sum(axis=1) - 2 * s[np.arange(len(tgt)), tgt] + 1


def _softmax(z: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(z, axis=1)


METHOD = register(Method(
    name="crm", needs=frozenset({"layer_activation", "tail"}), grid="layer",
    torch=crm_torch, onnx=crm_onnx, signed=True,
    summary="CRM: signed increase of the output MSE when each spatial element is removed"))
