"""Pre-deployment model audit: does a candidate model decide from what the trusted reference reads?

`audit(bundle, candidate, data)` probes the bundle's reference model and the candidate on the
same labelled images and returns an `AuditResult` (verdict, checks with figures, thresholds
and reasons): the checks live in `audit_evidence` (region swaps, attribution sanity) and
`audit_checks` (maps, accuracy, garbage, regions); docs/audit.md says why each one decides.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from reference_maps.canonical import to_grid
from verifier.audit.checks import (ModelRun, accuracy_check, channel_check, class_means,
                                   disagreement_order, garbage_check, load_masks, per_class_check,
                                   per_image_check, region_checks, same_class_partner, worst_pixels)
from verifier.audit.evidence import (SHIFT_FLOOR, evidence_check, evidence_inputs,
                                     faithfulness_check, randomisation_check)
from verifier.audit.patterns import PATTERN_FLOOR, pattern_check
from verifier.audit.result import (AUDIT_FORMAT_VERSION, CHECK_NAMES, AuditError, AuditEvidence,
                                   AuditResult, Check, SwapEvidence)
from verifier.bundle.builder import LabelledData
from verifier.bundle.directory import Bundle
from verifier.probe.base import Probe
from verifier.probe.factory import open_probe
from verifier.scoring.attention import MethodPass, check_methods, score_prefix
from verifier.scoring.measures import compare_maps
from verifier.spec import ModelSpec

__all__ = ["audit", "AuditEngine", "LocalAudit", "PairBatch", "ProbedPair", "pair_batch", "method_passes",
           "join_pairs", "AuditResult", "Check", "AuditEvidence", "SwapEvidence",
           "AuditError", "CHECK_NAMES", "AUDIT_FORMAT_VERSION", "SHIFT_FLOOR", "PATTERN_FLOOR"]


def audit(bundle: Bundle, candidate: ModelSpec, data: Any, *, ood: Any = None, roi: Any = None,
          quantile: float | None = None, min_measures: int = 4, tolerance: float = 2.0,
          accuracy_margin: float = 0.02, evidence_images: int = 400, grid: int = 7,
          unused_level: float = 0.2, shift_floor: float = SHIFT_FLOOR,
          pattern_floor: float = PATTERN_FLOOR,
          attention_decides: bool = False, sanity: bool = True, seed: int = 0,
          batch_size: int = 64, worst: int = 8, reference_probe: Probe | None = None,
          candidate_probe: Probe | None = None, engine: AuditEngine | None = None) -> AuditResult:
    """Audit `candidate` against the bundle's reference model on labelled `data`.

    data: a folder DIR/<class>/..., a CSV `path,label`, (images, labels) arrays or a
    `LabelledData`. ood: a folder or raw-pixel array (N, H, W[, C]) of images both models
    should reject. roi: a folder of masks (ROI/<class>.png, or one mask per image at the
    image's path relative to the data folder) or an array of masks, (K, h, w) per class or
    (N, h, w) per image.

    The verdict rests on where the candidate's decisions come from (the region-swap evidence
    check: `evidence_images` images, a `grid` x `grid` lattice, cells the reference leaves below
    `unused_level` of its peak reliance, failing beyond `shift_floor`), on paired accuracy
    (exact McNemar; failing when significantly worse by more than `accuracy_margin`), on the
    early feature maps and, when given, OOD rejection and expected regions; and, when the images
    hold a label-coded pattern (a marker, border or burnt-in label whose pixels the label
    fixes), on whether the candidate follows it beyond the reference by more than
    `pattern_floor` nats. The seven-measure
    Grad-CAM comparisons are reported; they decide only with `attention_decides` (Grad-CAM
    maps of two heads differ for suitable models; docs/audit.md). quantile, tolerance and
    min_measures set those map checks' thresholds (see docs/audit.md). Every further
    attribution method the bundle stores (`build --methods`) gets the same two attention
    checks, named `<method>_attention_per_image` / `_per_class` (skipped, with the reason,
    where a model's backend cannot compute the method).
    engine: where both models are probed on every image (default: this process;
    `verifier.engines` has Ray); the checks run here on the joined runs.
    """
    q = float(bundle.alpha if quantile is None else quantile)
    if not 0.0 < q < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {q}")
    if not 1.0 <= tolerance <= 1.0 / q:
        raise ValueError(f"tolerance must be in [1, 1/quantile], got {tolerance}")
    measures = bundle.measures  # the measures the bundle was built with, in its order
    if not 1 <= min_measures <= len(measures):
        raise ValueError(f"min_measures must be in [1, {len(measures)}]")
    if not 0.0 <= accuracy_margin < 1.0:
        raise ValueError(f"accuracy_margin must be in [0, 1), got {accuracy_margin}")
    if not pattern_floor >= 0.0:  # NaN too
        raise ValueError(f"pattern_floor must be >= 0 nats, got {pattern_floor}")
    if not 0.0 < unused_level < 1.0:
        raise ValueError(f"unused_level must be in (0, 1), got {unused_level}")
    if tuple(candidate.classes) != tuple(bundle.classes):
        raise AuditError(f"the candidate's classes {list(candidate.classes)} differ from the "
                         f"reference's {list(bundle.classes)} (same names, same order needed)")
    ref_probe = reference_probe or open_probe(bundle.spec)
    cand_probe = candidate_probe or open_probe(candidate)
    labelled = LabelledData.from_source(data, bundle.classes)
    methods, unrunnable = _runnable_methods(bundle, candidate)
    engine = engine if engine is not None else LocalAudit(ref_probe, cand_probe)
    runs = join_pairs(engine.pair_batches(bundle, candidate, labelled, batch_size, methods),
                      labelled)
    for key in methods:  # an engine that did not compute a method's maps: reported as skipped
        if key not in runs.ref.maps or key not in runs.cand.maps:
            unrunnable[key] = f"the audit engine ({type(engine).__name__}) does not compute {key} maps"
    methods = tuple(m for m in methods if m not in unrunnable)
    ref, cand, labels = runs.ref, runs.cand, runs.labels
    store, k = bundle.store, bundle.spec.num_classes

    agreement = compare_maps(cand.cam, ref.cam, measures)
    self_agree = compare_maps(ref.cam, store.cam_reference[labels], measures)
    e_agree = compare_maps(cand.early, ref.early, measures, prefix="early_")
    e_self = compare_maps(ref.early, store.early_reference[labels], measures, prefix="early_")
    partner = same_class_partner(labels)
    pair_null = compare_maps(ref.cam, ref.cam[partner], measures)
    e_pair_null = compare_maps(ref.early, ref.early[partner], measures, prefix="early_")
    cand_class = class_means(cand.cam, labels, k)
    cand_class_early = class_means(cand.early, labels, k)

    sub = evidence_inputs(labelled, runs.kept, labels, bundle.spec, candidate, evidence_images,
                           seed, batch_size)
    swap_check, swaps = evidence_check(sub, ref_probe, cand_probe, k, grid, unused_level,
                                        shift_floor, seed, worst, bundle.classes)
    label_check, patterns = pattern_check(sub, ref_probe, cand_probe, k, seed, pattern_floor,
                                          worst, bundle.classes)
    attention = [
        per_image_check("attention_per_image", "attention", agreement, pair_null, q, tolerance,
                         min_measures),
        per_class_check("attention_per_class", "attention", cand_class, store.cam_reference,
                         self_agree, labels, bundle.classes, q, tolerance, min_measures, ""),
    ]
    method_agree, method_null, method_self = {}, {}, {}
    for key in methods:  # the bundle's further attribution methods: the same two checks each
        p, ref_k, cand_k = score_prefix(key), runs.ref.maps[key], runs.cand.maps[key]
        agree_k = compare_maps(cand_k, ref_k, measures, prefix=p)
        null_k = compare_maps(ref_k, ref_k[partner], measures, prefix=p)
        self_k = compare_maps(ref_k, store.method_reference(key)[labels], measures, prefix=p)
        attention += [
            per_image_check(f"{p}attention_per_image", "attention", agree_k, null_k, q,
                            tolerance, min_measures, method=key),
            per_class_check(f"{p}attention_per_class", "attention", class_means(cand_k, labels, k),
                            store.method_reference(key), self_k, labels, bundle.classes, q,
                            tolerance, min_measures, p, method=key)]
        method_agree.update(agree_k)
        method_null.update(null_k)
        method_self.update(self_k)
    attention += [Check(f"{score_prefix(key)}attention_per_image", "attention", math.nan, math.nan,
                        None, f"skipped: {why}") for key, why in unrunnable.items()]
    for c in attention:
        c.decisive = attention_decides
    checks = [
        swap_check,
        label_check,
        accuracy_check(ref, cand, labels, k, accuracy_margin),
        *attention,
        per_image_check("early_per_image", "early_features", e_agree, e_pair_null, q, tolerance,
                         min_measures),
        per_class_check("early_per_class", "early_features", cand_class_early,
                         store.early_reference, e_self, labels, bundle.classes, q, tolerance, min_measures,
                         "early_"),
        channel_check(store, ref, cand, labels, q, ref_probe, cand_probe),
    ]
    if sanity:
        checks.append(randomisation_check(candidate, cand_probe, sub.x_cand[:64], sub.labels[:64]))
        checks.append(faithfulness_check(cand_probe, ref_probe, sub, candidate, bundle.spec, k,
                                          grid, seed))
    if ood is not None:
        checks.append(garbage_check(bundle, candidate, ref_probe, cand_probe, ref, cand, ood, q,
                                     batch_size))
    if roi is not None:
        masks = load_masks(roi, labelled, runs.kept, labels, bundle, data)
        checks.extend(region_checks(ref.cam, cand.cam, masks, tolerance * q))
    verdict = "FAIL" if any(c.passed is False and c.decisive for c in checks) else "PASS"
    order = disagreement_order(agreement)[:max(0, int(worst))]
    pixels, sources = worst_pixels(labelled, runs.kept[order], bundle.spec, batch_size)
    evidence = AuditEvidence(labels=labels, ref_cam=ref.cam, cand_cam=cand.cam,
                             agreement={**agreement, **method_agree, **e_agree},
                             self_agreement={**pair_null, **method_null, **e_pair_null},
                             class_agreement={**self_agree, **method_self, **e_self},
                             ref_class_cam=class_means(ref.cam, labels, k), cand_class_cam=cand_class,
                             store_cam=store.cam_reference, worst=order, worst_pixels=pixels,
                             worst_sources=sources, swaps=swaps, patterns=patterns)
    return AuditResult(verdict=verdict, checks=checks, classes=tuple(bundle.classes),
                       n_images=len(labels), quantile=q,
                       reference=_describe(bundle.spec, ref_probe),
                       candidate=_describe(candidate, cand_probe), evidence=evidence)


# ------------------------------------------------------------------ probing
@dataclass
class ProbedPair:
    """Both models on the audit images: their runs, the labels (N,) and `kept`, the indices
    into the labelled data of the images both models read (N,)."""

    ref: ModelRun
    cand: ModelRun
    labels: np.ndarray
    kept: np.ndarray


def _runnable_methods(bundle: Bundle, candidate: ModelSpec) -> tuple[tuple[str, ...], dict[str, str]]:
    """The bundle's further methods both models' backends can compute, and why the others
    cannot (their checks are reported as skipped)."""
    ok, skipped = [], {}
    if not bundle.store.methods:
        return (), {}
    from verifier.attribution.registry import AttributionError

    for key in bundle.store.methods:
        try:
            for spec in (bundle.spec, candidate):
                check_methods([key], spec)
            ok.append(key)
        except AttributionError as e:
            skipped[key] = str(e)
    return tuple(ok), skipped


class AuditEngine(Protocol):
    """Probes both models on every labelled image; one `PairBatch` per batch, input order,
    with the maps of the bundle's further `methods` both backends can compute."""

    def pair_batches(self, bundle: Bundle, candidate: ModelSpec, data: LabelledData,
                     batch_size: int, methods: tuple[str, ...] = ()) -> Iterator[PairBatch]: ...


@dataclass
class PairBatch:
    """One batch of `pair_batch`: `kept` (n,) indices into the labelled data, both runs."""

    kept: np.ndarray
    ref: ModelRun
    cand: ModelRun


class LocalAudit:
    """Both models probed in this process."""

    def __init__(self, ref_probe: Probe, cand_probe: Probe) -> None:
        self.ref_probe, self.cand_probe = ref_probe, cand_probe

    def pair_batches(self, bundle: Bundle, candidate: ModelSpec, data: LabelledData,
                     batch_size: int, methods: tuple[str, ...] = ()) -> Iterator[PairBatch]:
        passes = method_passes(bundle.spec, candidate, methods, self.ref_probe, self.cand_probe)
        start = 0
        for r, c in zip(_batches(data, bundle.spec, batch_size), _batches(data, candidate, batch_size)):
            got = pair_batch(self.ref_probe, self.cand_probe, bundle.store.grid, r, c,
                             data.labels[start:start + len(r[0])], start, passes)
            start += len(r[0])
            if got is not None:
                yield got


def method_passes(ref_spec: ModelSpec, candidate: ModelSpec, methods: tuple[str, ...],
                  ref_probe: Probe, cand_probe: Probe) -> tuple[MethodPass, MethodPass] | None:
    """The further methods' map passes of both models, at each probe's target layer."""
    if not methods:
        return None
    return (MethodPass(ref_spec, methods, ref_probe.target_layer),
            MethodPass(candidate, methods, cand_probe.target_layer))


def pair_batch(ref_probe: Probe, cand_probe: Probe, grid: tuple[int, int],
               ref_batch: tuple[list, np.ndarray], cand_batch: tuple[list, np.ndarray],
               labels: np.ndarray, start: int,
               passes: tuple[MethodPass, MethodPass] | None = None) -> PairBatch | None:
    """Both models on one batch (records and preprocessed x from each model's own spec),
    Grad-CAM (and the maps of `passes`, the bundle's further methods) of the true class
    (labels (n,) of the batch's inputs, the first being input `start`); images either model
    cannot read are left out of both (None if all are)."""
    (r_rec, r_x), (c_rec, c_x) = ref_batch, cand_batch
    r_ok = np.array([r.error is None for r in r_rec])
    c_ok = np.array([r.error is None for r in c_rec])
    both = r_ok & c_ok
    if not both.any():
        return None
    lab = np.asarray(labels)[both]
    runs = []
    for i, (probe, x, ok) in enumerate(((ref_probe, r_x, r_ok), (cand_probe, c_x, c_ok))):
        res = probe.run(x[both[ok]], classes=lab)
        raw = passes[i](x[both[ok]], lab) if passes is not None else {}
        runs.append(ModelRun(res.logits, to_grid(res.cam, grid), to_grid(res.early_map, grid),
                             res.early_stats,
                             maps={m: to_grid(np.nan_to_num(v), grid) for m, v in raw.items()}))
    return PairBatch(start + np.flatnonzero(both), runs[0], runs[1])


def join_pairs(batches: Iterator[PairBatch], data: LabelledData) -> ProbedPair:
    """The batches of `pair_batches`, in input order, as one `ProbedPair`."""
    kept: list[np.ndarray] = []
    parts: dict[str, list[ModelRun]] = {"ref": [], "cand": []}
    for b in batches:
        kept.append(b.kept)
        parts["ref"].append(b.ref)
        parts["cand"].append(b.cand)
    if not kept:
        raise AuditError("no audit image could be read by both models")
    runs = {key: ModelRun(*(np.concatenate([getattr(r, f) for r in rs])
                            for f in ("logits", "cam", "early", "stats")),
                          maps={m: np.concatenate([r.maps[m] for r in rs]) for m in rs[0].maps
                                if all(m in r.maps for r in rs)})
            for key, rs in parts.items()}
    kept_idx = np.concatenate(kept)
    return ProbedPair(runs["ref"], runs["cand"], data.labels[kept_idx].astype(np.int64), kept_idx)


def _batches(data: LabelledData, spec: ModelSpec, batch_size: int) -> Iterator[tuple[list, np.ndarray]]:
    from verifier.data import iter_batches

    return iter_batches(data.inputs, spec, batch_size=batch_size)


def _describe(spec: ModelSpec, probe: Probe) -> dict[str, Any]:
    return {"model": str(spec.path) if spec.path is not None else type(spec.module).__name__,
            "fingerprint": probe.fingerprint, "target_layer": probe.target_layer,
            "early_layer": probe.early_layer, "gradient_method": probe.gradient_method,
            "input_size": list(spec.size), "channels": spec.channels}
