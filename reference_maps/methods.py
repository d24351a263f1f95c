"""Per-class reference maps of one more attribution method (CRM, saliency, ...), beside Grad-CAM.

For each class: the mean raw map at the method's own resolution, float64 (CRM's
class-specific ROI map: the signed mean of the per-image maps), and the mean canonical map
on the store's grid (what the seven measures compare with, as for Grad-CAM). Streaming and
exactly mergeable, like the rest of the store.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from .canonical import to_grid
from .stats import GroupedMoments

__all__ = ["MethodMaps", "method_key"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def method_key(name: str) -> str:
    """A method name as an array key / score prefix: `+` -> `p`, other non-word chars -> `_`
    (`gradcam++` -> `gradcampp`, `crm` -> `crm`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    return _UNSAFE.sub("_", name.replace("+", "p"))


class MethodMaps:
    """One method's per-class map moments: `raw` over (h, w) maps as given (any sign; the
    shape is fixed by the first batch) and `canon` over their canonical form on `grid`."""

    def __init__(self, num_classes: int, grid: tuple[int, int]) -> None:
        self.num_classes = int(num_classes)
        self.grid = (int(grid[0]), int(grid[1]))
        self.shape: tuple[int, int] | None = None
        self.raw: GroupedMoments | None = None
        self.canon = GroupedMoments(self.num_classes, self.grid[0] * self.grid[1])

    def update(self, labels: np.ndarray, maps: np.ndarray) -> MethodMaps:
        """Fold in raw maps (N, h, w) of the images with class `labels` (N,)."""
        maps = np.asarray(maps, dtype=np.float64)
        if maps.ndim != 3 or maps.shape[0] != len(labels):
            raise ValueError(f"method maps must be (N={len(labels)}, h, w), got {maps.shape}")
        if not np.isfinite(maps).all():
            raise ValueError("method maps hold NaN or inf")
        if self.raw is None:
            self.shape = (int(maps.shape[1]), int(maps.shape[2]))
            self.raw = GroupedMoments(self.num_classes, self.shape[0] * self.shape[1])
        if maps.shape[1:] != self.shape:
            raise ValueError(f"method maps are {maps.shape[1:]}, earlier batches {self.shape}")
        self.raw.update(labels, maps.reshape(len(labels), -1))
        self.canon.update(labels, to_grid(maps, self.grid).reshape(len(labels), -1))
        return self

    def merge(self, other: MethodMaps) -> MethodMaps:
        """Fold in another accumulator of the same method (exact)."""
        if other.raw is None:
            return self
        if self.raw is None:
            self.shape, self.raw = other.shape, GroupedMoments(self.num_classes, other.raw.dim)
        if other.shape != self.shape or other.grid != self.grid:
            raise ValueError(f"cannot merge method maps of shape {other.shape} into {self.shape}")
        self.raw.merge(other.raw)
        self.canon.merge(other.canon)
        return self

    @property
    def counts(self) -> np.ndarray:
        """(K,) int64 images seen per class."""
        return self.canon.count_.copy()

    @property
    def raw_mean(self) -> np.ndarray:
        """(K, h, w) float64 per-class mean raw map (NaN for a class without images)."""
        if self.raw is None:
            raise ValueError("no maps of this method yet (call update first)")
        out = np.where(self.raw.count_[:, None] > 0, self.raw.mean_, np.nan)
        return out.reshape(-1, *self.shape)

    @property
    def reference(self) -> np.ndarray:
        """(K, G_h, G_w) float32 per-class mean canonical map (NaN without images)."""
        out = np.where(self.canon.count_[:, None] > 0, self.canon.mean_, np.nan)
        return out.reshape(-1, *self.grid).astype(np.float32)

    def to_arrays(self, method: str) -> dict[str, np.ndarray]:
        """With prefix `method.<method_key(method)>.`: `shape` (2,), `raw_mean`/`raw_m2`
        (K, h*w), `mean`/`m2` (K, G_h*G_w), all float64 but the shape; counts are the store's."""
        prefix = _prefix(method)
        if self.raw is None:
            raise ValueError("no maps of this method yet (call update first)")
        return {f"{prefix}shape": np.array(self.shape, dtype=np.int64),
                f"{prefix}raw_mean": self.raw.mean_.copy(), f"{prefix}raw_m2": self.raw.m2_.copy(),
                f"{prefix}mean": self.canon.mean_.copy(), f"{prefix}m2": self.canon.m2_.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], method: str, counts: np.ndarray,
                    grid: tuple[int, int]) -> MethodMaps:
        """Rebuild from `to_arrays(method)`; ValueError when an array is missing or misshapen."""
        try:
            return cls._from_arrays(arrays, _prefix(method), counts, grid)
        except ValueError as exc:
            raise ValueError(f"the reference maps of method {method!r} are missing or damaged: "
                             f"{exc}") from None

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str, counts: np.ndarray,
                     grid: tuple[int, int]) -> MethodMaps:
        k = len(counts)
        missing = [s for s in ("shape", "raw_mean", "raw_m2", "mean", "m2") if prefix + s not in arrays]
        if missing:
            raise ValueError(f"no arrays {[prefix + s for s in missing]}")
        shape = tuple(int(v) for v in np.asarray(arrays[f"{prefix}shape"]).reshape(-1))
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{prefix}shape is {shape}, expected (h, w)")
        self = cls(k, grid)
        self.shape, self.raw = (shape[0], shape[1]), GroupedMoments(k, shape[0] * shape[1])
        for moments, part, dim in ((self.raw, "raw_", shape[0] * shape[1]),
                                   (self.canon, "", self.grid[0] * self.grid[1])):
            mean = np.asarray(arrays[f"{prefix}{part}mean"])
            m2 = np.asarray(arrays[f"{prefix}{part}m2"])
            if mean.shape != (k, dim) or m2.shape != (k, dim) or mean.dtype.kind != "f":
                raise ValueError(f"{prefix}{part}mean/m2 are {mean.shape}/{m2.shape}, expected ({k}, {dim})")
            moments.count_ = np.asarray(counts, dtype=np.int64).copy()
            moments.mean_ = mean.astype(np.float64).copy()
            moments.m2_ = m2.astype(np.float64).copy()
        return self


def _prefix(method: str) -> str:
    return f"method.{method_key(method)}."
