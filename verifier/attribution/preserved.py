"""Prediction Preserved and Image Preserved: validating segmentation attribution maps.

Mask the input with the map (keep the pixels the map ranks important, the rest set to the
baseline) and re-segment: how much of the explained region is still predicted as its class
(Prediction Preserved, higher is better) and how much of the image the map kept (Image
Preserved, lower is better). Masking rule and definitions: docs/segmentation.md.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from verifier.attribution.chunks import rows_per_chunk

__all__ = ["Preserved", "preserved", "keep_masks", "top_fraction_masks", "THRESHOLDS"]

#: the threshold sweep: keep pixels whose map is at least t x the image's map peak
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@dataclass
class Preserved:
    """Per-image figures of one method, float64 (N,), and their curves (N, T) over `thresholds`
    (the keep-fractions when masks keep a top fraction).

    prediction_preserved: mean over t of the share of the explained region still predicted
    as the explained class; image_preserved: mean over t of the share of pixels kept.
    """

    prediction_preserved: np.ndarray
    image_preserved: np.ndarray
    prediction_curve: np.ndarray
    image_curve: np.ndarray
    thresholds: tuple[float, ...]


def keep_masks(maps: np.ndarray, size: tuple[int, int],
               thresholds: tuple[float, ...] = THRESHOLDS) -> np.ndarray:
    """bool (N, T, H, W): pixel kept at threshold t where map / max(map) >= t.

    maps (N, h, w) are upsampled bilinearly (align_corners=False) to the input's (H, W)
    when their grid differs; a map with no positive value keeps nothing.
    """
    m = _to_size(np.asarray(maps, dtype=np.float64), size)
    peak = m.reshape(len(m), -1).max(axis=1)
    norm = np.where(peak[:, None, None] > 0, m / np.where(peak > 0, peak, 1.0)[:, None, None], -1.0)
    t = np.asarray(thresholds, dtype=np.float64)[None, :, None, None]
    return norm[:, None] >= t


def top_fraction_masks(maps: np.ndarray, size: tuple[int, int],
                       fractions: tuple[float, ...]) -> np.ndarray:
    """bool (N, F, H, W): the round(f x H x W) pixels of highest map value kept (ties broken
    by position, stable), for comparing methods at an equal share of the image kept."""
    m = _to_size(np.asarray(maps, dtype=np.float64), size).reshape(len(maps), -1)
    rank = np.empty_like(m, dtype=np.int64)
    order = np.argsort(-m, axis=1, kind="stable")
    rank[np.arange(len(m))[:, None], order] = np.arange(m.shape[1])[None]
    k = np.array([round(f * m.shape[1]) for f in fractions])[None, :, None]
    return (rank[:, None] < k).reshape(len(m), len(fractions), *size)


def preserved(segment: Callable[[np.ndarray], np.ndarray], x: np.ndarray, maps: np.ndarray,
              targets: np.ndarray, regions: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS,
              baseline: float = 0.0, fractions: tuple[float, ...] | None = None) -> Preserved:
    """Prediction / Image Preserved of `maps` (N, h, w) for inputs x (N, C, H, W).

    segment: float32 (R, C, H, W) -> class scores (R, K, H', W') (batched: the N x T masked inputs
    go through it in calls of at most `chunks.CHUNK_ROWS` rows). targets (N,) the explained classes; regions
    (N, H', W') the explained regions (weights, 0/1 for a predicted region). The masked
    input keeps x where the map keeps the pixel and is `baseline` (preprocessed units: 0 is
    the data set mean) elsewhere. An empty region gives a NaN Prediction Preserved.
    fractions: instead of the threshold sweep, keep each map's top fraction f of pixels
    (Image Preserved is then f by construction: PP compared at an equal share kept).
    """
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    keep = (keep_masks(maps, (h, w), thresholds) if fractions is None
            else top_fraction_masks(maps, (h, w), fractions))  # (N, T, H, W)
    nt = keep.shape[1]
    per = max(1, rows_per_chunk(c * h * w) // nt)  # images whose N x T rows form one call
    preds = []
    for lo in range(0, n, per):
        k, xs = keep[lo:lo + per], x[lo:lo + per]
        masked = np.where(k[:, :, None], xs[:, None], np.float32(baseline)).astype(np.float32)
        scores = np.asarray(segment(masked.reshape(len(xs) * nt, c, h, w)))
        preds.append(scores.argmax(axis=1).reshape(len(xs), nt, *scores.shape[2:]))
    pred = np.concatenate(preds)
    reg = np.asarray(regions, dtype=np.float64)[:, None]
    hit = (pred == np.asarray(targets)[:, None, None, None]) * reg
    area = reg.sum(axis=(2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        pp = np.where(area > 0, hit.sum(axis=(2, 3)) / area, np.nan)
    ip = keep.mean(axis=(2, 3))
    return Preserved(pp.mean(axis=1), ip.mean(axis=1), pp, ip,
                     tuple(thresholds if fractions is None else fractions))


def _to_size(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if m.shape[1:] == tuple(size):
        return m
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(m)[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
