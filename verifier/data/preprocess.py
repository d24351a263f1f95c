"""Preprocessing of decoded images for a model spec: Pillow-BILINEAR resize as two matrix
products per batch, gray/RGB channel conversion, then `(x - mean) / std`.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from reference_maps.canonical import separable
from verifier.spec import ModelSpec

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Decoded images `(H, W)` / `(H, W, 1|3)` float in [0, 1] -> float32 `(N, C, H, W)`.

    Resized to `spec.size` (Pillow-BILINEAR, antialiased when shrinking), converted
    to `spec.channels` (replicate gray, or BT.601 luma), then `(x - mean) / std`.
    Images of equal shape are resized together in one pair of matrix products.
    """
    h, w = spec.size
    c = spec.channels
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    chw = [_to_channels(np.asarray(img, dtype=np.float32), c, i) for i, img in enumerate(images)]
    for i, x in enumerate(chw):
        groups.setdefault(x.shape, []).append(i)
    for shape, idx in groups.items():
        batch = np.stack([chw[i] for i in idx])
        rh = _bilinear_matrix(shape[1], h)
        rw = _bilinear_matrix(shape[2], w)
        # the cheaper order of the two matrix products; gray images are resized once and
        # broadcast to 3 channels on assignment
        out[idx] = separable(rh, batch, rw)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    out -= mean
    out /= std
    return out


def _to_channels(x: np.ndarray, c: int, i: int) -> np.ndarray:
    """(H, W) / (H, W, 1|3) -> (1 or c, H, W) float32, before resizing (both steps are linear).

    RGB -> gray happens here (resizing 1 channel, not 3); gray stays one channel and
    is replicated after resizing, for the same reason.
    """
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3 and x.shape[-1] == 3:
        if c == 1:
            return np.tensordot(x, _LUMA, axes=([2], [0]))[None].astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))
    raise ValueError(f"image {i}: expected (H, W) or (H, W, 1|3), got shape {x.shape}")


@lru_cache(maxsize=64)
def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of Pillow's BILINEAR resample (Resample.c precompute_coeffs).

    A triangle kernel of support max(src/dst, 1): plain bilinear when enlarging,
    antialiased (every source pixel weighs in) when shrinking; rows sum to 1.
    """
    scale = src / dst
    fscale = max(scale, 1.0)
    support = fscale
    m = np.zeros((dst, src), dtype=np.float64)
    for o in range(dst):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), src)
        xs = np.arange(lo, hi)
        wts = np.maximum(0.0, 1.0 - np.abs((xs - center + 0.5) / fscale))
        total = wts.sum()
        if total > 0:
            m[o, lo:hi] = wts / total
    m.setflags(write=False)
    return m.astype(np.float32)
