"""The two passes of a build over labelled images, one batch at a time: reference (a partial
store of the batch, its features and pixels) and calibration (scores of the batch).

`build_bundle` folds the batches in, in input order, whoever computed them: `LocalBuild` runs
the passes in this process; `verifier.engines` runs the same functions on workers and hands
back the same batches (`to_bytes` / `from_bytes` carry them, arrays only, never pickle).
"""
from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from reference_maps.canonical import to_grid
from reference_maps.store import ReferenceStore
from verifier.probe.base import Probe, ProbeResult
from verifier.scoring.attention import MethodPass
from verifier.scoring.comparator import Comparator
from verifier.scoring.garbage import GarbageHead, garbage_score
from verifier.spec import ModelSpec

__all__ = ["StoreTemplate", "ReferenceBatch", "CalibrationBatch", "BuildEngine", "LocalBuild",
           "Scorer", "reference_batch", "calibration_batch", "labelled_batches", "raw_pixels_u8",
           "to_raw_pixels"]


@dataclass(frozen=True)
class StoreTemplate:
    """What every partial store and scorer of one build shares: classes, grid (G_h, G_w),
    metadata, the further attribution methods whose maps the store keeps (Grad-CAM comes from
    the probe) and the measures the calibration scores with (None: every registered one)."""

    classes: tuple[str, ...]
    grid: tuple[int, int]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    measures: tuple[str, ...] | None = None

    def new(self) -> ReferenceStore:
        return ReferenceStore(self.classes, grid=self.grid, metadata=dict(self.metadata),
                              methods=self.methods)

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> ReferenceStore:
        return ReferenceStore.from_arrays(arrays, self.classes, self.grid, dict(self.metadata),
                                          methods=self.methods)

    def method_pass(self, spec: ModelSpec, layer: str) -> MethodPass:
        """The maps of the further methods for one batch, at the probe's target layer."""
        return MethodPass(spec, self.methods, layer)


@dataclass
class ReferenceBatch:
    """One batch of reference images, readable ones only (n of them).

    store: a store of this batch alone; merging it into the build's store in input order is
    bit-identical to updating that store with the batch (`ReferenceStore.merge`).
    features (n, D) penultimate features; labels (n,) int64; pixels (n, H, W[, C]) uint8 raw
    pixels (the seed of synthetic garbage); correct: how many the model classifies right.
    """

    store: ReferenceStore
    features: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray
    correct: int

    def to_bytes(self) -> bytes:
        arrays = {f"store.{k}": v for k, v in self.store.to_arrays().items()}
        return _npz(features=self.features, labels=self.labels, pixels=self.pixels,
                    correct=np.int64(self.correct), **arrays)

    @classmethod
    def from_bytes(cls, data: bytes, template: StoreTemplate) -> ReferenceBatch:
        a = _unnpz(data)
        store = template.from_arrays({k[6:]: v for k, v in a.items() if k.startswith("store.")})
        return cls(store, a["features"], a["labels"], a["pixels"], int(a["correct"]))


@dataclass
class CalibrationBatch:
    """One batch of calibration images, readable ones only: scores {name: (n,)}, the class each
    was scored against (n,) and the true labels (n,)."""

    scores: dict[str, np.ndarray]
    predicted: np.ndarray
    labels: np.ndarray

    def to_bytes(self) -> bytes:
        return _npz(predicted=self.predicted, labels=self.labels,
                    **{f"score.{k}": v for k, v in self.scores.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> CalibrationBatch:
        a = _unnpz(data)
        scores = {k[6:]: v for k, v in a.items() if k.startswith("score.")}
        return cls(scores, a["predicted"], a["labels"])


class BuildEngine(Protocol):
    """Runs the passes of a build over labelled inputs, yielding batches in input order."""

    def reference_batches(self, spec: ModelSpec, data: Any, batch_size: int,
                          template: StoreTemplate) -> Iterator[ReferenceBatch]: ...

    def calibration_batches(self, spec: ModelSpec, data: Any, batch_size: int,
                            template: StoreTemplate, store: ReferenceStore,
                            head: GarbageHead | None) -> Iterator[CalibrationBatch]: ...


class LocalBuild:
    """Both passes in this process, with one probe."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def reference_batches(self, spec: ModelSpec, data: Any, batch_size: int,
                          template: StoreTemplate) -> Iterator[ReferenceBatch]:
        for lab, x in labelled_batches(spec, data.inputs, data.labels, batch_size):
            yield reference_batch(self.probe, spec, template, lab, x)

    def calibration_batches(self, spec: ModelSpec, data: Any, batch_size: int,
                            template: StoreTemplate, store: ReferenceStore,
                            head: GarbageHead | None) -> Iterator[CalibrationBatch]:
        scorer = Scorer(Comparator(store, template.measures), head, spec,
                        template.method_pass(spec, self.probe.target_layer))
        for lab, x in labelled_batches(spec, data.inputs, data.labels, batch_size):
            yield calibration_batch(self.probe, scorer, lab, x)


class Scorer:
    """Comparator scores (Grad-CAM's, and those of the further methods of `method_pass`) plus
    the garbage score for one probe result of the batch x."""

    def __init__(self, comparator: Comparator, head: GarbageHead | None, spec: ModelSpec,
                 method_pass: MethodPass | None = None) -> None:
        self.comparator, self.head, self.spec = comparator, head, spec
        self.method_pass = method_pass

    def scores(self, res: ProbeResult, x: np.ndarray | None = None) -> dict[str, np.ndarray]:
        maps = None
        if self.method_pass is not None and self.method_pass.methods:
            if x is None:
                raise ValueError("scoring further attribution methods needs the batch x")
            maps = self.method_pass(x, res.cam_class)
        s = self.comparator.score(res, maps=maps)
        s["garbage"] = garbage_score(res.logits, res.features, self.head, self.spec.garbage_class)
        return s


def reference_batch(probe: Probe, spec: ModelSpec, template: StoreTemplate, lab: np.ndarray,
                    x: np.ndarray) -> ReferenceBatch:
    """Probe preprocessed x (n, C, H, W) with Grad-CAM of the true labels (n,)."""
    res = probe.run(x, classes=lab)
    part = template.new()
    maps = template.method_pass(spec, probe.target_layer)(x, res.cam_class) if template.methods else None
    part.update(lab, to_grid(res.cam, template.grid), to_grid(res.early_map, template.grid),
                res.early_stats,
                depth_features=[*res.block_stats, res.features] if res.block_stats else None,
                maps=maps, block_stds=res.block_stds)
    correct = int((res.logits[:, : spec.num_classes].argmax(axis=1) == lab).sum())
    return ReferenceBatch(part, res.features, lab, raw_pixels_u8(x, spec), correct)


def calibration_batch(probe: Probe, scorer: Scorer, lab: np.ndarray, x: np.ndarray) -> CalibrationBatch:
    """Scores of preprocessed x (n, C, H, W) against the class each image is predicted as."""
    res = probe.run(x)
    return CalibrationBatch(scorer.scores(res, x), res.cam_class, lab)


def labelled_batches(spec: ModelSpec, inputs: Sequence[Any] | np.ndarray, labels: np.ndarray,
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels (n,), preprocessed x (n, C, H, W)) per batch of `batch_size` inputs, readable
    ones only; a batch with none is skipped."""
    from verifier.data import iter_batches

    start = 0
    for records, x in iter_batches(inputs, spec, batch_size=batch_size):
        ok = np.array([r.error is None for r in records], dtype=bool)
        lab = np.asarray(labels[start:start + len(records)])[ok]
        start += len(records)
        if len(x):
            yield lab, x


def raw_pixels_u8(x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Model input (n, C, H, W) -> uint8 raw pixels (n, H, W) or (n, H, W, C)."""
    return np.round(to_raw_pixels(x, spec) * 255).astype(np.uint8)


def to_raw_pixels(x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Undo mean/std: (n, C, H, W) model input -> (n, H, W) or (n, H, W, C) pixels in [0, 1]."""
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    raw = np.clip(x * std + mean, 0.0, 1.0)
    return raw[:, 0] if raw.shape[1] == 1 else raw.transpose(0, 2, 3, 1)


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _unnpz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
