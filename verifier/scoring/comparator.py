"""Comparator: scores a batch of probe results against the reference store of their class.

Names: the seven measures on Grad-CAM maps (`iou` ... `wasserstein`), the same on the maps
of every further method the store holds (`crm_iou` ...; `verifier.scoring.attention`) and on
early maps (`early_iou` ...), `early_mahalanobis` on early channel statistics, and
where the store holds depth features: `feat_conv<i>_mahalanobis` (channel means of conv
block i), `feat_multilayer_mahalanobis`, `penultimate_mahalanobis`,
`penultimate_relative_mahalanobis`, `knn`, and the model's own `msp` and `energy`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import logsumexp, softmax

from reference_maps.canonical import to_grid
from reference_maps.store import ReferenceStore
from verifier.probe.base import ProbeResult
from verifier.scoring.attention import score_prefix
from verifier.scoring.measures import MEASURES, compare_maps, measure_direction

__all__ = ["Comparator", "ATTENTION_MEASURES", "FAMILIES", "score_family", "higher_is_worse",
           "depth_scores", "combine_group", "RELATIVE_SCORES", "COMBINED_SCORES", "is_combined"]

#: families of checks, in the order `reasons` names them
FAMILIES: tuple[str, ...] = ("garbage", "attention", "early_features", "features", "output")

#: depth scores added by issue 12's second round, after `penultimate_mahalanobis` (a bundle
#: built before them has none: the gate keeps to the bundle's own score names)
DEPTH_EXTRA: tuple[str, ...] = ("penultimate_relative_mahalanobis", "feat_multilayer_mahalanobis")

#: scores of the joint Gaussian of all conv blocks' channel means (issue 12, third round), where
#: the store keeps one (`FeatureReference.joint_moments`): a store without it scores none
JOINT_SCORES: tuple[str, ...] = ("feat_joint_mahalanobis", "feat_joint_relative_mahalanobis")

#: distances relative to one class-agnostic background Gaussian (Ren et al. 2021): the
#: in-distribution combination's own group (`combine_group`; docs/gate.md, round 4)
RELATIVE_SCORES: tuple[str, ...] = ("penultimate_relative_mahalanobis", "feat_joint_relative_mahalanobis")

#: what the default in-distribution combination takes: whole families and single scores
#: (docs/gate.md, round 5: the deeper feature statistics, the garbage head and the two early-map
#: scores that carry pixel-level shifts; the output scores and the rest stay reported, not combined)
COMBINED_SCORES: tuple[str, ...] = ("features", "garbage", "early_wasserstein", "early_mahalanobis")

#: the seven built-in measures, in report order: what a bundle without a `measures` list used
ATTENTION_MEASURES: tuple[str, ...] = ("iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein")


class Comparator:
    """Scores (N,) per measure for a `ProbeResult` against `store`'s class references.

    measures / early_measures: the measures to run (default: every registered measure, in
    registration order; a bundle passes the list it was built with). The Grad-CAM map comes
    with the result; the maps of the store's further methods (`store.methods`) are given
    to `score` (`verifier.scoring.attention.MethodPass`)."""

    def __init__(self, store: ReferenceStore, measures: Sequence[str] | None = None,
                 early_measures: Sequence[str] | None = None) -> None:
        self.store = store
        self.measures = tuple(MEASURES) if measures is None else tuple(measures)
        self.early_measures = self.measures if early_measures is None else tuple(early_measures)
        unknown = [m for m in (*self.measures, *self.early_measures) if m not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; registered: {sorted(MEASURES)}")

    @property
    def names(self) -> tuple[str, ...]:
        """Score names this comparator produces, in order."""
        methods = tuple(f"{score_prefix(k)}{m}" for k in self.store.methods for m in self.measures)
        base = (*self.measures, *methods, *(f"early_{m}" for m in self.early_measures),
                "early_mahalanobis")
        feats = self.store.features
        if feats is None:  # a store built before depth features: the original scores only
            return base
        blocks = tuple(f"feat_conv{i + 1}_mahalanobis" for i in range(len(feats.dims) - 1))
        joint = JOINT_SCORES if feats.joint_depth is not None else ()
        return (*base, *blocks, "penultimate_mahalanobis", *DEPTH_EXTRA, *joint, "knn", "msp", "energy")

    def canonical(self, result: ProbeResult) -> tuple[np.ndarray, np.ndarray]:
        """(cam, early_map) of a result on the store's grid, canonical form, (N, G, G) each."""
        return to_grid(result.cam, self.store.grid), to_grid(result.early_map, self.store.grid)

    def score(self, result: ProbeResult, classes: np.ndarray | None = None,
              maps: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every score for every image against the reference of `classes` (default: cam_class).
        `maps`: {method: raw (N, h, w) maps} of each of the store's further methods."""
        cls = np.asarray(result.cam_class if classes is None else classes, dtype=np.int64)
        cam, early = self.canonical(result)
        scores = compare_maps(cam, self.store.cam_reference[cls], self.measures)
        missing = [k for k in self.store.methods if k not in (maps or {})]
        if missing:
            raise ValueError(f"the reference store holds maps of {missing}: give their maps "
                             f"(verifier.scoring.attention.MethodPass)")
        for k in self.store.methods:
            scores.update(compare_maps(to_grid(maps[k], self.store.grid),
                                       self.store.method_reference(k)[cls], self.measures,
                                       prefix=score_prefix(k)))
        scores.update(compare_maps(early, self.store.early_reference[cls], self.early_measures,
                                   prefix="early_"))
        scores["early_mahalanobis"] = self.store.mahalanobis(result.early_stats, cls)
        if self.store.features is not None:
            scores.update(depth_scores(self.store, result))
        return scores


def depth_scores(store: ReferenceStore, result: ProbeResult) -> dict[str, np.ndarray]:
    """Feature-space and output scores, each (N,) float64, higher = worse except `msp`:
    `feat_conv<i>_mahalanobis` and `penultimate_mahalanobis` (squared Mahalanobis distance
    to the nearest class mean, tied OAS-shrunk covariance, Lee et al. 2018),
    `penultimate_relative_mahalanobis` (the same minus the distance to one Gaussian of all
    reference features, Ren et al. 2021), `feat_multilayer_mahalanobis` (the conv blocks'
    distances standardised by their in-distribution moments and summed),
    `feat_joint_mahalanobis` and `feat_joint_relative_mahalanobis` (the same two distances on
    the conv blocks' channel means, and their channel standard deviations where the store keeps
    them, concatenated, where the store keeps that Gaussian), `knn` (distance
    of the L2-normalised penultimate features to their 50th nearest reference, Sun et al.
    2022), `msp` (maximum softmax probability, Hendrycks & Gimpel 2017) and `energy`
    (-logsumexp of the logits, Liu et al. 2020), over the store's K real classes."""
    feats = store.features
    assert feats is not None
    n_blocks = len(feats.dims) - 1
    if len(result.block_stats) != n_blocks:
        raise ValueError(f"the probe exposes {len(result.block_stats)} conv blocks, the reference "
                         f"store {n_blocks}: this bundle was built with another probe layout")
    block_distances = [feats.mahalanobis(i, result.block_stats[i]) for i in range(n_blocks)]
    out = {f"feat_conv{i + 1}_mahalanobis": d for i, d in enumerate(block_distances)}
    out["penultimate_mahalanobis"] = feats.mahalanobis(n_blocks, result.features)
    out["penultimate_relative_mahalanobis"] = feats.relative_mahalanobis(
        n_blocks, result.features, out["penultimate_mahalanobis"])
    out["feat_multilayer_mahalanobis"] = feats.multilayer_mahalanobis(result.block_stats, block_distances)
    if feats.joint_depth is not None:
        joint = feats.joint_vector(result.block_stats, result.block_stds)
        out["feat_joint_mahalanobis"] = feats.mahalanobis(feats.joint_depth, joint)
        out["feat_joint_relative_mahalanobis"] = feats.relative_mahalanobis(
            feats.joint_depth, joint, out["feat_joint_mahalanobis"])
    out["knn"] = feats.knn_distance(result.features)
    logits = np.asarray(result.logits[:, : len(store.classes)], dtype=np.float64)
    out["msp"] = softmax(logits, axis=1).max(axis=1)
    out["energy"] = -logsumexp(logits, axis=1)
    return out


def score_family(name: str) -> str:
    """The check a score belongs to: 'garbage', 'attention', 'early_features', 'features'
    (deeper feature statistics: `feat_*`, `penultimate_*`, `knn`) or 'output' (`msp`, `energy`)."""
    if name == "garbage":
        return "garbage"
    if name.startswith("early_"):
        return "early_features"
    if name.startswith(("feat_", "penultimate_")) or name == "knn":
        return "features"
    if name in ("msp", "energy"):
        return "output"
    return "attention"


def is_combined(name: str, selection: Sequence[str] | None = COMBINED_SCORES) -> bool:
    """Whether the in-distribution combination takes score `name`: its family or the name
    itself is in `selection` (None: every score)."""
    return selection is None or name in selection or score_family(name) in selection


def combine_group(name: str) -> int:
    """The group of a score in the grouped combinations ("stouffer_groups", "fisher_groups"):
    1 for the relative distances (`RELATIVE_SCORES`), 0 for every other score."""
    return 1 if name in RELATIVE_SCORES else 0


def higher_is_worse(name: str) -> bool:
    """Direction of a score: True when a larger value means less in-distribution."""
    if name == "msp":
        return False
    if score_family(name) in ("garbage", "features", "output") or name == "early_mahalanobis":
        return True
    return not measure_direction(name)
