"""Building a bundle: reference store, garbage head and calibration from labelled images.

Three disjoint roles for the data: reference images (store + garbage head), a
fusion-fit split and a conformal split of the held-out calibration images.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.conformal import GUARANTEES, ConformalCalibrator
from calibration.fusion import FusedConformal
from calibration.indist import InDistributionConformal
from reference_maps.canonical import DEFAULT_GRID
from verifier.bundle.directory import Bundle, check_bundle_out
from verifier.bundle.passes import BuildEngine, LocalBuild, Scorer, StoreTemplate, to_raw_pixels
from verifier.probe.base import Probe, probe_features
from verifier.probe.factory import open_probe
from verifier.scoring.attention import DEFAULT_METHODS, check_methods
from verifier.scoring.comparator import (COMBINED_SCORES, Comparator, combine_group, higher_is_worse,
                                         is_combined, score_family)
from verifier.scoring.garbage import GarbageHead, synthetic_garbage
from verifier.scoring.measures import MEASURES
from verifier.spec import ModelSpec

__all__ = ["build_bundle", "LabelledData", "BuildReport", "to_raw_pixels", "from_raw_pixels"]

_PIXEL_SAMPLES = 512  # reference images kept (uint8) to make synthetic garbage from


@dataclass
class LabelledData:
    """Labelled inputs: file paths or a raw pixel array (N, H, W[, C]), and (N,) int labels."""

    inputs: Sequence[Path] | np.ndarray
    labels: np.ndarray

    @classmethod
    def from_source(cls, source: str | Path | tuple[np.ndarray, np.ndarray] | LabelledData,
                    classes: Sequence[str]) -> LabelledData:
        """A folder `DIR/<class>/<files>`, a CSV `path,label`, or (images, labels) arrays."""
        if isinstance(source, LabelledData):
            return source
        if isinstance(source, tuple):
            images, labels = source
            return cls(np.asarray(images), np.asarray(labels, dtype=np.int64))
        from verifier.data import labelled_dataset

        pairs = labelled_dataset(source, classes)
        return cls([p for p, _ in pairs], np.array([lab for _, lab in pairs], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> LabelledData:
        if isinstance(self.inputs, np.ndarray):
            return LabelledData(self.inputs[idx], self.labels[idx])
        return LabelledData([self.inputs[i] for i in idx], self.labels[idx])


@dataclass
class BuildReport:
    """Figures from a build, also stored in the bundle manifest's `info`."""

    reference_images: int
    calibration_images: int
    fusion_images: int
    garbage_images: int
    unreadable: int
    reference_accuracy: float
    calibration_accuracy: float


def build_bundle(spec: ModelSpec, data: Any, out: str | Path, *, calibration: Any = None,
                 calibration_fraction: float = 0.3, garbage: str | Path | None = None,
                 alpha: float = 0.05, grid: tuple[int, int] = DEFAULT_GRID, combine: str = "indist",
                 batch_size: int = 64, seed: int = 0, progress: bool = False,
                 probe: Probe | None = None, head_samples: int = 2000,
                 guarantee: str = "marginal", delta: float = 0.1,
                 combine_method: str = "stouffer_groups",
                 combine_scores: Sequence[str] | None = COMBINED_SCORES,
                 overwrite: bool = False, sign_key: Any = None,
                 measures: Sequence[str] | None = None,
                 methods: str | Sequence[str] = DEFAULT_METHODS,
                 engine: BuildEngine | None = None) -> Bundle:
    """Build and save a bundle; returns it (loaded state, `bundle.info` holds the figures).

    data / calibration: a folder, a CSV manifest or (images, labels) arrays. Without
    `calibration`, a stratified `calibration_fraction` of `data` is held out. A third of
    the calibration images fit the score combinations (the in-distribution one and the
    fusion vs garbage); the rest calibrate them (disjoint).
    Memory is constant in the number of reference images: the store streams, and the
    garbage head learns from a uniform sample of `head_samples` images' features.
    combine: "indist" (default: `combine_method` fitted on in-distribution scores only,
    `calibration.indist`), "fusion" (logistic regression vs garbage), or a merger name.
    combine_method: the statistic (`calibration.indist.COMBINE_METHODS`; default
    "stouffer_groups": the normal scores summed within the relative distances and within the
    other scores, then Fisher over the two groups' tail probabilities,
    `verifier.scoring.comparator.combine_group`).
    combine_scores: the score families and single score names the "indist" statistic combines
    (None = all; default `verifier.scoring.comparator.COMBINED_SCORES`: feature statistics,
    garbage and two early-map scores, chosen by measured near-OOD power, docs/gate.md).
    guarantee: "marginal" or "pac" (with probability >= 1 - delta over the calibration
    draw, the false-rejection rate is <= alpha); see docs/gate.md.
    `out` must be new or empty, or a bundle to replace with `overwrite` (checked first:
    nothing else is ever deleted); `sign_key`, a key file or `SigningKey`, signs it.
    measures: the similarity measures to score maps with (default: every measure registered
    in `verifier.scoring.measures.MEASURES`); the manifest lists them, and loading checks them.
    methods: the attribution methods whose per-class reference maps the store keeps and the
    gate scores (Grad-CAM always; e.g. "gradcam,crm"); a method the model's backend cannot
    compute is refused (AttributionError naming those it can).
    engine: where the reference and calibration passes run (default: this process with
    `probe`; `verifier.engines` has Ray). Batches are folded in input order, so every engine
    builds the same bundle. Synthetic garbage is probed here.
    """
    from verifier.bundle.signing import SignatureError, as_key

    check_bundle_out(out, overwrite)
    key = as_key(sign_key)
    if key is not None and not key.can_sign:
        raise SignatureError(f"{key.path} is a public key: signing needs the private key")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if guarantee not in GUARANTEES or not 0.0 < delta < 1.0:
        raise ValueError(f"guarantee must be one of {GUARANTEES} and delta in (0, 1), got "
                         f"{guarantee!r}, {delta}")
    measures = tuple(MEASURES) if measures is None else tuple(dict.fromkeys(measures))
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"unknown measure(s) {unknown or '(none given)'}; registered: {list(MEASURES)}")
    methods = check_methods(methods, spec)
    if garbage is not None and not Path(garbage).is_dir():
        raise ValueError(f"--garbage {garbage} is not a folder")
    rng = np.random.default_rng(seed)
    probe = probe if probe is not None else open_probe(spec)
    ref = LabelledData.from_source(data, spec.classes)
    if calibration is None:
        if not 0.05 <= calibration_fraction <= 0.9:
            raise ValueError("calibration_fraction must be between 0.05 and 0.9")
        cal_idx = _stratified(ref.labels, calibration_fraction, rng)
        rest = np.setdiff1d(np.arange(len(ref)), cal_idx)
        ref, cal = ref.subset(rest), ref.subset(cal_idx)
    else:
        cal = LabelledData.from_source(calibration, spec.classes)
    if len(cal) < 30:
        raise ValueError(f"calibration needs at least 30 images, got {len(cal)}")
    say = _Reporter(progress)

    # 1. reference store + features for the garbage head
    template = StoreTemplate(spec.classes, tuple(grid), {
        "model_fingerprint": probe.fingerprint, "target_layer": probe.target_layer,
        "early_layer": probe.early_layer, "attribution": "gradcam",
        "gradient_method": probe.gradient_method, "grid": list(grid)},
        methods=methods[1:], measures=measures)
    engine = engine if engine is not None else LocalBuild(probe)
    store = template.new()
    # Fixed-size uniform samples: memory does not grow with the number of reference images.
    feats, labels = _Reservoir(head_samples, rng), _Reservoir(head_samples, rng)
    pixels = _Reservoir(_PIXEL_SAMPLES, rng)  # uint8 pixels, the seed of the synthetic garbage
    correct = n_ref = unreadable = 0
    for batch in say.batches(engine.reference_batches(spec, ref, batch_size, template), len(ref), "reference"):
        store.merge(batch.store)  # bit-identical to store.update with the batch
        keep = feats.offer(batch.features)
        labels.offer(batch.labels, keep)
        pixels.offer(batch.pixels)
        correct += batch.correct
        n_ref += len(batch.labels)
    unreadable += len(ref) - n_ref
    if n_ref == 0:
        raise ValueError("no reference image could be read")
    # a segmentation model's background is never explained while anything else is predicted
    missing = [spec.classes[k] for k in np.flatnonzero(store.counts == 0)
               if k != spec.background_class]
    if missing:
        raise ValueError(f"no reference images for class(es) {missing}")

    # 2. garbage head (unless the model has its own garbage output)
    head = None
    n_garbage = 0
    if spec.garbage_class is None:
        n_head = min(max(600, len(feats.array()) // 2), head_samples // 2)
        g_feats = [probe_features(probe, gx) for gx in
                   _garbage_batches(pixels.array(), garbage, n_head, seed, spec, batch_size)]
        g_feats = np.concatenate(g_feats)
        n_garbage = len(g_feats)
        head = GarbageHead(spec.num_classes, seed=seed).fit(
            np.concatenate([feats.array(), g_feats]),
            np.concatenate([labels.array(), np.full(len(g_feats), spec.num_classes)]))

    # 3. calibration scores
    scorer = Scorer(Comparator(store, measures), head, spec,
                    template.method_pass(spec, probe.target_layer))
    cal_scores: list[dict[str, np.ndarray]] = []
    cal_pred, cal_lab = [], []
    for cb in say.batches(engine.calibration_batches(spec, cal, batch_size, template, store, head),
                          len(cal), "calibration"):
        cal_scores.append(cb.scores)
        cal_pred.append(cb.predicted)
        cal_lab.append(cb.labels)
    if not cal_scores:
        raise ValueError("no calibration image could be read")
    scores = {k: np.concatenate([s[k] for s in cal_scores]) for k in cal_scores[0]}
    pred, lab = np.concatenate(cal_pred), np.concatenate(cal_lab)
    unreadable += len(cal) - len(pred)
    names = list(scores)

    # 4. fusion fit split (disjoint) vs garbage; conformal split
    fit_idx = _stratified(pred, 1 / 3, rng)
    conf_idx = np.setdiff1d(np.arange(len(pred)), fit_idx)
    n_fusion = min(max(300, len(fit_idx)), 1000)
    g_scores = [scorer.scores(probe.run(gx), gx) for gx in
                _garbage_batches(pixels.array(), garbage, n_fusion, seed + 1, spec, batch_size)]
    neg = np.column_stack([np.concatenate([s[k] for s in g_scores]) for k in names])
    matrix = np.column_stack([scores[k] for k in names])
    directions = {k: higher_is_worse(k) for k in names}
    fusion = FusedConformal().fit(matrix[fit_idx], neg)
    fusion.calibrate(matrix[conf_idx], pred[conf_idx], spec.num_classes)
    used = [j for j, k in enumerate(names) if is_combined(k, combine_scores)]
    if not any(score_family(names[j]) == "features" for j in used):
        used = list(range(len(names)))  # a store without depth features: combine every score
    combiner = InDistributionConformal(combine_method, guarantee=guarantee, delta=delta)
    combiner.fit(matrix[fit_idx][:, used], [directions[names[j]] for j in used],
                 [names[j] for j in used], [combine_group(names[j]) for j in used])
    combiner.calibrate(matrix[conf_idx][:, used], pred[conf_idx], spec.num_classes)
    conf_scores = {k: v[conf_idx] for k, v in scores.items()}
    calibrator = ConformalCalibrator(directions).fit(conf_scores, pred[conf_idx], spec.num_classes)

    report = BuildReport(reference_images=n_ref, calibration_images=len(conf_idx),
                         fusion_images=len(fit_idx), garbage_images=n_garbage + len(neg),
                         unreadable=unreadable, reference_accuracy=correct / n_ref,
                         calibration_accuracy=float((pred == lab).mean()))
    bundle = Bundle(spec=spec, store=store, head=head, calibrator=calibrator, fusion=fusion,
                    combiner=combiner, guarantee=guarantee, delta=delta, alpha=alpha,
                    calibration_scores=conf_scores, calibration_classes=pred[conf_idx],
                    higher_is_worse=directions, model_fingerprint=probe.fingerprint, combine=combine,
                    measures=measures, methods=methods,
                    info={"build": report.__dict__, "target_layer": probe.target_layer,
                          "early_layer": probe.early_layer, "gradient_method": probe.gradient_method})
    bundle.save(out, overwrite=overwrite, sign_key=key)
    return bundle


def from_raw_pixels(raw: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Inverse of `to_raw_pixels`: pixels in [0, 1] -> (n, C, H, W) model input."""
    x = raw[:, None] if raw.ndim == 3 else raw.transpose(0, 3, 1, 2)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def _garbage_batches(pixels: np.ndarray, folder: str | Path | None, n: int, seed: int,
                     spec: ModelSpec, batch_size: int) -> Iterator[np.ndarray]:
    """Model inputs (b, C, H, W) of `n` synthetic garbage images made from uint8 `pixels`,
    then of the user's garbage folder, one batch at a time (never all in memory)."""
    raw = pixels.astype(np.float32) / 255.0
    for i, start in enumerate(range(0, n, batch_size)):
        synth, _ = synthetic_garbage(raw, min(batch_size, n - start), seed=seed * 100_003 + i)
        yield from_raw_pixels(synth, spec)
    if folder is None:
        return
    from verifier.data import iter_batches

    folder = Path(folder)
    found = False
    for _, x in iter_batches([folder], spec, batch_size=batch_size):
        if len(x):
            found = True
            yield x
    if not found:
        raise ValueError(f"--garbage {folder} holds no readable image")


def _stratified(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random `fraction` of each label's items (sorted)."""
    picked = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        m = int(round(fraction * len(idx)))
        picked.append(rng.choice(idx, size=m, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


class _Reservoir:
    """Uniform random sample of at most `cap` rows from a stream of batches."""

    def __init__(self, cap: int, rng: np.random.Generator) -> None:
        self.cap, self.rng, self.seen = cap, rng, 0
        self.rows: list[np.ndarray] = []
        self.buf: np.ndarray | None = None

    def offer(self, batch: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Add a batch; returns the (slot or -1) per row, so a paired reservoir can follow."""
        batch = np.asarray(batch)
        if keep is None:
            keep = self._slots(len(batch))
        else:
            self.seen += len(batch)
        if self.buf is None:
            self.buf = np.empty((self.cap, *batch.shape[1:]), dtype=batch.dtype)
        sel = keep >= 0
        self.buf[keep[sel]] = batch[sel]
        return keep

    def _slots(self, n: int) -> np.ndarray:
        pos = self.seen + np.arange(n)
        self.seen += n
        slots = np.where(pos < self.cap, pos, -1)
        late = pos >= self.cap
        if late.any():  # Algorithm R: the i-th item replaces a random slot with prob cap/(i+1)
            j = self.rng.integers(0, pos[late] + 1)
            slots[late] = np.where(j < self.cap, j, -1)
        return slots

    def array(self) -> np.ndarray:
        assert self.buf is not None
        return self.buf[: min(self.seen, self.cap)]


class _Reporter:
    """Progress bars on a terminal, quiet otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def batches(self, it: Iterator, total: int, desc: str) -> Iterator:
        if not self.enabled:
            yield from it
            return
        from tqdm import tqdm

        with tqdm(total=total, unit="img", desc=desc) as bar:
            for item in it:
                bar.update(len(item.labels))
                yield item
