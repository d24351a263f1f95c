"""Preprocessing of decoded images for a model spec: Pillow-BILINEAR resize as two matrix
products per batch, gray/RGB channel conversion, then `(x - mean) / std`.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from verifier.spec import ModelSpec

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Decoded images `(H, W)` / `(H, W, 1|3)` float in [0, 1] -> float32 `(N, C, H, W)`.

    Resized to `spec.size` (Pillow-BILINEAR, antialiased when shrinking), converted
    to `spec.channels` (replicate gray, or BT.601 luma), then `(x - mean) / std`.
    Images of equal shape are resized together (`resize`).
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
        # gray images are resized once and broadcast to 3 channels on assignment
        out[idx] = resize(batch, (h, w))
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


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (..., H, W) -> (..., h, w) by Pillow's BILINEAR weights (`_bilinear_matrix`),
    one axis at a time, the one that shrinks the work more first.

    Each output pixel is a weighted sum over a short run of inputs (the triangle kernel's
    support), added in a fixed order by elementwise numpy steps, one per position in the
    run: the same bits with any number of BLAS threads (a BLAS matrix product changes its
    summation order with them, and the tie-breaking uniform is a hash of these pixels), and
    a fraction of a dense product's work when shrinking (measured in docs/performance.md)."""
    (hh, ww), (h, w) = x.shape[-2:], size
    rows, cols = _band(hh, h), _band(ww, w)
    kr, kc = rows[1].shape[1], cols[1].shape[1]
    if h * ww * kr + h * w * kc <= hh * w * kc + h * w * kr:
        return resize_axis(resize_axis(x, rows, -2), cols, -1)
    return resize_axis(resize_axis(x, cols, -1), rows, -2)


def resize_axis(x: np.ndarray, band: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """Resize float32 `x` along `axis` (-2 or -1) with `_band` weights: out[o] =
    sum_j weights[o, j] * x[starts[o] + j], j in order."""
    starts, weights = band
    if weights.shape[1] == 1 and len(starts) == x.shape[axis] and (weights == 1).all():
        return x  # the same size: Pillow's weights are the identity
    shape = (-1, 1) if axis == -2 else (1, -1)
    out = np.take(x, starts, axis=axis)
    out *= weights[:, 0].reshape(shape)
    for j in range(1, weights.shape[1]):
        term = np.take(x, starts + j, axis=axis)
        term *= weights[:, j].reshape(shape)
        out += term
    return out


@lru_cache(maxsize=64)
def _band(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """`_bilinear_matrix(src, dst)` as (starts (dst,), weights (dst, K) float32): row o's
    non-zeros lie in columns starts[o] .. starts[o] + K - 1 (K the widest run; a window moved
    to fit inside [0, src) keeps its zeros)."""
    m = _bilinear_matrix(src, dst)
    nz = m != 0
    first = nz.argmax(axis=1)
    last = src - 1 - nz[:, ::-1].argmax(axis=1)
    k = int((last - first).max()) + 1
    starts = np.minimum(first, src - k)
    weights = np.take_along_axis(m, starts[:, None] + np.arange(k)[None, :], axis=1)
    starts.setflags(write=False)
    weights.setflags(write=False)
    return starts, weights


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
