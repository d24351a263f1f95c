"""Where a model's decisions come from, measured by changing the image: region swaps and deletions.

Forward passes only (any `logits(x)` callable), so every test here runs the same way on a torch
module, a TorchScript file or an ONNX file, and compares models of any head or width on equal
terms (Grad-CAM maps of two architectures are not comparable; their behaviour is). Images are
split into a `grid` x `grid` lattice of cells in relative coordinates, so two models with
different input sizes swap the same part of the picture. See docs/audit.md.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import softmax

__all__ = ["LogitsFn", "KeptLogitsFn", "cell_index", "swap_cells", "reliance_maps", "unused_cells",
           "swap_shift", "deletion_curves", "other_class_partner"]

#: (N, C, H, W) float32 preprocessed images -> (N, K_out) logits
LogitsFn = Callable[[np.ndarray], np.ndarray]
#: the same, counting only the pixels where a (N, H, W) bool mask is True (a segmenter's
#: `kept_logits`: its image-level scores over part of the picture)
KeptLogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: float32 elements one forward chunk may hold (128 MiB): bounds memory for large inputs
_CHUNK_ELEMENTS = 32 * 1024 * 1024


def cell_index(size: int, grid: int) -> np.ndarray:
    """(size,) int: the cell row (or column) of every pixel row (column) for a `grid` lattice."""
    if grid < 1 or grid > size:
        raise ValueError(f"grid must be in [1, {size}], got {grid}")
    return np.minimum((np.arange(size) * grid) // size, grid - 1)


def swap_cells(x: np.ndarray, donor: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """x (N, C, H, W) with the pixels of the chosen cells taken from `donor` (same shape).

    cells: (N, G, G) bool, True where the donor's content replaces x's.
    """
    n, _, h, w = x.shape
    g = cells.shape[-1]
    pix = cells[:, cell_index(h, g)][:, :, cell_index(w, g)]  # (N, H, W)
    return np.where(pix[:, None], donor, x).astype(x.dtype, copy=False)


def reliance_maps(logits: LogitsFn, x: np.ndarray, donor: np.ndarray, labels: np.ndarray,
                  k: int, grid: int) -> np.ndarray:
    """(N, G, G) float64: how much the probability of each image's label drops when one cell is
    replaced by the donor image's content (positive = the model relies on that cell).

    One batched forward over N x G^2 swapped images, in memory-bounded chunks.
    """
    n, c, h, w = x.shape
    g2 = grid * grid
    base = _probs(logits, x, k)[np.arange(n), labels]
    eye = np.eye(g2, dtype=bool).reshape(g2, grid, grid)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, g2 * c * h * w))
    drops = np.empty((n, g2), dtype=np.float64)
    for s in range(0, n, per_chunk):
        sl = slice(s, min(n, s + per_chunk))
        m = sl.stop - sl.start
        xs = np.repeat(x[sl], g2, axis=0)
        ds = np.repeat(donor[sl], g2, axis=0)
        swapped = swap_cells(xs, ds, np.tile(eye, (m, 1, 1)))
        p = _probs(logits, swapped, k).reshape(m, g2, -1)
        drops[sl] = base[sl, None] - p[np.arange(m)[:, None], np.arange(g2)[None], labels[sl, None]]
    return drops.reshape(n, grid, grid)


def unused_cells(reliance: np.ndarray, labels: np.ndarray, k: int, level: float) -> np.ndarray:
    """(K, G, G) bool: per class, the cells the model does not rely on, where the class's mean
    positive reliance stays below `level` x its largest cell. A class with no image: none."""
    out = np.zeros((k, *reliance.shape[1:]), dtype=bool)
    pos = np.maximum(reliance, 0.0)
    for c in np.unique(labels):
        mean = pos[labels == c].mean(axis=0)
        peak = float(mean.max())
        if peak > 0:
            out[c] = mean < level * peak
    return out


def swap_shift(logits: LogitsFn, x: np.ndarray, donor: np.ndarray, cells: np.ndarray,
               toward: np.ndarray, k: int, kept: KeptLogitsFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Swap `cells` (N, G, G) in from `donor`; returns the rise of each image's probability of
    class `toward` (N,), and whether the prediction became `toward` (N,) bool.

    `kept` (segmentation models): the probabilities are read from the pixels left in place
    only. A segmenter labels what it is shown, so the swapped-in content's own pixels take the
    partner's class in any good model; what tells a shortcut apart is the object's pixels,
    which keep their content, changing label with the swapped-in surroundings."""
    n = len(x)
    swapped = swap_cells(x, donor, cells)
    if kept is None:
        before, after = _probs(logits, x, k), _probs(logits, swapped, k)
    else:
        h, w = x.shape[2:]
        keep = ~cells[:, cell_index(h, cells.shape[1])][:, :, cell_index(w, cells.shape[2])]
        before, after = _kept_probs(kept, x, keep, k), _kept_probs(kept, swapped, keep, k)
    rows = np.arange(n)
    return after[rows, toward] - before[rows, toward], after.argmax(1) == toward


def deletion_curves(logits: LogitsFn, x: np.ndarray, order: np.ndarray, labels: np.ndarray,
                    baseline: np.ndarray, k: int, steps: int = 10,
                    insertion: bool = False) -> np.ndarray:
    """(N, steps + 1) probability of each label as the cells are deleted (replaced by `baseline`,
    (C,) per channel) in `order` (N, G*G) cell indices, most important first; with
    `insertion`, the image starts as the baseline and the cells are put back in that order."""
    n, c, h, w = x.shape
    g2 = order.shape[1]
    grid = int(round(np.sqrt(g2)))
    blank = np.broadcast_to(np.asarray(baseline, dtype=x.dtype)[None, :, None, None], x.shape)
    out = np.empty((n, steps + 1), dtype=np.float64)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(g2)[None].repeat(n, 0), axis=1)
    for t in range(steps + 1):
        cut = int(round(t * g2 / steps))
        chosen = (ranks < cut).reshape(n, grid, grid)
        img = swap_cells(blank, x, chosen) if insertion else swap_cells(x, blank, chosen)
        out[:, t] = _probs(logits, np.ascontiguousarray(img), k)[np.arange(n), labels]
    return out


def other_class_partner(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) index of a seeded random image of another class for every image (itself when the
    data hold one class only)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    partner = np.arange(len(labels))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        others = np.flatnonzero(labels != c)
        if len(others):
            partner[rows] = others[rng.integers(0, len(others), size=len(rows))]
    return partner


def _kept_probs(kept: KeptLogitsFn, x: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """`_probs` of `kept(x, keep)`, batched in the same chunks."""
    per = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    parts = [np.asarray(kept(np.ascontiguousarray(x[s:s + per]), keep[s:s + per]), dtype=np.float64)[:, :k]
             for s in range(0, len(x), per)]
    return softmax(np.concatenate(parts), axis=1)


def _probs(logits: LogitsFn, x: np.ndarray, k: int) -> np.ndarray:
    """Softmax over the first k (real) classes, batched in memory-bounded chunks."""
    per = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    parts = [np.asarray(logits(np.ascontiguousarray(x[s:s + per])), dtype=np.float64)[:, :k]
             for s in range(0, len(x), per)]
    return softmax(np.concatenate(parts), axis=1)
