"""The seven similarity measures between a batch of maps and their references.

A registry (`MEASURES`, `register_measure`) holds every measure; `compare_maps`
runs the chosen ones over a whole batch at once. A measure registered once is built into
every new bundle (its manifest lists the measures), scored by the gate, calibrated and
reported with no other edit. Formulas and edge cases: docs/measures.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.ndimage import uniform_filter

__all__ = [
    "Measure", "MeasureFn", "MeasureOptions", "DEFAULT_OPTIONS", "MEASURES", "MEASURE_NAMES",
    "PREFIXES", "register_measure", "unregister_measure", "compare_maps", "measure_direction",
    "measure_of",
    "iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein",
    "binarise", "to_distribution",
]

WassersteinMode = Literal["fast", "exact"]


@dataclass(frozen=True)
class MeasureOptions:
    """Settings every measure reads; one immutable value, so concurrent callers never race.

    binary_level:  iou/dice mask = value >= binary_level * (the map's own max); 0.5 by default
    kl_epsilon:    added to every cell of a canonical (max 1) map before normalising to mass 1
    wasserstein:   "fast" (sliced, vectorised, the default) or "exact" (POT `ot.emd2` per pair)
    wasserstein_directions: projection directions of the fast mode, evenly spaced over [0, pi)
    """

    binary_level: float = 0.5
    kl_epsilon: float = 1e-3
    wasserstein: WassersteinMode = "fast"
    wasserstein_directions: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.binary_level <= 1.0:
            raise ValueError(f"binary_level must be in (0, 1], got {self.binary_level}")
        if not self.kl_epsilon > 0.0:
            raise ValueError(f"kl_epsilon must be positive, got {self.kl_epsilon}")
        if self.wasserstein not in ("fast", "exact"):
            raise ValueError(f"wasserstein mode must be 'fast' or 'exact', got {self.wasserstein!r}")
        if int(self.wasserstein_directions) < 2:
            raise ValueError("wasserstein_directions must be at least 2")


DEFAULT_OPTIONS = MeasureOptions()


#: a measure: (N, H, W) float64 maps, (N, H, W) float64 refs, options -> (N,) float64
MeasureFn = Callable[[np.ndarray, np.ndarray, MeasureOptions], np.ndarray]


@dataclass(frozen=True)
class Measure:
    """One registered measure: the function, its direction and its ideal (identical-map) value."""

    name: str
    fn: MeasureFn
    higher_is_better: bool
    ideal: float
    description: str


#: every registered measure by name, in registration order
MEASURES: dict[str, Measure] = {}

#: name prefixes that label the same measure on another kind of map (early-layer maps)
PREFIXES: tuple[str, ...] = ("early_",)


def register_measure(name: str, *, higher_is_better: bool, ideal: float,
                     description: str) -> Callable[[MeasureFn], MeasureFn]:
    """Decorator: add `fn(maps, refs, options)` to `MEASURES` under `name`; returns fn unchanged."""
    if not name or not name.isidentifier() or any(name.startswith(p) for p in PREFIXES):
        raise ValueError(f"measure name must be an identifier without a prefix {PREFIXES}: {name!r}")

    def deco(fn: MeasureFn) -> MeasureFn:
        if name in MEASURES and MEASURES[name].fn is not fn:
            raise ValueError(f"a different measure is already registered as {name!r}")
        MEASURES[name] = Measure(name, fn, bool(higher_is_better), float(ideal), description)
        return fn

    return deco


def unregister_measure(name: str) -> None:
    """Remove a measure added with `register_measure` (the seven built-in ones stay)."""
    if name in MEASURE_NAMES:
        raise ValueError(f"the built-in measure {name!r} cannot be unregistered")
    if name not in MEASURES:
        raise KeyError(f"no measure {name!r} is registered; registered: {list(MEASURES)}")
    del MEASURES[name]


def compare_maps(maps: np.ndarray, refs: np.ndarray, names: Sequence[str] | None = None, *,
                 prefix: str = "", options: MeasureOptions | None = None,
                 wasserstein: WassersteinMode | None = None) -> dict[str, np.ndarray]:
    """Every chosen measure between maps[i] and refs[i], for the whole batch.

    maps, refs: (N, H, W) canonical maps (non-negative, max 1; all-zero allowed).
    names: measures to run (default: all registered). prefix: prepended to each key,
    e.g. "early_". `wasserstein` overrides `options.wasserstein` for this call.
    Returns {prefix + name: (N,) float64}, in the order of `names`.
    """
    m, r = _check_pair(maps, refs)
    opts = options or DEFAULT_OPTIONS
    if wasserstein is not None:
        opts = replace(opts, wasserstein=wasserstein)
    chosen = list(MEASURES) if names is None else list(names)
    unknown = [n for n in chosen if n not in MEASURES]
    if unknown:
        raise KeyError(f"unknown measure(s) {unknown}; registered: {list(MEASURES)}")
    out: dict[str, np.ndarray] = {}
    for name in chosen:
        val = np.asarray(MEASURES[name].fn(m, r, opts), dtype=np.float64)
        if val.shape != (m.shape[0],):
            raise ValueError(f"measure {name!r} returned shape {val.shape}, expected ({m.shape[0]},)")
        out[prefix + name] = val
    return out


def measure_direction(name: str) -> bool:
    """True when a higher value of the (possibly prefixed: `early_iou`, `crm_iou`) measure
    means more similar."""
    return _lookup(name).higher_is_better


def measure_of(name: str) -> str | None:
    """The registered measure a score name applies (`iou` for `iou`, `early_iou`, `crm_iou`;
    the longest registered name that ends it after a `_`), or None for any other score."""
    try:
        return _lookup(name).name
    except KeyError:
        return None


def binarise(maps: np.ndarray, level: float = DEFAULT_OPTIONS.binary_level) -> np.ndarray:
    """(N, H, W) -> (N, H, W) bool: value >= level * the map's max; an all-zero map -> empty mask."""
    peak = maps.reshape(maps.shape[0], -1).max(axis=1)[:, None, None]
    return (maps >= level * peak) & (peak > 0)


def to_distribution(maps: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """(N, H, W) -> (N, H*W) float64 of unit mass: (m + epsilon) / sum; an all-zero map -> uniform."""
    flat = np.maximum(maps.reshape(maps.shape[0], -1).astype(np.float64), 0.0) + epsilon
    total = flat.sum(axis=1, keepdims=True)
    uniform = np.full_like(flat, 1.0 / flat.shape[1])
    return np.where(total > 0, flat / np.where(total > 0, total, 1.0), uniform)


# --- the seven measures --------------------------------------------------------------------

@register_measure("iou", higher_is_better=True, ideal=1.0,
                  description="intersection over union of the maps binarised at binary_level x max")
def iou(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """|A & B| / |A | B| of the binarised maps; 1.0 when both masks are empty."""
    a, b = binarise(maps, options.binary_level), binarise(refs, options.binary_level)
    inter = (a & b).sum(axis=(1, 2)).astype(np.float64)
    union = (a | b).sum(axis=(1, 2)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


@register_measure("dice", higher_is_better=True, ideal=1.0,
                  description="Dice coefficient of the maps binarised at binary_level x max")
def dice(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """2 |A & B| / (|A| + |B|) of the binarised maps; 1.0 when both masks are empty."""
    a, b = binarise(maps, options.binary_level), binarise(refs, options.binary_level)
    inter = (a & b).sum(axis=(1, 2)).astype(np.float64)
    size = (a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))).astype(np.float64)
    return np.where(size > 0, 2.0 * inter / np.maximum(size, 1.0), 1.0)


# skimage.metrics.structural_similarity defaults, kept identical so values can be cross-checked
_SSIM_WIN, _SSIM_K1, _SSIM_K2, _SSIM_RANGE = 7, 0.01, 0.03, 1.0


@register_measure("ssim", higher_is_better=True, ideal=1.0,
                  description="mean structural similarity, 7x7 uniform window, data range 1")
def ssim(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Mean SSIM as skimage computes it (uniform 7x7, K1=0.01, K2=0.03, sample covariance,
    reflect borders, 3-cell border cropped before the mean), for the whole batch at once."""
    x, y = maps.astype(np.float64), refs.astype(np.float64)
    if min(x.shape[1:]) < _SSIM_WIN:
        raise ValueError(f"ssim needs maps of at least {_SSIM_WIN}x{_SSIM_WIN}, got {x.shape[1:]}")
    size = (1, _SSIM_WIN, _SSIM_WIN)  # no smoothing across the batch axis

    def filt(z: np.ndarray) -> np.ndarray:
        return uniform_filter(z, size=size, mode="reflect")

    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    n_win = _SSIM_WIN ** 2
    cov_norm = n_win / (n_win - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (_SSIM_K1 * _SSIM_RANGE) ** 2, (_SSIM_K2 * _SSIM_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (_SSIM_WIN - 1) // 2
    return s[:, pad:-pad, pad:-pad].mean(axis=(1, 2))


@register_measure("cosine", higher_is_better=True, ideal=1.0,
                  description="cosine of the angle between the flattened maps")
def cosine(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """<a, b> / (|a| |b|); 1.0 when both maps are all zero, 0.0 when only one is."""
    a, b = _flat(maps), _flat(refs)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("nc,nc->n", a, b)
    both_zero = (na == 0) & (nb == 0)
    val = dot / np.where((na > 0) & (nb > 0), na * nb, 1.0)
    return np.where(both_zero, 1.0, np.clip(val, -1.0, 1.0))


@register_measure("pearson", higher_is_better=True, ideal=1.0,
                  description="Pearson correlation of the flattened maps")
def pearson(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Pearson r of the cells; 1.0 when both maps are constant, 0.0 when only one is."""
    a, b = _flat(maps), _flat(refs)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    # a map is "constant" when its spread is at rounding level of its values (float32 input)
    tol = 1e-12 * np.sqrt(a.shape[1])
    fa, fb = na <= tol, nb <= tol
    val = np.einsum("nc,nc->n", a, b) / np.where(fa | fb, 1.0, na * nb)
    return np.where(fa & fb, 1.0, np.where(fa | fb, 0.0, np.clip(val, -1.0, 1.0)))


@register_measure("kl", higher_is_better=False, ideal=0.0,
                  description="KL(map || ref) of the maps as distributions (+ kl_epsilon per cell)")
def kl(maps: np.ndarray, refs: np.ndarray, options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """sum p log(p / q), p = map, q = ref, each (m + eps) / sum(m + eps).

    The direction charges the map's mass where the reference has little: a model
    attending to a region the reference ignores is the failure a gate must see.
    """
    p = to_distribution(maps, options.kl_epsilon)
    q = to_distribution(refs, options.kl_epsilon)
    return np.maximum((p * (np.log(p) - np.log(q))).sum(axis=1), 0.0)


@register_measure("wasserstein", higher_is_better=False, ideal=0.0,
                  description="earth mover's distance of the unit-mass maps in [0,1]^2 coordinates")
def wasserstein(maps: np.ndarray, refs: np.ndarray,
                options: MeasureOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """W1 between the maps as unit-mass distributions on cell centres ((i + 0.5) / H, (j + 0.5) / W),
    Euclidean ground cost; an all-zero map counts as uniform. Mode from `options.wasserstein`:
    "exact" = POT `ot.emd2` per pair; "fast" = ~pi/2 x the sliced W1 over
    `options.wasserstein_directions` directions, vectorised over the batch: never above the
    exact value, equal to it for translated maps (see docs/measures.md for measured error)."""
    a, b = to_distribution(maps), to_distribution(refs)
    h, w = maps.shape[1:]
    if options.wasserstein == "exact":
        return _wasserstein_exact(a, b, h, w)
    return _wasserstein_sliced(a, b, h, w, int(options.wasserstein_directions))


MEASURE_NAMES: tuple[str, ...] = tuple(MEASURES)


# --- helpers -------------------------------------------------------------------------------

def _lookup(name: str) -> Measure:
    """The measure behind `name`: itself, or `<prefix>_<measure>` (early maps, or the maps of
    another attribution method), the longest registered measure name winning."""
    if name in MEASURES:
        return MEASURES[name]
    found = [m for m in MEASURES if name.endswith("_" + m) and len(name) > len(m) + 1]
    if found:
        return MEASURES[max(found, key=len)]
    raise KeyError(f"unknown measure {name!r}; registered: {list(MEASURES)} (as themselves or "
                   f"after a prefix such as {PREFIXES[0]!r} or '<method>_')")


def _check_pair(maps: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, r = np.asarray(maps), np.asarray(refs)
    if m.ndim != 3 or m.shape != r.shape:
        raise ValueError(f"maps and refs must both be (N, H, W) of one shape, got {m.shape} and {r.shape}")
    m, r = m.astype(np.float64), r.astype(np.float64)
    if not (np.isfinite(m).all() and np.isfinite(r).all()):
        raise ValueError("maps and refs must be finite")
    return m, r


def _flat(maps: np.ndarray) -> np.ndarray:
    return maps.reshape(maps.shape[0], -1).astype(np.float64)


def _cell_centres(h: int, w: int) -> np.ndarray:
    """(H*W, 2) (row, col) centres in [0, 1]^2, row-major like `reshape(N, -1)`."""
    rows, cols = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def _wasserstein_exact(a: np.ndarray, b: np.ndarray, h: int, w: int) -> np.ndarray:
    import ot  # POT; imported here so the fast path never pays for it

    cost = _exact_cost(h, w)
    return np.array([float(ot.emd2(a[i], b[i], cost)) for i in range(a.shape[0])])


@lru_cache(maxsize=8)
def _exact_cost(h: int, w: int) -> np.ndarray:
    c = _cell_centres(h, w)
    cost = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(axis=-1))
    cost.setflags(write=False)
    return cost


@lru_cache(maxsize=8)
def _slices(h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-major projection tables: `order[j, d]` is the cell of rank j along direction d
    (C, K), and `gaps[j, d]` the gap from that sorted projected centre to the next (C*K,), 0
    after the last, pre-multiplied by the lower-bound scale. Positions are fixed by the grid,
    so this runs once per (grid, K)."""
    theta = (np.arange(k) + 0.5) * np.pi / k
    proj = _cell_centres(h, w) @ np.stack([np.cos(theta), np.sin(theta)])  # (C, K)
    order = np.argsort(proj, axis=0, kind="stable")  # (C, K)
    gaps = np.zeros(order.shape)
    gaps[:-1] = np.diff(np.take_along_axis(proj, order, axis=0), axis=0)
    gaps = gaps.ravel() * _direction_scale(k)
    order.setflags(write=False)
    gaps.setflags(write=False)
    return order, gaps


def _wasserstein_sliced(a: np.ndarray, b: np.ndarray, h: int, w: int, k: int) -> np.ndarray:
    # 1-D W1 along a direction = integral of |CDF_a - CDF_b|: a running sum over the sorted
    # cells of (a - b); the gaps carry the scale of `_direction_scale`. The running sum goes
    # rank by rank over a (C, K*n) block, one vectorised add of K*n values per rank: numpy's
    # cumsum along a short last axis is a scalar loop, ~3x slower for these shapes.
    order, gaps = _slices(h, w, k)
    c = a.shape[1]
    diff_t = np.ascontiguousarray((a - b).T)  # (C, N)
    out = np.empty(a.shape[0])
    chunk = max(1, (1 << 18) // (k * c))  # a few MB per step: stays in cache
    for s in range(0, a.shape[0], chunk):
        cdf = diff_t[:, s:s + chunk][order].reshape(c, -1)  # (C, K*n): rank, (direction, image)
        for j in range(1, c):
            np.add(cdf[j], cdf[j - 1], out=cdf[j])
        np.abs(cdf, out=cdf)
        out[s:s + chunk] = gaps @ cdf.reshape(c * k, -1)
    return out


def _direction_scale(k: int) -> float:
    """1 / max over v of mean_k |<theta_k, v/|v|>|. Any transport plan moves mass m by v at cost
    m|v| and shifts each projection by at most |<theta_k, v>|, so scaled sliced W1 <= W1 for
    every pair; it is ~pi/(2K) (the continuous average 2/pi), exact for translations up to the
    O(1/K^2) ripple of the K evenly spaced directions."""
    theta = (np.arange(k) + 0.5) * np.pi / k
    phi = np.linspace(0.0, np.pi / k, 4097)  # the mean is periodic in phi with period pi/K
    ripple = np.abs(np.cos(theta[None, :] - phi[:, None])).mean(axis=1).max()
    return float(1.0 / (ripple * (1 + 1e-9)) / k)
