"""The reference store: per-class expected Grad-CAM and early maps, and early channel statistics.

Built streaming from probe outputs (constant memory in the number of images,
mergeable across workers), saved as a checksummed artifact directory.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .artifact import ArtifactError, read_artifact, write_artifact
from .features import JOINT_MAX_DIM, FeatureReference
from .methods import MethodMaps, method_key
from .stats import GroupedMoments, oas_shrink

__all__ = ["ReferenceStore", "STORE_KIND", "STORE_FORMAT_VERSION"]

STORE_KIND = "reference-store"
#: 2: the joint Gaussian may hold the conv blocks' channel standard deviations (`feat_joint_std`);
#: version 1 stores (channel means only) are still read
STORE_FORMAT_VERSION = 2
STORE_READ_VERSIONS = (1, 2)
_STATE_KEYS = ("counts", "cam_mean", "cam_m2", "early_mean", "early_m2", "stats_mean", "stats_m2")


class ReferenceStore:
    """Per-class references built from canonical maps and early channel statistics.

    Maps are canonical (see `reference_maps.canonical.to_grid`) on `grid` (G_h, G_w).
    Learned state is the sufficient statistics (counts, means, centred second moments,
    float64); every reference below is derived from it:

    counts (K,) int64; cam_reference, cam_std, early_reference, early_std (K, G_h, G_w)
    float32 (mean and population std per pixel); stats_mean (K, C) float64;
    stats_covariance, stats_precision (K, C, C) float64.

    A class with no images has NaN references and means (so anything compared with it
    scores NaN and fails closed). Covariances are OAS-shrunk; a class with fewer than
    `min_class_count` images (default max(10, ceil(C / 4))) uses the pooled
    within-class covariance instead (rows centred on their own class mean, pooled over
    all classes, OAS-shrunk with n = total images); `stats_pooled` says which.

    `methods`: further attribution methods whose per-class maps the store keeps beside
    Grad-CAM's (`method_reference`, `method_raw_mean`); each `update` gives their raw maps.
    """

    def __init__(self, classes: Sequence[str], grid: tuple[int, int] = (16, 16),
                 early_channels: int | None = None, metadata: Mapping[str, Any] | None = None,
                 *, min_class_count: int | None = None, methods: Sequence[str] = ()) -> None:
        self.classes = [str(c) for c in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be non-empty and unique, got {self.classes}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.metadata = dict(metadata or {})
        self.metadata_fingerprint  # fail early if metadata is not plain JSON
        self.early_channels = None if early_channels is None else int(early_channels)
        self._min_class_count = None if min_class_count is None else int(min_class_count)
        k, g = len(self.classes), self.grid[0] * self.grid[1]
        self._cam = GroupedMoments(k, g)
        self._early = GroupedMoments(k, g)
        self._stats: GroupedMoments | None = None
        if self.early_channels is not None:
            self._stats = GroupedMoments(k, self.early_channels, full=True)
        self._cache: dict[str, np.ndarray] = {}
        #: optional feature references at several depths (`reference_maps.features`)
        self.features: FeatureReference | None = None
        #: maps of further attribution methods, by method name (order kept)
        self.method_maps: dict[str, MethodMaps] = {m: MethodMaps(k, self.grid) for m in methods}
        if len({method_key(m) for m in self.method_maps}) != len(tuple(methods)):
            raise ValueError(f"method names must be distinct (also as array keys), got {list(methods)}")

    # ------------------------------------------------------------------ building
    def update(self, labels: np.ndarray, cam: np.ndarray, early_map: np.ndarray,
               early_stats: np.ndarray,
               depth_features: Sequence[np.ndarray] | None = None,
               maps: Mapping[str, np.ndarray] | None = None,
               block_stds: Sequence[np.ndarray] = ()) -> ReferenceStore:
        """Fold in a batch: labels (N,) int in [0, K), cam and early_map (N, G_h, G_w)
        canonical maps, early_stats (N, C). All values must be finite. `depth_features`:
        [(N, C_d) channel means of every conv block ..., (N, D) penultimate features],
        given for every batch or for none. `maps`: {method: raw (N, h, w) maps} for exactly
        the store's `methods`. `block_stds`: [(N, C_d) channel standard deviations of every
        conv block] where the probe computes them (the joint Gaussian then holds them too,
        when its vector fits `JOINT_MAX_DIM`); given from the first batch on or never."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        n = len(labels)
        if n and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got "
                             f"[{labels.min()}, {labels.max()}]")
        cam = self._check_maps("cam", cam, n)
        early_map = self._check_maps("early_map", early_map, n)
        early_stats = np.asarray(early_stats, dtype=np.float64)
        if early_stats.ndim != 2 or early_stats.shape[0] != n:
            raise ValueError(f"early_stats must be (N={n}, C), got {early_stats.shape}")
        if self._stats is None:
            self.early_channels = early_stats.shape[1]
            self._stats = GroupedMoments(len(self.classes), self.early_channels, full=True)
        if early_stats.shape[1] != self.early_channels:
            raise ValueError(f"early_stats has {early_stats.shape[1]} channels, the store "
                             f"{self.early_channels}")
        if not np.isfinite(early_stats).all():
            raise ValueError("early_stats holds NaN or inf")
        if set(maps or {}) != set(self.method_maps):
            raise ValueError(f"maps must be given for the store's methods {self.methods}, got "
                             f"{sorted(maps or {})}")
        for name, acc in self.method_maps.items():
            acc.update(labels, maps[name])
        self._cam.update(labels, cam.reshape(n, -1))
        self._early.update(labels, early_map.reshape(n, -1))
        self._stats.update(labels, early_stats)
        if depth_features is not None:
            if self.features is None:
                if self._cam.count_.sum() > n:
                    raise ValueError("depth_features must be given for every batch or none")
                dims = [np.shape(f)[1] for f in depth_features]
                self.features = FeatureReference(
                    len(self.classes), dims,
                    joint_std=len(block_stds) > 0 and 2 * sum(dims[:-1]) <= JOINT_MAX_DIM)
            self.features.update(labels, depth_features, block_stds)
        self._cache.clear()
        return self

    def merge(self, other: ReferenceStore) -> ReferenceStore:
        """Fold in another store built the same way (e.g. by another worker); exact."""
        if other.classes != self.classes or other.grid != self.grid:
            raise ValueError(f"cannot merge stores with different classes/grid: "
                             f"{other.classes} {other.grid} vs {self.classes} {self.grid}")
        if list(other.method_maps) != list(self.method_maps):
            raise ValueError(f"cannot merge stores of methods {other.methods} and {self.methods}")
        if other.metadata_fingerprint != self.metadata_fingerprint:
            raise ValueError(f"cannot merge stores with different metadata (fingerprint "
                             f"{other.metadata_fingerprint[:12]} vs {self.metadata_fingerprint[:12]})")
        if other._stats is None:
            return self
        if self._stats is None:
            self.early_channels = other.early_channels
            self._stats = GroupedMoments(len(self.classes), int(other.early_channels), full=True)
        if other.early_channels != self.early_channels:
            raise ValueError(f"cannot merge stores with {other.early_channels} and "
                             f"{self.early_channels} early channels")
        if self.features is None and other.features is not None and not self._cam.count_.any():
            o = other.features  # an empty store takes the other's depth layout
            self.features = FeatureReference(len(self.classes), o.dims, o.bank_size, o.seed,
                                             joint=o.joint_moments is not None, joint_std=o.joint_std)
        self._cam.merge(other._cam)
        self._early.merge(other._early)
        self._stats.merge(other._stats)
        if (self.features is None) != (other.features is None):
            raise ValueError("cannot merge a store with depth features into one without")
        if self.features is not None:
            self.features.merge(other.features)
        for name, acc in self.method_maps.items():
            acc.merge(other.method_maps[name])
        self._cache.clear()
        return self

    # ------------------------------------------------------------------ references
    @property
    def counts(self) -> np.ndarray:
        """(K,) int64 images seen per class."""
        return self._cam.count_.copy()

    @property
    def cam_reference(self) -> np.ndarray:
        """(K, G_h, G_w) float32 per-class mean canonical Grad-CAM map (NaN if no images)."""
        return self._map_mean(self._cam)

    @property
    def methods(self) -> tuple[str, ...]:
        """Names of the further attribution methods whose maps the store keeps."""
        return tuple(self.method_maps)

    def method_reference(self, method: str) -> np.ndarray:
        """(K, G_h, G_w) float32 per-class mean canonical map of `method` (as `cam_reference`)."""
        return self._method(method).reference

    def method_raw_mean(self, method: str) -> np.ndarray:
        """(K, h, w) float64 per-class mean raw map of `method` (signed where the method is)."""
        return self._method(method).raw_mean

    @property
    def cam_std(self) -> np.ndarray:
        """(K, G_h, G_w) float32 per-pixel population std of the Grad-CAM maps."""
        return self._map_std(self._cam)

    @property
    def early_reference(self) -> np.ndarray:
        """(K, G_h, G_w) float32 per-class mean canonical early-layer map."""
        return self._map_mean(self._early)

    @property
    def early_std(self) -> np.ndarray:
        """(K, G_h, G_w) float32 per-pixel population std of the early maps."""
        return self._map_std(self._early)

    @property
    def stats_mean(self) -> np.ndarray:
        """(K, C) float64 per-class mean of the early channel statistics (NaN if no images)."""
        s = self._need_stats()
        return np.where(s.count_[:, None] > 0, s.mean_, np.nan)

    @property
    def min_class_count(self) -> int:
        """Fewest images a class needs for its own covariance (else the pooled one)."""
        if self._min_class_count is not None:
            return self._min_class_count
        return max(10, math.ceil(self._need_stats().dim / 4))

    @property
    def stats_pooled(self) -> np.ndarray:
        """(K,) bool: which classes use the pooled within-class covariance."""
        return self._need_stats().count_ < self.min_class_count

    @property
    def stats_covariance(self) -> np.ndarray:
        """(K, C, C) float64 OAS-shrunk covariance (pooled for small classes, see class doc)."""
        if "cov" not in self._cache:
            s = self._need_stats()
            own, shrink = oas_shrink(np.nan_to_num(s.covariance(ddof=0)), s.count_)
            total = int(s.count_.sum())
            pooled_emp = s.m2_.sum(axis=0) / max(total, 1)
            pooled, pooled_shrink = oas_shrink(pooled_emp[None], total)
            small = self.stats_pooled
            cov = np.where(small[:, None, None], pooled, own)
            if total == 0:
                cov = np.full_like(cov, np.nan)
            self._cache["cov"] = cov
            self._cache["shrinkage"] = np.where(small, pooled_shrink[0], shrink)
        return self._cache["cov"].copy()

    @property
    def stats_shrinkage(self) -> np.ndarray:
        """(K,) float64 OAS shrinkage weight behind each class's covariance."""
        self.stats_covariance
        return self._cache["shrinkage"].copy()

    @property
    def stats_precision(self) -> np.ndarray:
        """(K, C, C) float64 inverse of `stats_covariance` (pseudo-inverse if singular,
        which OAS shrinkage prevents unless every statistic is constant)."""
        return self._precision().copy()

    def mahalanobis(self, early_stats: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(N,) float64 Mahalanobis distance sqrt(d^T P_k d), d = x - mean_k, of early_stats
        (N, C) to the statistics of each row's class in `classes` (N,) int."""
        x = np.asarray(early_stats, dtype=np.float64)
        classes = np.asarray(classes, dtype=np.int64)
        if x.ndim != 2 or x.shape != (len(classes), self._need_stats().dim):
            raise ValueError(f"early_stats must be (N={len(classes)}, C={self.early_channels}), "
                             f"got {x.shape}")
        if len(classes) and (classes.min() < 0 or classes.max() >= len(self.classes)):
            raise ValueError(f"classes must lie in [0, {len(self.classes)})")
        d = x - self.stats_mean[classes]
        prec = self._precision()
        out = np.empty(len(classes), dtype=np.float64)
        for k in np.unique(classes):  # one matrix product per class present
            rows = classes == k
            dk = d[rows]
            out[rows] = np.einsum("nc,cd,nd->n", dk, prec[k], dk)
        return np.sqrt(np.maximum(out, 0.0))

    # ------------------------------------------------------------------ persistence
    @property
    def metadata_fingerprint(self) -> str:
        """sha256 of the metadata as canonical JSON: stores merge only when these agree."""
        try:
            text = json.dumps(self.metadata, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"store metadata must be plain JSON: {exc}") from exc
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sufficient statistics as plain arrays (counts int64, the rest float64):
        counts (K,), cam_mean/cam_m2/early_mean/early_m2 (K, G_h*G_w), stats_mean (K, C),
        stats_m2 (K, C, C)."""
        s = self._need_stats()
        out = {"counts": self._cam.count_.copy(),
               "cam_mean": self._cam.mean_.copy(), "cam_m2": self._cam.m2_.copy(),
               "early_mean": self._early.mean_.copy(), "early_m2": self._early.m2_.copy(),
               "stats_mean": s.mean_.copy(), "stats_m2": s.m2_.copy()}
        if self.features is not None:  # optional: `feat_*` arrays (FeatureReference.to_arrays)
            out.update(self.features.to_arrays())
        for name, acc in self.method_maps.items():  # `method.<key>.*` (MethodMaps.to_arrays)
            out.update(acc.to_arrays(name))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], classes: Sequence[str],
                    grid: tuple[int, int], metadata: Mapping[str, Any] | None = None, *,
                    min_class_count: int | None = None,
                    methods: Sequence[str] = ()) -> ReferenceStore:
        """Rebuild a store from `to_arrays()` output (shapes and dtypes checked); `methods`:
        the further methods it holds maps of (a missing one is a ValueError naming it)."""
        missing = [k for k in _STATE_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"reference store arrays lack {missing}")
        k, g = len(classes), int(grid[0]) * int(grid[1])
        c = int(np.shape(arrays["stats_mean"])[-1]) if np.ndim(arrays["stats_mean"]) == 2 else -1
        want = {"counts": (k,), "cam_mean": (k, g), "cam_m2": (k, g), "early_mean": (k, g),
                "early_m2": (k, g), "stats_mean": (k, c), "stats_m2": (k, c, c)}
        for key, shape in want.items():
            arr = np.asarray(arrays[key])
            kind = "i" if key == "counts" else "f"
            if arr.shape != shape or arr.dtype.kind != kind:
                raise ValueError(f"reference store array {key!r} is {arr.dtype} {arr.shape}, "
                                 f"expected {'int' if kind == 'i' else 'float'} {shape}")
        store = cls(classes, grid, early_channels=c, metadata=metadata,
                    min_class_count=min_class_count, methods=methods)
        counts = np.asarray(arrays["counts"], dtype=np.int64).copy()
        for moments, prefix in ((store._cam, "cam"), (store._early, "early"),
                                (store._stats, "stats")):
            moments.count_ = counts.copy()
            moments.mean_ = np.asarray(arrays[f"{prefix}_mean"], dtype=np.float64).copy()
            moments.m2_ = np.asarray(arrays[f"{prefix}_m2"], dtype=np.float64).copy()
        store.features = FeatureReference.from_arrays(arrays, k)
        if store.features is not None and not np.array_equal(store.features.moments[0].count_, counts):
            raise ValueError("feature reference counts differ from the store's")
        for name in store.method_maps:  # a ValueError names a missing or damaged method
            store.method_maps[name] = MethodMaps.from_arrays(arrays, name, counts, store.grid)
        return store

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write the store as a `reference-store` artifact (format version 2); an existing
        store at `path` is replaced only with `overwrite`, any other folder never."""
        write_artifact(path, kind=STORE_KIND, format_version=STORE_FORMAT_VERSION, overwrite=overwrite,
                       arrays={"moments": self.to_arrays()},
                       manifest={"classes": self.classes, "grid": list(self.grid),
                                 "early_channels": self.early_channels,
                                 "min_class_count": self._min_class_count,
                                 "methods": list(self.method_maps),
                                 "metadata": self.metadata,
                                 "metadata_fingerprint": self.metadata_fingerprint,
                                 "counts": [int(v) for v in self._cam.count_]})

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             expected_fingerprint: str | None = None) -> ReferenceStore:
        """Read a saved store; `ArtifactError` if damaged, of another version, or (with
        `expected_fingerprint`) built for another model."""
        art = read_artifact(path, kind=STORE_KIND, supported_versions=list(STORE_READ_VERSIONS))
        m = art.manifest
        metadata = m.get("metadata") or {}
        if expected_fingerprint is not None:
            found = metadata.get("model_fingerprint")
            if found != expected_fingerprint:
                raise ArtifactError(
                    f"the reference store at {path} was built for another model (store "
                    f"fingerprint {str(found)[:12]}, this model {expected_fingerprint[:12]})")
        if "moments" not in art.arrays:
            raise ArtifactError(f"the reference store at {path} has no moments.npz")
        try:
            return cls.from_arrays(art.arrays["moments"], m["classes"], tuple(m["grid"]),
                                   metadata, min_class_count=m.get("min_class_count"),
                                   methods=m.get("methods", ()))
        except (KeyError, ValueError) as exc:
            raise ArtifactError(f"the reference store at {path} is inconsistent: {exc}") from exc

    def __repr__(self) -> str:
        return (f"ReferenceStore(classes={self.classes}, grid={self.grid}, "
                f"early_channels={self.early_channels}, counts={self.counts.tolist()})")

    # ------------------------------------------------------------------ helpers
    def _check_maps(self, name: str, maps: np.ndarray, n: int) -> np.ndarray:
        maps = np.asarray(maps)
        if maps.shape != (n, *self.grid):
            raise ValueError(f"{name} must be (N={n}, {self.grid[0]}, {self.grid[1]}) canonical "
                             f"maps (see reference_maps.canonical.to_grid), got {maps.shape}")
        if not np.isfinite(maps).all():
            raise ValueError(f"{name} holds NaN or inf")
        return maps

    def _method(self, method: str) -> MethodMaps:
        try:
            return self.method_maps[method]
        except KeyError:
            raise KeyError(f"the store holds no maps of method {method!r}, only of {self.methods}") from None

    def _need_stats(self) -> GroupedMoments:
        if self._stats is None:
            raise ValueError("the store has no data yet (call update first)")
        return self._stats

    def _map_mean(self, m: GroupedMoments) -> np.ndarray:
        out = np.where(m.count_[:, None] > 0, m.mean_, np.nan)
        return out.reshape(-1, *self.grid).astype(np.float32)

    def _map_std(self, m: GroupedMoments) -> np.ndarray:
        return np.sqrt(m.variance()).reshape(-1, *self.grid).astype(np.float32)

    def _precision(self) -> np.ndarray:
        if "prec" not in self._cache:
            cov = self.stats_covariance
            if np.isnan(cov).any():
                self._cache["prec"] = np.full_like(cov, np.nan)
            else:
                try:
                    self._cache["prec"] = np.linalg.inv(cov)
                except np.linalg.LinAlgError:  # only if every statistic is constant
                    self._cache["prec"] = np.linalg.pinv(cov, hermitian=True)
        return self._cache["prec"]
