"""Canonical form of attention and early maps, shared by the store and the comparator.

A canonical map lives on a `grid` (default 16 x 16), is non-negative and is
scaled so its maximum is 1 (an all-zero map stays all zero). Resizing is
bilinear with half-pixel centres, done as two small matrix products so a whole
batch is resized at once.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["DEFAULT_GRID", "to_grid", "resize_maps", "normalise_max", "separable"]

DEFAULT_GRID: tuple[int, int] = (16, 16)


def to_grid(maps: np.ndarray, grid: tuple[int, int] = DEFAULT_GRID) -> np.ndarray:
    """(N, h, w) maps of any scale -> (N, G_h, G_w) float32 canonical maps."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {maps.shape}")
    out = resize_maps(np.maximum(maps, 0.0), grid)
    return normalise_max(np.maximum(out, 0.0))


def resize_maps(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Bilinear (N, h, w) -> (N, G_h, G_w); for downsampling by large factors the
    weights average the covered pixels (area), so no source pixel is skipped."""
    n, h, w = maps.shape
    rh = _resize_matrix(h, int(grid[0]))
    rw = _resize_matrix(w, int(grid[1]))
    return separable(rh, maps, rw).astype(np.float32)


def separable(rows: np.ndarray, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows (o, h) . x (..., h, w) . cols (p, w)^T -> (..., o, p): two matrix products, the
    cheaper order first. What einsum(optimize=True) computes, without its path search per call
    (about 90 us, which for one image cost more than the products; profiled in the service)."""
    o, h = rows.shape
    p, w = cols.shape
    if o * w * (h + p) <= h * p * (w + o):
        return np.matmul(np.matmul(rows, x), cols.T)
    return np.matmul(rows, np.matmul(x, cols.T))


def normalise_max(maps: np.ndarray) -> np.ndarray:
    """Scale each (h, w) map so its maximum is 1; all-zero maps stay zero."""
    peak = maps.reshape(maps.shape[0], -1).max(axis=1)
    scale = np.where(peak > 0, 1.0 / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    return (maps * scale[:, None, None]).astype(np.float32)


@lru_cache(maxsize=64)
def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) interpolation matrix: bilinear when upsampling, area when downsampling."""
    if src == dst:
        return np.eye(dst, dtype=np.float32)
    m = np.zeros((dst, src), dtype=np.float64)
    if dst > src:  # bilinear, half-pixel centres, clamped at the borders
        pos = (np.arange(dst) + 0.5) * src / dst - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        frac = pos - lo
        m[np.arange(dst), lo] += 1 - frac
        m[np.arange(dst), hi] += frac
    else:  # area: each output cell averages the source interval it covers
        edges = np.arange(dst + 1) * src / dst
        for i in range(dst):
            a, b = edges[i], edges[i + 1]
            for j in range(int(np.floor(a)), int(np.ceil(b))):
                m[i, j] = min(b, j + 1) - max(a, j)
            m[i] /= m[i].sum()
    m.setflags(write=False)
    return m.astype(np.float32)
