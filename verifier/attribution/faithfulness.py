"""Deletion / insertion faithfulness of attribution maps (Petsiuk et al. 2018), batched.

Pixels are ranked by the map (bilinearly upsampled to the input); deletion replaces the
top fraction f with the baseline, insertion starts from the baseline and restores it.
The class probability is read at `steps + 1` fractions; the figure is its area over f.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.integrate import trapezoid
from scipy.special import softmax

from verifier.attribution.chunks import rows_per_chunk
from verifier.attribution.scorecam import _align_corners_matrix

__all__ = ["Faithfulness", "deletion_insertion"]


@dataclass
class Faithfulness:
    """Per-image areas (N,) under the probability curves; fractions (S+1,), curves (N, S+1).

    deletion_auc: lower is more faithful (removing the top pixels first drops the class fast)
    insertion_auc: higher is more faithful (restoring them first recovers it fast)
    """

    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    fractions: np.ndarray
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray


def deletion_insertion(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                       maps: np.ndarray, targets: np.ndarray, steps: int = 16,
                       baseline: float = 0.0) -> Faithfulness:
    """Deletion and insertion curves of `maps` (N, h, w) for inputs x (N, C, H, W).

    predict: float32 (R, C, H, W) -> logits (R, K). baseline: the value removed pixels take
    (0 = the data set mean in preprocessed units). All N * (steps + 1) perturbed inputs of
    each kind go through `predict` in chunks; no per-image loop.
    """
    x = np.asarray(x, dtype=np.float32)
    n, c, hh, ww = x.shape
    maps = np.asarray(maps, dtype=np.float64)
    if maps.shape[1:] != (hh, ww):
        rh, rw = _align_corners_matrix(maps.shape[1], hh), _align_corners_matrix(maps.shape[2], ww)
        maps = np.einsum("oh,nhw,pw->nop", rh, maps, rw)
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(hh * ww)[None, :]
    rank = rank.reshape(n, 1, hh, ww)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    cut = np.round(fractions * hh * ww).astype(np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    curves = {}
    for kind in ("deletion", "insertion"):
        probs = np.empty(n * (steps + 1))
        rows_per = rows_per_chunk(x[0].size)
        for lo in range(0, n * (steps + 1), rows_per):
            r = np.arange(lo, min(n * (steps + 1), lo + rows_per))
            img, s = r // (steps + 1), r % (steps + 1)
            top = rank[img] < cut[s][:, None, None, None]  # (R, 1, H, W) the top-ranked pixels
            keep_x = ~top if kind == "deletion" else top
            xin = np.where(keep_x, x[img], np.float32(baseline)).astype(np.float32)
            p = softmax(np.asarray(predict(xin), dtype=np.float64), axis=1)
            probs[r] = p[np.arange(len(r)), targets[img]]
        curves[kind] = probs.reshape(n, steps + 1)
    auc = {k: trapezoid(v, fractions, axis=1) for k, v in curves.items()}
    return Faithfulness(auc["deletion"], auc["insertion"], fractions,
                        curves["deletion"], curves["insertion"])
