"""Feature references at several depths: class-conditional Gaussians with a tied covariance, and a KNN bank.

Streaming and exactly mergeable: per-class moments (Chan et al.) per depth, and a
bottom-B sample of L2-normalised penultimate features keyed by a hash of each row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .stats import GroupedMoments, oas_shrink

__all__ = ["FeatureReference", "DEFAULT_BANK_SIZE", "KNN_K", "JOINT_MAX_DIM"]

DEFAULT_BANK_SIZE = 4096
KNN_K = 50
#: the joint (all conv blocks concatenated) Gaussian is kept when its vector has at most this
#: many values (channel means, and standard deviations where the probe gives them): its
#: per-class moments are (K, C, C) float64
JOINT_MAX_DIM = 1024


class FeatureReference:
    """Per depth d (channel means of every conv block, then the penultimate features):
    per-class moments `moments[d]` (K, C_d) -> tied (pooled within-class) OAS-shrunk
    covariance, as Lee et al. (2018); plus a KNN bank (B, D) float32 of L2-normalised
    penultimate features (Sun et al. 2022), the B rows with the smallest seeded hash keys.

    A bottom-B sample by key is a uniform sample of the distinct rows, independent of the
    order rows arrive in, and the bottom-B of a union is the bottom-B of the parts' samples:
    merging is exact.

    `joint` (default: with two or more conv blocks and a vector of at most `JOINT_MAX_DIM`
    values): also keep per-class moments of the blocks' channel statistics concatenated
    (`joint_moments`, depth index `joint_depth`), so one tied Gaussian sees the correlations
    *between* depths that the per-depth distances and their sum ignore. `joint_std`: that
    vector holds each block's per-channel spatial standard deviations after its channel means
    (`joint_vector`); the spread of a channel's activation over the image separates unseen
    classes and shifted images better than its mean alone (docs/gate.md, round 6). A
    reference loaded without joint arrays has none; one saved before round 6 has means only.
    """

    def __init__(self, num_classes: int, dims: Sequence[int], bank_size: int = DEFAULT_BANK_SIZE,
                 seed: int = 0, joint: bool | None = None, joint_std: bool = False) -> None:
        if len(dims) < 1:
            raise ValueError("need at least the penultimate features")
        self.num_classes = int(num_classes)
        self.dims = [int(d) for d in dims]
        self.bank_size, self.seed = int(bank_size), int(seed)
        self.moments = [GroupedMoments(self.num_classes, d, full=True) for d in self.dims]
        self.joint_std = bool(joint_std)
        width = sum(self.dims[:-1]) * (2 if self.joint_std else 1)
        if joint is None:
            joint = len(self.dims) >= 3 and width <= JOINT_MAX_DIM
        self.joint_moments = GroupedMoments(self.num_classes, width, full=True) if joint else None
        self.bank_keys = np.zeros(0, dtype=np.uint64)
        self.bank = np.zeros((0, self.dims[-1]), dtype=np.float32)
        self._cache: dict[int | tuple[str, int], tuple] = {}  # whitenings, null moments

    def update(self, labels: np.ndarray, depths: Sequence[np.ndarray],
               block_stds: Sequence[np.ndarray] = ()) -> FeatureReference:
        """Fold in a batch: labels (N,), depths [(N, C_d) per depth; the last = penultimate];
        `block_stds` [(N, C_d) per conv block], required with `joint_std`."""
        if len(depths) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} feature arrays, got {len(depths)}")
        for m, x in zip(self.moments, depths):
            x = np.asarray(x, dtype=np.float64)
            if x.shape != (len(labels), m.dim) or not np.isfinite(x).all():
                raise ValueError(f"features must be finite (N={len(labels)}, {m.dim}), got {x.shape}")
            m.update(labels, x)
        if self.joint_moments is not None:
            joint = self.joint_vector(depths[:-1], block_stds)
            if not np.isfinite(joint).all():
                raise ValueError("block standard deviations must be finite")
            self.joint_moments.update(labels, joint)
        feats = _normalise(depths[-1])
        from calibration.conformal import hash_rows  # framework-free sibling

        self._offer(hash_rows(feats, self.seed), feats)
        self._cache.clear()
        return self

    def merge(self, other: FeatureReference) -> FeatureReference:
        """Fold in another reference built the same way; exact."""
        if (other.dims, other.num_classes, other.bank_size, other.seed, other.joint_moments is None,
                other.joint_std) != (self.dims, self.num_classes, self.bank_size, self.seed,
                                     self.joint_moments is None, self.joint_std):
            raise ValueError("cannot merge feature references of different shapes or seeds")
        for a, b in zip(self.moments, other.moments):
            a.merge(b)
        if self.joint_moments is not None:
            self.joint_moments.merge(other.joint_moments)
        self._offer(other.bank_keys, other.bank)
        self._cache.clear()
        return self

    # ------------------------------------------------------------------ scores
    @property
    def joint_depth(self) -> int | None:
        """The depth index of the joint Gaussian (`mahalanobis(joint_depth, joint_vector(...))`),
        None without one."""
        return None if self.joint_moments is None else len(self.dims)

    def joint_vector(self, blocks: Sequence[np.ndarray], stds: Sequence[np.ndarray] = ()) -> np.ndarray:
        """(N, W) float64 the joint Gaussian's vector: every conv block's (N, C_d) channel means,
        then (with `joint_std`) every block's (N, C_d) channel standard deviations."""
        n_blocks = len(self.dims) - 1
        if len(blocks) != n_blocks:
            raise ValueError(f"expected {n_blocks} block arrays, got {len(blocks)}")
        parts = list(blocks)
        if self.joint_std:
            if len(stds) != n_blocks:
                raise ValueError(f"this feature reference's joint Gaussian holds the conv blocks' channel "
                                 f"standard deviations: expected {n_blocks} arrays of them, got {len(stds)} "
                                 f"(a probe that does not compute them)")
            parts += list(stds)
        out = np.hstack([np.asarray(p, dtype=np.float64) for p in parts])
        if self.joint_moments is not None and out.shape[1] != self.joint_moments.dim:
            raise ValueError(f"the joint vector has {out.shape[1]} values, the reference "
                             f"{self.joint_moments.dim}")
        return out

    def mahalanobis(self, depth: int, x: np.ndarray) -> np.ndarray:
        """(N,) float64 min over classes of the squared Mahalanobis distance of (N, C_d) rows,
        tied covariance (Lee et al. 2018's confidence score, negated: higher = worse)."""
        mean_w, whiten = self._whitened(depth)
        z = np.asarray(x, dtype=np.float64) @ whiten
        d2 = (z * z).sum(1)[:, None] - 2 * z @ mean_w.T + (mean_w * mean_w).sum(1)[None]
        d2[:, self._moments(depth).count_ == 0] = np.inf  # an empty class is never the nearest
        return np.maximum(d2.min(axis=1), 0.0)

    def relative_mahalanobis(self, depth: int, x: np.ndarray, distance: np.ndarray | None = None) -> np.ndarray:
        """(N,) float64 relative Mahalanobis distance (Ren et al. 2021, "A simple fix to
        Mahalanobis distance for improving near-OOD detection"): `mahalanobis(depth, x)` minus
        the squared Mahalanobis distance to one Gaussian of all reference rows (their mean and
        OAS-shrunk total covariance, derived exactly from the per-class moments). Higher =
        worse; may be negative. The background term removes what every class shares (stroke
        mass, contrast), leaving the class-discriminative part. `distance`: `mahalanobis(depth,
        x)` when the caller has it already."""
        mean, whiten = self._background(depth)
        z = (np.asarray(x, dtype=np.float64) - mean) @ whiten
        return (self.mahalanobis(depth, x) if distance is None else distance) - (z * z).sum(axis=1)

    def null_moments(self, depth: int) -> tuple[float, float]:
        """(mean, sd) of the squared tied-covariance Mahalanobis distance of an in-distribution
        row to its own class mean, under the Gaussian model: tr(A) and sqrt(2 tr(A^2)), A the
        shrunk precision times the within-class covariance. Puts the depths' distances on one
        scale (`multilayer_mahalanobis`) from the moments alone, no second pass. Cached with the
        whitening (two (C, C) products: computing them per scored batch cost the gate about a
        tenth of a ResNet-18 forward pass)."""
        key = ("null", depth)
        if key not in self._cache:
            m = self._moments(depth)
            total = int(m.count_.sum())
            _, whiten = self._whitened(depth)
            a = whiten.T @ (m.m2_.sum(axis=0) / total) @ whiten  # similar to P Sigma_w: same traces
            self._cache[key] = (float(np.trace(a)), float(np.sqrt(2.0 * np.sum(a * a))))
        return self._cache[key]

    def multilayer_mahalanobis(self, blocks: Sequence[np.ndarray],
                               distances: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(N,) float64 sum over the conv blocks (every depth but the penultimate) of the
        standardised `mahalanobis` distance, (d - mean) / sd with `null_moments`: the summed
        z-scores of a multi-layer Mahalanobis detector (Lee et al. 2018 without input
        preprocessing or a learned weighting). Higher = worse. `distances`: the blocks'
        `mahalanobis` distances when the caller has them already."""
        if len(blocks) != len(self.dims) - 1 or (distances is not None and len(distances) != len(blocks)):
            raise ValueError(f"expected {len(self.dims) - 1} block arrays, got {len(blocks)}")
        out = np.zeros(len(blocks[0]) if blocks else 0, dtype=np.float64)
        for i, b in enumerate(blocks):
            mu, sd = self.null_moments(i)
            d = self.mahalanobis(i, b) if distances is None else distances[i]
            out += (d - mu) / (sd if sd > 0 else 1.0)
        return out

    def knn_distance(self, features: np.ndarray, k: int = KNN_K) -> np.ndarray:
        """(N,) float64 distance of each L2-normalised row to its k-th nearest bank row
        (Sun et al. 2022; higher = worse). One matrix product: |a - b|^2 = 2 - 2 a.b."""
        if len(self.bank) == 0:
            raise ValueError("the KNN bank is empty")
        k = min(int(k), len(self.bank))
        sim = _normalise(features).astype(np.float32) @ self.bank.T
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))

    # ------------------------------------------------------------------ persistence
    def to_arrays(self, prefix: str = "feat_") -> dict[str, np.ndarray]:
        """Plain arrays: dims, bank (B, D) float32, bank_keys (B,) uint64, and per depth d
        `d{d}_mean` (K, C_d), `d{d}_m2` (K, C_d, C_d); counts are the store's."""
        out = {f"{prefix}dims": np.array(self.dims, dtype=np.int64),
               f"{prefix}bank_size": np.array(self.bank_size, dtype=np.int64),
               f"{prefix}seed": np.array(self.seed, dtype=np.int64),
               f"{prefix}bank": self.bank.copy(), f"{prefix}bank_keys": self.bank_keys.copy(),
               f"{prefix}counts": self.moments[0].count_.copy()}
        for d, m in enumerate(self.moments):
            out[f"{prefix}d{d}_mean"] = m.mean_.copy()
            out[f"{prefix}d{d}_m2"] = m.m2_.copy()
        if self.joint_moments is not None:
            out[f"{prefix}joint_mean"] = self.joint_moments.mean_.copy()
            out[f"{prefix}joint_m2"] = self.joint_moments.m2_.copy()
            if self.joint_std:
                out[f"{prefix}joint_std"] = np.array(1, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], num_classes: int,
                    prefix: str = "feat_") -> FeatureReference | None:
        """Rebuild from `to_arrays()` output; None when the arrays hold no feature reference."""
        if f"{prefix}dims" not in arrays:
            return None
        dims = [int(d) for d in np.asarray(arrays[f"{prefix}dims"]).reshape(-1)]
        self = cls(num_classes, dims, int(arrays[f"{prefix}bank_size"]), int(arrays[f"{prefix}seed"]),
                   joint=f"{prefix}joint_mean" in arrays,
                   joint_std=f"{prefix}joint_std" in arrays and bool(np.asarray(arrays[f"{prefix}joint_std"])))
        counts = np.asarray(arrays[f"{prefix}counts"], dtype=np.int64)
        named = [(f"d{d}", m) for d, m in enumerate(self.moments)]
        if self.joint_moments is not None:
            named.append(("joint", self.joint_moments))
        for d, m in named:
            mean = np.asarray(arrays[f"{prefix}{d}_mean"], dtype=np.float64)
            m2 = np.asarray(arrays[f"{prefix}{d}_m2"], dtype=np.float64)
            if mean.shape != (num_classes, m.dim) or m2.shape != (num_classes, m.dim, m.dim):
                raise ValueError(f"feature depth {d} arrays have shapes {mean.shape}, {m2.shape}")
            m.count_, m.mean_, m.m2_ = counts.copy(), mean.copy(), m2.copy()
        self.bank = np.asarray(arrays[f"{prefix}bank"], dtype=np.float32).copy()
        self.bank_keys = np.asarray(arrays[f"{prefix}bank_keys"], dtype=np.uint64).copy()
        if self.bank.shape != (len(self.bank_keys), dims[-1]) or len(self.bank_keys) > self.bank_size:
            raise ValueError(f"KNN bank has shape {self.bank.shape}")
        return self

    # ------------------------------------------------------------------ helpers
    def _moments(self, depth: int) -> GroupedMoments:
        if depth == len(self.dims) and self.joint_moments is not None:
            return self.joint_moments
        return self.moments[depth]

    def _offer(self, keys: np.ndarray, rows: np.ndarray) -> None:
        keys = np.concatenate([self.bank_keys, keys])
        rows = np.concatenate([self.bank, rows.astype(np.float32)])
        order = np.lexsort((np.arange(len(keys)), keys))[: self.bank_size]  # by key; stable
        self.bank_keys, self.bank = keys[order], rows[order]

    def _background(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean (C,), whitening matrix (C, C)) of one Gaussian of all rows at a depth: the
        pooled mean and the OAS-shrunk total covariance (within + between classes)."""
        key = -1 - depth
        if key not in self._cache:
            m = self._moments(depth)
            n = m.count_.astype(np.float64)
            total = n.sum()
            if total == 0:
                raise ValueError("the feature reference has no data yet")
            mean = (n[:, None] * m.mean_).sum(axis=0) / total
            dev = m.mean_ - mean
            scatter = m.m2_.sum(axis=0) + (n[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(axis=0)
            cov, _ = oas_shrink((scatter / total)[None], int(total))
            evals, evecs = np.linalg.eigh(cov[0])
            self._cache[key] = (mean, evecs / np.sqrt(np.maximum(evals, evals.max() * 1e-12))[None])
        return self._cache[key]

    def _whitened(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(class means whitened (K, C), whitening matrix (C, C)) of the tied covariance."""
        if depth not in self._cache:
            m = self._moments(depth)
            total = int(m.count_.sum())
            if total == 0:
                raise ValueError("the feature reference has no data yet")
            cov, _ = oas_shrink((m.m2_.sum(axis=0) / total)[None], total)
            evals, evecs = np.linalg.eigh(cov[0])
            whiten = evecs / np.sqrt(np.maximum(evals, evals.max() * 1e-12))[None]
            self._cache[depth] = (m.mean_ @ whiten, whiten)
        return self._cache[depth]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
