"""Pre-deployment model audit: does a candidate model look where the trusted reference looks?

`audit(bundle, candidate, data)` probes the bundle's reference model and the candidate on the
same labelled images and returns an `AuditResult` (verdict, checks with figures, thresholds
and reasons). Thresholds come from the reference's own variability; see docs/audit.md.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from reference_maps.canonical import normalise_max, resize_maps, to_grid

from .builder import LabelledData
from .bundle import Bundle
from .compare import ATTENTION_MEASURES
from .measures import compare_maps, measure_direction
from .probe import Probe, open_probe
from .spec import ModelSpec

__all__ = ["audit", "write_html", "AuditResult", "Check", "AuditEvidence", "SwapEvidence", "AuditError",
           "CHECK_NAMES", "AUDIT_FORMAT_VERSION"]

AUDIT_FORMAT_VERSION = 1

#: every check an audit can run, in report order
CHECK_NAMES = ("evidence_region_swap", "accuracy", "attention_per_image", "attention_per_class",
               "early_per_image", "early_per_class", "early_channel_statistics",
               "attribution_randomisation", "attribution_faithfulness", "garbage_rejection",
               "regions_attention_mass", "regions_pointing_game")

#: the evidence check fails when the candidate's probability of the swapped-in class rises more
#: than the reference's by this much on average (and significantly): measured in
#: benchmarks/audit_accuracy.py, see docs/audit.md
SHIFT_FLOOR = 0.04

#: a candidate's early channels count as corresponding to the reference's when at least this
#: share of them has its best-correlated reference channel at the same index
CHANNEL_MATCH_SHARE = 0.9


class AuditError(ValueError):
    """The audit cannot run as asked (class mismatch, no readable image, bad mask); says why."""


@dataclass
class Check:
    """One audit check. `passed` is None when the check was skipped (`reason` says why).

    figure and threshold are the numbers compared (`figure >= threshold` passes when
    `higher_is_better`, else `figure <= threshold`); `details` holds per-measure or
    per-class figures behind them.
    """

    name: str
    family: str
    figure: float
    threshold: float
    passed: bool | None
    reason: str
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    decisive: bool = True  # False: reported (a warning when it fails), the verdict does not rest on it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "figure": _num(self.figure),
                "threshold": _num(self.threshold), "higher_is_better": self.higher_is_better,
                "result": {True: "pass", False: "fail", None: "skipped"}[self.passed],
                "passed": self.passed, "decisive": self.decisive, "reason": self.reason,
                "details": _plain(self.details)}


@dataclass
class AuditEvidence:
    """Arrays behind the checks, for the HTML report (not part of the JSON).

    labels (N,) int; ref_cam, cand_cam (N, G, G) canonical Grad-CAM maps of the true class;
    agreement / self_agreement: {measure: (N,)} candidate-vs-reference and
    reference-vs-class-reference (the same for early_ names); ref_class_cam, cand_class_cam,
    store_cam (K, G, G) per-class mean maps; worst: indices of the images where the candidate
    disagrees most, with their pixels (n, H, W) in [0, 1] and sources.
    """

    labels: np.ndarray
    ref_cam: np.ndarray
    cand_cam: np.ndarray
    agreement: dict[str, np.ndarray]
    self_agreement: dict[str, np.ndarray]
    class_agreement: dict[str, np.ndarray]
    ref_class_cam: np.ndarray
    cand_class_cam: np.ndarray
    store_cam: np.ndarray
    worst: np.ndarray
    worst_pixels: np.ndarray
    worst_sources: list[str]
    swaps: SwapEvidence | None = None


@dataclass
class SwapEvidence:
    """The region-swap images where the candidate moved most toward the swapped-in class.

    pixels / swapped: (n, H, W) in [0, 1] (reference preprocessing undone, channel mean);
    cells: (n, G, G) the swapped cells; cand_reliance / ref_reliance: (n, G, G) drop of the
    label's probability per swapped cell; shift_cand / shift_ref: (n,) rise of the swapped-in
    class's probability; labels / toward: (n,) true and swapped-in class; sources: file names.
    """

    pixels: np.ndarray
    swapped: np.ndarray
    cells: np.ndarray
    cand_reliance: np.ndarray
    ref_reliance: np.ndarray
    shift_cand: np.ndarray
    shift_ref: np.ndarray
    labels: np.ndarray
    toward: np.ndarray
    sources: list[str]


@dataclass
class AuditResult:
    """Verdict ("PASS"/"FAIL") and the checks behind it. FAIL when any run check failed."""

    verdict: str
    checks: list[Check]
    classes: tuple[str, ...]
    n_images: int
    quantile: float
    reference: dict[str, Any]
    candidate: dict[str, Any]
    evidence: AuditEvidence | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def reasons(self) -> list[str]:
        """Plain-language reasons of the failed decisive checks (empty for a PASS)."""
        return [c.reason for c in self.checks if c.passed is False and c.decisive]

    @property
    def warnings(self) -> list[str]:
        """Failed checks the verdict does not rest on (reported for a person to weigh)."""
        return [c.reason for c in self.checks if c.passed is False and not c.decisive]

    def check(self, name: str) -> Check:
        """The check called `name` (KeyError if it did not run)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `verifier audit --json`."""
        return {"format_version": AUDIT_FORMAT_VERSION, "verdict": self.verdict,
                "reasons": self.reasons, "warnings": self.warnings, "n_images": self.n_images, "quantile": self.quantile,
                "classes": list(self.classes), "reference": _plain(self.reference),
                "candidate": _plain(self.candidate),
                "checks": [c.to_dict() for c in self.checks]}


def audit(bundle: Bundle, candidate: ModelSpec, data: Any, *, ood: Any = None, roi: Any = None,
          quantile: float | None = None, min_measures: int = 4, tolerance: float = 2.0,
          accuracy_margin: float = 0.02, evidence_images: int = 400, grid: int = 7,
          unused_level: float = 0.2, shift_floor: float = SHIFT_FLOOR,
          attention_decides: bool = False, sanity: bool = True, seed: int = 0,
          batch_size: int = 64, worst: int = 8, reference_probe: Probe | None = None,
          candidate_probe: Probe | None = None) -> AuditResult:
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
    early feature maps and, when given, OOD rejection and expected regions. The seven-measure
    Grad-CAM comparisons are reported; they decide only with `attention_decides` (Grad-CAM
    maps of two heads differ for suitable models; docs/audit.md). quantile, tolerance and
    min_measures set those map checks' thresholds (see docs/audit.md).
    """
    q = float(bundle.alpha if quantile is None else quantile)
    if not 0.0 < q < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {q}")
    if not 1.0 <= tolerance <= 1.0 / q:
        raise ValueError(f"tolerance must be in [1, 1/quantile], got {tolerance}")
    if not 1 <= min_measures <= len(ATTENTION_MEASURES):
        raise ValueError(f"min_measures must be in [1, {len(ATTENTION_MEASURES)}]")
    if not 0.0 <= accuracy_margin < 1.0:
        raise ValueError(f"accuracy_margin must be in [0, 1), got {accuracy_margin}")
    if not 0.0 < unused_level < 1.0:
        raise ValueError(f"unused_level must be in (0, 1), got {unused_level}")
    if tuple(candidate.classes) != tuple(bundle.classes):
        raise AuditError(f"the candidate's classes {list(candidate.classes)} differ from the "
                         f"reference's {list(bundle.classes)} (same names, same order needed)")
    ref_probe = reference_probe or open_probe(bundle.spec)
    cand_probe = candidate_probe or open_probe(candidate)
    labelled = LabelledData.from_source(data, bundle.classes)
    runs = _probe_pair(bundle, candidate, ref_probe, cand_probe, labelled, batch_size)
    ref, cand, labels = runs.ref, runs.cand, runs.labels
    store, k = bundle.store, bundle.spec.num_classes

    agreement = compare_maps(cand.cam, ref.cam, ATTENTION_MEASURES)
    self_agree = compare_maps(ref.cam, store.cam_reference[labels], ATTENTION_MEASURES)
    e_agree = compare_maps(cand.early, ref.early, ATTENTION_MEASURES, prefix="early_")
    e_self = compare_maps(ref.early, store.early_reference[labels], ATTENTION_MEASURES, prefix="early_")
    partner = _same_class_partner(labels)
    pair_null = compare_maps(ref.cam, ref.cam[partner], ATTENTION_MEASURES)
    e_pair_null = compare_maps(ref.early, ref.early[partner], ATTENTION_MEASURES, prefix="early_")
    cand_class = _class_means(cand.cam, labels, k)
    cand_class_early = _class_means(cand.early, labels, k)

    sub = _evidence_inputs(labelled, runs.kept, labels, bundle.spec, candidate, evidence_images,
                           seed, batch_size)
    swap_check, swaps = _evidence_check(sub, ref_probe, cand_probe, k, grid, unused_level,
                                        shift_floor, seed, worst, bundle.classes)
    attention = [
        _per_image_check("attention_per_image", "attention", agreement, pair_null, q, tolerance,
                         min_measures),
        _per_class_check("attention_per_class", "attention", cand_class, store.cam_reference,
                         self_agree, labels, bundle.classes, q, tolerance, min_measures, ""),
    ]
    for c in attention:
        c.decisive = attention_decides
    checks = [
        swap_check,
        _accuracy_check(ref, cand, labels, k, accuracy_margin),
        *attention,
        _per_image_check("early_per_image", "early_features", e_agree, e_pair_null, q, tolerance,
                         min_measures),
        _per_class_check("early_per_class", "early_features", cand_class_early,
                         store.early_reference, e_self, labels, bundle.classes, q, tolerance, min_measures,
                         "early_"),
        _channel_check(store, ref, cand, labels, q, ref_probe, cand_probe),
    ]
    if sanity:
        checks.append(_randomisation_check(candidate, cand_probe, sub.x_cand[:64], sub.labels[:64]))
        checks.append(_faithfulness_check(cand_probe, ref_probe, sub, candidate, bundle.spec, k,
                                          grid, seed))
    if ood is not None:
        checks.append(_garbage_check(bundle, candidate, ref_probe, cand_probe, ref, cand, ood, q,
                                     batch_size))
    if roi is not None:
        masks = _load_masks(roi, labelled, runs.kept, labels, bundle, data)
        checks.extend(_region_checks(ref.cam, cand.cam, masks, tolerance * q))
    verdict = "FAIL" if any(c.passed is False and c.decisive for c in checks) else "PASS"
    order = _disagreement_order(agreement)[:max(0, int(worst))]
    pixels, sources = _worst_pixels(labelled, runs.kept[order], bundle.spec, batch_size)
    evidence = AuditEvidence(labels=labels, ref_cam=ref.cam, cand_cam=cand.cam,
                             agreement={**agreement, **e_agree},
                             self_agreement={**pair_null, **e_pair_null},
                             class_agreement={**self_agree, **e_self},
                             ref_class_cam=_class_means(ref.cam, labels, k), cand_class_cam=cand_class,
                             store_cam=store.cam_reference, worst=order, worst_pixels=pixels,
                             worst_sources=sources, swaps=swaps)
    return AuditResult(verdict=verdict, checks=checks, classes=tuple(bundle.classes),
                       n_images=len(labels), quantile=q,
                       reference=_describe(bundle.spec, ref_probe),
                       candidate=_describe(candidate, cand_probe), evidence=evidence)


def write_html(result: AuditResult, path: str | Path) -> Path:
    """Write the self-contained HTML report of an audit; returns the path."""
    from .audit_report import render_html

    path = Path(path)
    path.write_text(render_html(result), encoding="utf-8")
    return path


# ------------------------------------------------------------------ probing
@dataclass
class _Run:
    """One model's outputs on the audit images: logits (N, K_out), canonical cam and early
    maps (N, G, G), early channel statistics (N, C)."""

    logits: np.ndarray
    cam: np.ndarray
    early: np.ndarray
    stats: np.ndarray

    def probs(self, k: int) -> np.ndarray:
        return softmax(self.logits[:, :k], axis=1)


@dataclass
class _Pair:
    ref: _Run
    cand: _Run
    labels: np.ndarray
    kept: np.ndarray  # indices into the labelled data of the images both models read


def _probe_pair(bundle: Bundle, candidate: ModelSpec, ref_probe: Probe, cand_probe: Probe,
                data: LabelledData, batch_size: int) -> _Pair:
    """Both models on the same images, each preprocessed by its own spec, Grad-CAM of the
    true class; images either model cannot read are left out of both."""
    grid = bundle.store.grid
    parts: dict[str, list[list[np.ndarray]]] = {"ref": [], "cand": []}
    kept, start = [], 0
    for (r_rec, r_x), (c_rec, c_x) in zip(_batches(data, bundle.spec, batch_size),
                                          _batches(data, candidate, batch_size)):
        r_ok = np.array([r.error is None for r in r_rec])
        c_ok = np.array([r.error is None for r in c_rec])
        both = r_ok & c_ok
        idx = start + np.flatnonzero(both)
        start += len(r_rec)
        if not both.any():
            continue
        lab = data.labels[idx]
        for key, probe, x, ok in (("ref", ref_probe, r_x, r_ok), ("cand", cand_probe, c_x, c_ok)):
            res = probe.run(x[both[ok]], classes=lab)
            parts[key].append([res.logits, to_grid(res.cam, grid), to_grid(res.early_map, grid),
                               res.early_stats])
        kept.append(idx)
    if not kept:
        raise AuditError("no audit image could be read by both models")
    runs = {key: _Run(*(np.concatenate([p[i] for p in ps]) for i in range(4)))
            for key, ps in parts.items()}
    kept_idx = np.concatenate(kept)
    return _Pair(runs["ref"], runs["cand"], data.labels[kept_idx].astype(np.int64), kept_idx)


def _batches(data: LabelledData, spec: ModelSpec, batch_size: int) -> Iterator[tuple[list, np.ndarray]]:
    from .io import iter_batches

    return iter_batches(data.inputs, spec, batch_size=batch_size)


def _describe(spec: ModelSpec, probe: Probe) -> dict[str, Any]:
    return {"model": str(spec.path) if spec.path is not None else type(spec.module).__name__,
            "fingerprint": probe.fingerprint, "target_layer": probe.target_layer,
            "early_layer": probe.early_layer, "gradient_method": probe.gradient_method,
            "input_size": list(spec.size), "channels": spec.channels}


# ------------------------------------------------------------------ where decisions come from
@dataclass
class _EvidenceInputs:
    """A seeded subset of the audit images, preprocessed for each model: x_ref, x_cand
    (n, C, H, W) float32; labels (n,); sources (file names or positions)."""

    x_ref: np.ndarray
    x_cand: np.ndarray
    labels: np.ndarray
    sources: list[str]


def _evidence_inputs(data: LabelledData, kept: np.ndarray, labels: np.ndarray, ref_spec: ModelSpec,
                     cand_spec: ModelSpec, n_max: int, seed: int, batch_size: int) -> _EvidenceInputs:
    from .io import iter_batches

    pos = np.sort(np.random.default_rng(seed).permutation(len(kept))[:max(2, int(n_max))])
    sub = data.subset(kept[pos])
    parts: dict[str, list[np.ndarray]] = {"ref": [], "cand": []}
    lab, sources = [], []
    offset = 0
    for (r_rec, r_x), (c_rec, c_x) in zip(iter_batches(sub.inputs, ref_spec, batch_size=batch_size),
                                          iter_batches(sub.inputs, cand_spec, batch_size=batch_size)):
        r_ok = np.array([r.error is None for r in r_rec])
        c_ok = np.array([r.error is None for r in c_rec])
        both = r_ok & c_ok
        parts["ref"].append(r_x[both[r_ok]])
        parts["cand"].append(c_x[both[c_ok]])
        lab.append(labels[pos[offset:offset + len(r_rec)][both]])
        sources.extend(r.source for r, b in zip(r_rec, both) if b)
        offset += len(r_rec)
    return _EvidenceInputs(np.concatenate(parts["ref"]), np.concatenate(parts["cand"]),
                           np.concatenate(lab).astype(np.int64), sources)


def _evidence_check(sub: _EvidenceInputs, ref_probe: Probe, cand_probe: Probe, k: int, grid: int,
                    level: float, floor: float, seed: int, worst: int,
                    classes: Sequence[str]) -> tuple[Check, SwapEvidence | None]:
    """Region swap: in every image, the cells the reference model does not rely on for its class
    nor for a partner image's (another class) are replaced by the partner's content. A model
    that reads the image's object keeps its answer; one that reads a cue elsewhere (a marker,
    a border, a burnt-in label) moves toward the partner's class. The figure is the mean of
    (candidate's rise of the partner class's probability - the reference's), paired per image;
    FAIL when it exceeds `floor` and a one-sided Wilcoxon signed-rank test gives p < 0.01."""
    from scipy.stats import wilcoxon

    from .evidence import other_class_partner, reliance_maps, swap_shift, unused_cells

    name, fam = "evidence_region_swap", "evidence"
    n = len(sub.labels)
    if n < 10 or len(np.unique(sub.labels)) < 2:
        return Check(name, fam, math.nan, floor, None,
                     f"skipped: the region-swap test needs at least 10 readable images of two or "
                     f"more classes (got {n})", False), None
    y = sub.labels
    partner = other_class_partner(y, seed)
    rel_ref = reliance_maps(ref_probe.logits, sub.x_ref, sub.x_ref[partner], y, k, grid)
    unused = unused_cells(rel_ref, y, k, level)
    cells = unused[y] & unused[y[partner]]
    toward = y[partner]
    s_ref, f_ref = swap_shift(ref_probe.logits, sub.x_ref, sub.x_ref[partner], cells, toward, k)
    s_cand, f_cand = swap_shift(cand_probe.logits, sub.x_cand, sub.x_cand[partner], cells, toward, k)
    diff = s_cand - s_ref
    excess = float(diff.mean())
    p = float(wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else 1.0
    passed = not (excess > floor and p < 0.01)
    per_class = {classes[c]: float(diff[y == c].mean()) for c in np.unique(y)}
    worst_classes = sorted(per_class, key=lambda c: -per_class[c])[:3]
    reason = (f"where decisions come from: with the image regions the reference model does not "
              f"use ({100 * cells.mean():.0f}% of the picture) taken from an image of another "
              f"class, the candidate's probability of that other class rises by "
              f"{100 * s_cand.mean():.1f} points on average, the reference's by "
              f"{100 * s_ref.mean():.1f} (excess {100 * excess:.1f}, allowed {100 * floor:g}; "
              f"one-sided Wilcoxon p = {p:.2g}); the prediction follows the swapped-in regions on "
              f"{100 * f_cand.mean():.1f}% of {n} images (reference {100 * f_ref.mean():.1f}%)")
    if not passed:
        reason += (f"; the candidate relies on something outside the object the reference "
                   f"model reads (a marker, border, label or background cue), most in class(es) "
                   f"{', '.join(worst_classes)}: see the swapped images in the report")
    details = {"n": n, "grid": grid, "unused_level": level, "swapped_share": float(cells.mean()),
               "shift_candidate": float(s_cand.mean()), "shift_reference": float(s_ref.mean()),
               "follow_candidate": float(f_cand.mean()), "follow_reference": float(f_ref.mean()),
               "wilcoxon_p": p, "per_class_excess": per_class}
    top = np.argsort(-diff, kind="stable")[:max(0, int(worst))]
    swaps = None
    if len(top):
        from .evidence import swap_cells

        rel_cand = reliance_maps(cand_probe.logits, sub.x_cand[top], sub.x_cand[partner[top]],
                                 y[top], k, grid)
        swapped = swap_cells(sub.x_ref[top], sub.x_ref[partner[top]], cells[top])
        swaps = SwapEvidence(pixels=_unnormalise(sub.x_ref[top], ref_probe),
                             swapped=_unnormalise(swapped, ref_probe), cells=cells[top],
                             cand_reliance=rel_cand, ref_reliance=rel_ref[top],
                             shift_cand=s_cand[top], shift_ref=s_ref[top], labels=y[top],
                             toward=toward[top], sources=[sub.sources[i] for i in top])
    return Check(name, fam, excess, floor, passed, reason, False, details), swaps


def _unnormalise(x: np.ndarray, probe: Probe) -> np.ndarray:
    """(n, H, W) in [0, 1]: preprocessing undone, channels averaged (for pictures)."""
    spec = getattr(probe, "spec")
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return np.clip(x * std + mean, 0.0, 1.0).mean(axis=1).astype(np.float32)


def _randomisation_check(candidate: ModelSpec, probe: Probe, x: np.ndarray,
                         labels: np.ndarray) -> Check:
    """Model-randomisation sanity test (Adebayo et al. 2018): with every layer after the
    Grad-CAM layer re-initialised, the candidate's maps must change (median Spearman rank
    correlation with the trained maps below 0.5). Reported; the verdict does not rest on it."""
    name, fam = "attribution_randomisation", "attribution_sanity"
    if candidate.module is None or not hasattr(probe, "target_layer"):
        return Check(name, fam, math.nan, 0.5, None,
                     "skipped: re-initialising layers needs the candidate as a PyTorch module "
                     "(TorchScript/ONNX weights are not edited)", False, decisive=False)
    import copy

    from scipy.stats import spearmanr

    from .probe import open_probe

    module = copy.deepcopy(candidate.module)
    reset = _reset_after(module, probe.target_layer)
    if not reset:
        return Check(name, fam, math.nan, 0.5, None,
                     f"skipped: no layer with parameters after '{probe.target_layer}'", False,
                     decisive=False)
    import dataclasses

    twin = open_probe(dataclasses.replace(candidate, module=module))
    a = probe.run(x, classes=labels).cam.reshape(len(x), -1)
    b = twin.run(x, classes=labels).cam.reshape(len(x), -1)
    rho = np.array([spearmanr(u, v).statistic if u.std() > 0 and v.std() > 0 else 0.0
                    for u, v in zip(a, b)])
    figure = float(np.median(np.nan_to_num(rho)))
    passed = figure < 0.5
    reason = (f"attribution sanity: with {len(reset)} layer(s) after the Grad-CAM layer "
              f"re-initialised ({', '.join(reset[:4])}), the candidate's maps keep a median rank "
              f"correlation of {figure:.2f} with its trained maps (must fall below 0.5)")
    if not passed:
        reason += ("; its Grad-CAM barely depends on what the model learned, so the attention "
                   "figures of this audit say little about this model")
    return Check(name, fam, figure, 0.5, passed, reason, False, {"reset_layers": reset,
                 "n": len(x)}, decisive=False)


def _reset_after(module: Any, target: str) -> list[str]:
    """Re-initialise (seeded) every module after `target` in definition order; their names."""
    import torch

    names = [n for n, _ in module.named_modules()]
    if target not in names:
        return []
    after = names[names.index(target) + 1:]
    done = []
    torch.manual_seed(12345)
    for n, m in module.named_modules():
        if n in after and not n.startswith(target + ".") and hasattr(m, "reset_parameters") \
                and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
            done.append(n)
    return done


def _faithfulness_check(cand_probe: Probe, ref_probe: Probe, sub: _EvidenceInputs,
                        candidate: ModelSpec, ref_spec: ModelSpec, k: int, grid: int,
                        seed: int, n_max: int = 128) -> Check:
    """Deletion test of each model's Grad-CAM: cells deleted (set to black) most-attributed
    first; the area under the label-probability curve must be below that of a random order
    (the map points at what matters). Reported; the verdict does not rest on it."""
    from reference_maps.canonical import resize_maps

    from .evidence import deletion_curves

    name, fam = "attribution_faithfulness", "attribution_sanity"
    y = sub.labels[:n_max]
    rng = np.random.default_rng(seed)
    out = {}
    for key, probe, x, spec in (("candidate", cand_probe, sub.x_cand[:n_max], candidate),
                                ("reference", ref_probe, sub.x_ref[:n_max], ref_spec)):
        cam = probe.run(x, classes=y).cam
        cells = resize_maps(np.nan_to_num(cam).astype(np.float32), (grid, grid)).reshape(len(x), -1)
        order = np.argsort(-cells, axis=1, kind="stable")
        rand = np.argsort(rng.random(cells.shape), axis=1)
        black = (0.0 - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
        auc = deletion_curves(probe.logits, x, order, y, black, k).mean(axis=1)
        auc_r = deletion_curves(probe.logits, x, rand, y, black, k).mean(axis=1)
        out[key] = {"deletion_auc": float(auc.mean()), "random_auc": float(auc_r.mean())}
    c = out["candidate"]
    gain = c["random_auc"] - c["deletion_auc"]
    passed = gain > 0
    reason = (f"attribution faithfulness: deleting the candidate's most-attributed regions first "
              f"leaves a mean label probability of {c['deletion_auc']:.3f} along the way, "
              f"against {c['random_auc']:.3f} for a random order (reference "
              f"{out['reference']['deletion_auc']:.3f} vs {out['reference']['random_auc']:.3f})")
    if not passed:
        reason += "; the candidate's Grad-CAM does not point at what its decisions depend on"
    return Check(name, fam, gain, 0.0, passed, reason, True, out, decisive=False)


# ------------------------------------------------------------------ map checks
def _measure_verdicts(cand: dict[str, np.ndarray], null: dict[str, np.ndarray],
                      q: float) -> dict[str, dict[str, Any]]:
    """Per measure: the candidate's median against the reference's own q-tail level."""
    out = {}
    for name, values in cand.items():
        hib = measure_direction(name)
        figure = float(np.nanmedian(values))
        thr = float(np.nanquantile(null[name], q if hib else 1.0 - q))
        out[name] = {"figure": figure, "threshold": thr, "higher_is_better": hib,
                     "passed": bool(figure >= thr if hib else figure <= thr)}
    return out


def _per_image_check(name: str, family: str, cand: dict[str, np.ndarray],
                     null: dict[str, np.ndarray], q: float, tolerance: float, need: int) -> Check:
    """Per measure: the share of images where candidate-vs-reference is worse than the
    reference's own q-tail between two images of the same class; it must stay within the
    upper 95% binomial bound of tolerance x q. The check needs `need` of the measures to pass."""
    per = {}
    for m, values in cand.items():
        hib = measure_direction(m)
        level = float(np.nanquantile(null[m], q if hib else 1.0 - q))
        worse = np.nan_to_num(values < level if hib else values > level, nan=True)
        share = float(np.mean(worse))
        bound = _wilson(tolerance * q, len(values))[1]
        per[m] = {"figure": share, "threshold": bound, "level": level, "higher_is_better": False,
                  "median": float(np.nanmedian(values)), "passed": share <= bound}
    agree = [m for m, v in per.items() if v["passed"]]
    bad = sorted((m for m, v in per.items() if not v["passed"]), key=lambda m: -per[m]["figure"])
    what = "Grad-CAM attention" if family == "attention" else "early feature maps"
    passed = len(agree) >= need
    reason = (f"{what} per image: the candidate agrees with the reference model on {len(agree)} of "
              f"{len(per)} measures ({need} needed; a measure agrees when the candidate's maps fall "
              f"beyond the reference's own {100 * q:g}% level at most {tolerance:g}x as often as the "
              f"reference's own maps of the same class do)")
    if not passed:
        reason += (f"; the candidate {'looks elsewhere' if family == 'attention' else 'sees the image differently'}"
                   f" than the reference: " + ", ".join(
                       f"{m} beyond the reference's own {100 * q:g}% level on {100 * per[m]['figure']:.0f}% "
                       f"of images" for m in bad[:3]))
    return Check(name, family, float(len(agree)), float(need), passed, reason,
                 details={"measures": per})


def _per_class_check(name: str, family: str, cand_class: np.ndarray, store_ref: np.ndarray,
                     null: dict[str, np.ndarray], labels: np.ndarray, classes: Sequence[str],
                     q: float, tolerance: float, need: int, prefix: str) -> Check:
    """Each class's mean candidate map against the stored class reference, per measure at the
    q-level of the reference's single images against their class reference; a class fails
    when fewer than `need` measures pass. Allowed failing classes: the 95% binomial quantile
    of K classes at rate tolerance x q."""
    from scipy.stats import binom

    present = [k for k in range(len(classes)) if (labels == k).any()]
    vals = compare_maps(cand_class[present], store_ref[present], ATTENTION_MEASURES, prefix=prefix)
    per_class, failing = {}, []
    for j, k in enumerate(present):
        rows = labels == k
        per = _measure_verdicts({m: v[j:j + 1] for m, v in vals.items()}, null, q)
        ok = sum(v["passed"] for v in per.values()) >= need
        per_class[classes[k]] = {"passed": ok, "images": int(rows.sum()), "measures": per}
        if not ok:
            failing.append(classes[k])
    what = "attention" if family == "attention" else "early feature maps"
    allowed = int(binom.ppf(0.95, len(present), min(1.0, tolerance * q)))
    passed = len(failing) <= allowed
    reason = (f"{what} per class: {len(failing)} of {len(present)} classes' mean candidate maps "
              f"lie beyond the reference's own {100 * q:g}% level around the stored class "
              f"reference on more than {7 - need} of 7 measures ({allowed} allowed)")
    if failing:
        reason += f"; differing class(es): {', '.join(failing)}"
    if not passed:
        reason += f"; the candidate's mean {what} maps differ from the reference's"
    return Check(name, family, float(len(failing)), float(allowed), passed, reason, False,
                 details={"classes": per_class})


def _channel_check(store: Any, ref: _Run, cand: _Run, labels: np.ndarray, q: float,
                   ref_probe: Probe, cand_probe: Probe) -> Check:
    """Mahalanobis distance of early channel statistics to the store, only when the
    candidate's early channels correspond to the reference's (see CHANNEL_MATCH_SHARE)."""
    name, fam = "early_channel_statistics", "early_features"
    c_ref, c_cand = ref.stats.shape[1], cand.stats.shape[1]
    if c_ref != c_cand:
        return Check(name, fam, math.nan, math.nan, None,
                     f"skipped: the candidate's early layer has {c_cand} channels, the "
                     f"reference's {c_ref}; channel statistics cannot be compared", False)
    share = _channel_match_share(ref.stats, cand.stats)
    if share < CHANNEL_MATCH_SHARE:
        return Check(name, fam, math.nan, math.nan, None,
                     f"skipped: the early channels do not correspond (only {100 * share:.0f}% of "
                     f"the candidate's {c_cand} channels correlate best with the reference channel "
                     f"of the same index; {100 * CHANNEL_MATCH_SHARE:.0f}% needed), as with any "
                     f"independently trained model; the early maps are compared on the common grid",
                     False, {"channel_match_share": share})
    d_cand = store.mahalanobis(cand.stats, labels)
    d_ref = store.mahalanobis(ref.stats, labels)
    figure, thr = float(np.median(d_cand)), float(np.quantile(d_ref, 1.0 - q))
    passed = figure <= thr
    reason = (f"early channel statistics: median Mahalanobis distance {figure:.3g} to the stored "
              f"class statistics, against the reference model's own {100 * (1 - q):g}% level "
              f"{thr:.3g} (channels correspond: {100 * share:.0f}% match)")
    if not passed:
        reason += "; the candidate's early features are distributed differently"
    return Check(name, fam, figure, thr, passed, reason, False,
                 {"channel_match_share": share, "reference_median": float(np.median(d_ref))})


def _channel_match_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of channels c whose best-correlated reference channel (over images) is c."""
    za = (a - a.mean(0)) / (a.std(0) + 1e-12)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-12)
    corr = zb.T @ za / len(a)
    return float(np.mean(corr.argmax(axis=1) == np.arange(corr.shape[0])))


# ------------------------------------------------------------------ accuracy, garbage
def _accuracy_check(ref: _Run, cand: _Run, labels: np.ndarray, k: int, margin: float) -> Check:
    """Paired accuracy on the same images: exact one-sided McNemar test on the discordant pairs
    (reference right and candidate wrong, against the reverse). FAIL when the candidate is
    worse with p < 0.05 and by more than `margin`."""
    from scipy.stats import binomtest

    n = len(labels)
    r_ok = ref.logits[:, :k].argmax(1) == labels
    c_ok = cand.logits[:, :k].argmax(1) == labels
    acc_ref, acc_cand = float(r_ok.mean()), float(c_ok.mean())
    worse, better = int(np.sum(r_ok & ~c_ok)), int(np.sum(~r_ok & c_ok))
    p = float(binomtest(worse, worse + better, 0.5, alternative="greater").pvalue) \
        if worse + better else 1.0
    lo = acc_ref - margin
    passed = not (p < 0.05 and acc_cand < lo)
    reason = (f"accuracy {100 * acc_cand:.1f}% on {n} labelled images against the reference "
              f"model's {100 * acc_ref:.1f}% on the same images (the candidate alone is wrong on "
              f"{worse}, the reference alone on {better}; exact McNemar p = {p:.2g}; FAIL only "
              f"when significantly worse by more than {100 * margin:g} points)")
    if not passed:
        reason += "; the candidate is less accurate than the reference beyond sampling noise"
    return Check("accuracy", "accuracy", acc_cand, lo, passed, reason,
                 details={"reference_accuracy": acc_ref, "n": n, "margin": margin,
                          "candidate_only_wrong": worse, "reference_only_wrong": better,
                          "mcnemar_p": p})


def _garbage_check(bundle: Bundle, candidate: ModelSpec, ref_probe: Probe, cand_probe: Probe,
                   ref: _Run, cand: _Run, ood: Any, q: float, batch_size: int) -> Check:
    """Each model rejects an OOD image when its max-softmax confidence falls below its own
    q-quantile on the audit images (same false-rejection rate q for both). The candidate's
    reject rate must exceed q with 95% confidence (its confidence must tell garbage from site
    images at all); max-softmax rejection varies too much between retrained models to demand
    the reference's rate, which is reported beside it."""
    k = bundle.spec.num_classes
    rates, n = {}, 0
    for key, spec, probe, run in (("reference", bundle.spec, ref_probe, ref),
                                  ("candidate", candidate, cand_probe, cand)):
        conf = _ood_confidence(ood, spec, probe, k, batch_size)
        n = len(conf)
        level = float(np.quantile(run.probs(k).max(1), q))
        rates[key] = float(np.mean(conf < level))
    lo = _wilson(rates["candidate"], n)[0]
    passed = lo > q
    reason = (f"garbage rejection: the candidate rejects {100 * rates['candidate']:.1f}% of {n} "
              f"out-of-distribution images by its max-softmax confidence at a {100 * q:g}% "
              f"false-rejection rate on the audit images; the reference model rejects "
              f"{100 * rates['reference']:.1f}% the same way; the candidate's rate must exceed the "
              f"{100 * q:g}% it rejects of site images (lower 95% bound {100 * lo:.1f}%)")
    if not passed:
        reason += "; the candidate is as confident on garbage as on site images"
    return Check("garbage_rejection", "garbage", rates["candidate"], q, passed, reason,
                 details={"reference_rate": rates["reference"], "n": n, "lower_bound": lo})


def _ood_confidence(ood: Any, spec: ModelSpec, probe: Probe, k: int, batch_size: int) -> np.ndarray:
    from .io import iter_batches

    inputs = ood if isinstance(ood, np.ndarray) else [Path(ood)]
    if not isinstance(ood, np.ndarray) and not Path(ood).is_dir():
        raise AuditError(f"--ood {ood} is not a folder")
    conf = [softmax(probe.run(x).logits[:, :k], axis=1).max(1)
            for _, x in iter_batches(inputs, spec, batch_size=batch_size) if len(x)]
    if not conf:
        raise AuditError(f"no readable out-of-distribution image in {ood}")
    return np.concatenate(conf)


# ------------------------------------------------------------------ expected regions
def _region_checks(ref_cam: np.ndarray, cand_cam: np.ndarray, masks: np.ndarray,
                   slack: float) -> list[Check]:
    """Share of attention mass inside the mask and pointing-game hit rate: the candidate must
    reach (1 - slack) x the reference model's own figure, less the 95% paired sampling margin."""
    out = []
    share = {k: _mass_share(m, masks) for k, m in (("ref", ref_cam), ("cand", cand_cam))}
    hits = {k: _pointing_hits(m, masks) for k, m in (("ref", ref_cam), ("cand", cand_cam))}
    n = len(masks)
    s_ref, s_cand = float(share["ref"].mean()), float(share["cand"].mean())
    diff_se = float((share["cand"] - share["ref"]).std(ddof=1)) / math.sqrt(max(n - 1, 1))
    lo = (1 - slack) * s_ref - 1.96 * diff_se
    reason = (f"expected regions: {100 * s_cand:.1f}% of the candidate's attention lies inside "
              f"the expected-region masks, the reference model's {100 * s_ref:.1f}% "
              f"(lowest acceptable {100 * lo:.1f}%)")
    if s_cand < lo:
        reason += "; the candidate's attention leaves the expected regions"
    out.append(Check("regions_attention_mass", "regions", s_cand, lo, s_cand >= lo, reason,
                     details={"reference": s_ref, "n": n}))
    h_ref, h_cand = float(hits["ref"].mean()), float(hits["cand"].mean())
    lo = (1 - slack) * h_ref - _diff_margin(h_ref, h_cand, n)
    reason = (f"pointing game: the candidate's attention peak falls inside the expected region "
              f"on {100 * h_cand:.1f}% of images, the reference model's on {100 * h_ref:.1f}% "
              f"(lowest acceptable {100 * lo:.1f}%)")
    if h_cand < lo:
        reason += "; the candidate's attention peaks outside the expected regions"
    out.append(Check("regions_pointing_game", "regions", h_cand, lo, h_cand >= lo, reason,
                     details={"reference": h_ref, "n": n}))
    return out


def _mass_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    total = maps.reshape(len(maps), -1).sum(1)
    inside = (maps * masks).reshape(len(maps), -1).sum(1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def _pointing_hits(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    peak = flat.argmax(1)
    hit = masks.reshape(len(masks), -1)[np.arange(len(maps)), peak] > 0
    return hit & (flat.max(1) > 0)  # an all-zero map points nowhere


def _load_masks(roi: Any, data: LabelledData, kept: np.ndarray, labels: np.ndarray,
                bundle: Bundle, source: Any) -> np.ndarray:
    """(N, G, G) float32 binary masks for the kept images, on the store's grid."""
    grid, k = bundle.store.grid, bundle.spec.num_classes
    if isinstance(roi, np.ndarray):
        arr = np.asarray(roi, dtype=np.float32)
        if arr.ndim != 3 or len(arr) not in (k, len(data)):
            raise AuditError(f"roi masks must be (K={k}, h, w) or (N={len(data)}, h, w), got {arr.shape}")
        grid_masks = _mask_grid(arr, grid)
        return grid_masks[labels] if len(arr) == k and len(arr) != len(data) else grid_masks[kept]
    folder = Path(roi)
    if not folder.is_dir():
        raise AuditError(f"--roi {roi} is not a folder")
    per_class = [folder / f"{c}.png" for c in bundle.classes]
    if all(p.exists() for p in per_class):
        return _mask_grid(np.stack([_read_mask(p) for p in per_class]), grid)[labels]
    return _per_image_masks(folder, data, kept, source, grid)


def _per_image_masks(folder: Path, data: LabelledData, kept: np.ndarray, source: Any,
                     grid: tuple[int, int]) -> np.ndarray:
    if isinstance(data.inputs, np.ndarray) or source is None or not Path(source).is_dir():
        raise AuditError(f"--roi {folder}: per-image masks need --data as a folder; per-class "
                         f"masks are ROI/<class>.png for every class")
    out = []
    for i in kept:
        rel = Path(data.inputs[i]).relative_to(Path(source))
        path = folder / rel
        if not path.exists():
            path = path.with_suffix(".png")
        if not path.exists():
            raise AuditError(f"--roi: no mask for {rel} (looked for {folder / rel}) and no "
                             f"per-class masks ROI/<class>.png")
        out.append(_mask_grid(_read_mask(path)[None], grid)[0])
    return np.stack(out)


def _read_mask(path: Path) -> np.ndarray:
    from .io import decode_image

    m = np.asarray(decode_image(path), dtype=np.float32)
    return m.mean(axis=-1) if m.ndim == 3 else m


def _mask_grid(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Masks of any size -> (n, G, G) {0, 1}: a cell is inside when at least half of it is."""
    m = np.asarray(masks, dtype=np.float32)
    peak = m.reshape(len(m), -1).max(1)
    m = m / np.where(peak > 0, peak, 1.0)[:, None, None]
    return (resize_maps(m, grid) >= 0.5).astype(np.float32)


# ------------------------------------------------------------------ helpers
def _same_class_partner(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) index of another image of the same class for every image (itself if alone)."""
    rng = np.random.default_rng(seed)
    partner = np.arange(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = rng.permutation(idx)
        partner[order] = np.roll(order, 1)  # a cycle: nobody is paired with itself
    return partner


def _class_means(maps: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, G, G) mean canonical map per class, rescaled to max 1; NaN for absent classes."""
    out = np.full((k, *maps.shape[1:]), np.nan, dtype=np.float32)
    for c in range(k):
        rows = labels == c
        if rows.any():
            out[c] = normalise_max(maps[rows].mean(0, keepdims=True))[0]
    return out


def _disagreement_order(agreement: dict[str, np.ndarray]) -> np.ndarray:
    """Image indices, most disagreeing first: mean rank of badness over the measures."""
    ranks = []
    for name, v in agreement.items():
        bad = -v if measure_direction(name) else v
        ranks.append(np.argsort(np.argsort(np.nan_to_num(bad, nan=np.inf))))
    return np.argsort(-np.mean(ranks, axis=0), kind="stable")


def _worst_pixels(data: LabelledData, idx: np.ndarray, spec: ModelSpec,
                  batch_size: int) -> tuple[np.ndarray, list[str]]:
    """The reference-preprocessed pixels (n, H, W) in [0, 1] of a few images, for overlays."""
    from .io import iter_batches

    if len(idx) == 0:
        return np.zeros((0, *spec.size), dtype=np.float32), []
    sub = data.subset(idx)
    parts, sources = [], []
    for recs, x in iter_batches(sub.inputs, spec, batch_size=batch_size):
        mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
        parts.append(np.clip(x * std + mean, 0.0, 1.0).mean(axis=1))
        sources.extend(r.source for r in recs if r.error is None)
    return np.concatenate(parts).astype(np.float32), sources


def _show(name: str, v: dict[str, Any]) -> str:
    op = ">=" if v["higher_is_better"] else "<="
    return f"{name} {v['figure']:.3g} (needs {op} {v['threshold']:.3g})"


def _diff_margin(p_ref: float, p_cand: float, n: int, z: float = 1.96) -> float:
    """95% sampling margin of the difference of two proportions measured on n images each."""
    if n == 0:
        return 1.0
    return z * math.sqrt((p_ref * (1 - p_ref) + p_cand * (1 - p_cand)) / n)


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj
