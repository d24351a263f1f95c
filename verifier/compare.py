"""Comparator: scores a batch of probe results against the reference store of their class.

Names: the seven measures on Grad-CAM maps (`iou` ... `wasserstein`), the same on
early maps (`early_iou` ...), and `early_mahalanobis` on early channel statistics.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reference_maps.canonical import to_grid
from reference_maps.store import ReferenceStore

from .measures import MEASURES, compare_maps, measure_direction
from .probe import ProbeResult

__all__ = ["Comparator", "ATTENTION_MEASURES", "score_family", "higher_is_worse"]

#: the seven measures of the method, in report order
ATTENTION_MEASURES: tuple[str, ...] = ("iou", "dice", "ssim", "cosine", "pearson", "kl", "wasserstein")


class Comparator:
    """Scores (N,) per measure for a `ProbeResult` against `store`'s class references."""

    def __init__(self, store: ReferenceStore, measures: Sequence[str] | None = None,
                 early_measures: Sequence[str] | None = None) -> None:
        self.store = store
        self.measures = tuple(measures or ATTENTION_MEASURES)
        self.early_measures = tuple(early_measures or ATTENTION_MEASURES)
        unknown = [m for m in (*self.measures, *self.early_measures) if m not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; registered: {sorted(MEASURES)}")

    @property
    def names(self) -> tuple[str, ...]:
        """Score names this comparator produces, in order."""
        return (*self.measures, *(f"early_{m}" for m in self.early_measures), "early_mahalanobis")

    def canonical(self, result: ProbeResult) -> tuple[np.ndarray, np.ndarray]:
        """(cam, early_map) of a result on the store's grid, canonical form, (N, G, G) each."""
        return to_grid(result.cam, self.store.grid), to_grid(result.early_map, self.store.grid)

    def score(self, result: ProbeResult, classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every score for every image against the reference of `classes` (default: cam_class)."""
        cls = np.asarray(result.cam_class if classes is None else classes, dtype=np.int64)
        cam, early = self.canonical(result)
        scores = compare_maps(cam, self.store.cam_reference[cls], self.measures)
        scores.update(compare_maps(early, self.store.early_reference[cls], self.early_measures,
                                   prefix="early_"))
        scores["early_mahalanobis"] = self.store.mahalanobis(result.early_stats, cls)
        return scores


def score_family(name: str) -> str:
    """The check a score belongs to: 'garbage', 'attention' or 'early_features'."""
    if name == "garbage":
        return "garbage"
    return "early_features" if name.startswith("early_") else "attention"


def higher_is_worse(name: str) -> bool:
    """Direction of a score: True when a larger value means less in-distribution."""
    if name in ("garbage", "early_mahalanobis"):
        return True
    return not measure_direction(name)
