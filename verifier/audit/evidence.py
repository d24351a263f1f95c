"""The audit's behavioural checks: where a candidate's decisions come from (region swaps,
deciding) and attribution sanity (model randomisation, deletion faithfulness; reported).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from verifier.audit.result import Check, SwapEvidence
from verifier.bundle.builder import LabelledData
from verifier.probe.base import Probe
from verifier.spec import ModelSpec

__all__ = ["SHIFT_FLOOR", "EvidenceInputs", "evidence_inputs", "evidence_check", "to_pixels",
           "randomisation_check", "faithfulness_check"]

#: the evidence check fails when the candidate's probability of the swapped-in class rises more
#: than the reference's by this much on average (and significantly): measured in
#: benchmarks/audit_accuracy.py, see docs/audit.md
SHIFT_FLOOR = 0.04

@dataclass
class EvidenceInputs:
    """A seeded subset of the audit images, preprocessed for each model: x_ref, x_cand
    (n, C, H, W) float32; labels (n,); sources (file names or positions)."""

    x_ref: np.ndarray
    x_cand: np.ndarray
    labels: np.ndarray
    sources: list[str]


def evidence_inputs(data: LabelledData, kept: np.ndarray, labels: np.ndarray, ref_spec: ModelSpec,
                     cand_spec: ModelSpec, n_max: int, seed: int, batch_size: int) -> EvidenceInputs:
    from verifier.data import iter_batches

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
    return EvidenceInputs(np.concatenate(parts["ref"]), np.concatenate(parts["cand"]),
                           np.concatenate(lab).astype(np.int64), sources)


def evidence_check(sub: EvidenceInputs, ref_probe: Probe, cand_probe: Probe, k: int, grid: int,
                    level: float, floor: float, seed: int, worst: int,
                    classes: Sequence[str]) -> tuple[Check, SwapEvidence | None]:
    """Region swap: in every image, the cells the reference model does not rely on for its class
    nor for a partner image's (another class) are replaced by the partner's content. A model
    that reads the image's object keeps its answer; one that reads a cue elsewhere (a marker,
    a border, a burnt-in label) moves toward the partner's class. The figure is the mean of
    (candidate's rise of the partner class's probability - the reference's), paired per image;
    FAIL when it exceeds `floor` and a one-sided Wilcoxon signed-rank test gives p < 0.01."""
    from scipy.stats import wilcoxon

    from verifier.audit.perturb import other_class_partner, reliance_maps, swap_shift, unused_cells

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
    # segmenters: read from the pixels left in place (`swap_shift`); both models or neither
    kept = [getattr(p, "kept_logits", None) for p in (ref_probe, cand_probe)]
    if None in kept:
        kept = [None, None]
    s_ref, f_ref = swap_shift(ref_probe.logits, sub.x_ref, sub.x_ref[partner], cells, toward, k, kept[0])
    s_cand, f_cand = swap_shift(cand_probe.logits, sub.x_cand, sub.x_cand[partner], cells, toward, k,
                                kept[1])
    diff = s_cand - s_ref
    excess = float(diff.mean())
    p = float(wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else 1.0
    passed = not (excess > floor and p < 0.01)
    per_class = {classes[c]: float(diff[y == c].mean()) for c in np.unique(y)}
    worst_classes = sorted(per_class, key=lambda c: -per_class[c])[:3]
    reason = (f"where decisions come from: with the image regions the reference model does not "
              f"use ({100 * cells.mean():.0f}% of the picture) taken from an image of another "
              f"class, the candidate's probability of that other class"
              f"{' (read on the pixels left in place)' if kept[0] is not None else ''} rises by "
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
               "wilcoxon_p": p, "per_class_excess": per_class,
               "read_on": "pixels left in place" if kept[0] is not None else "whole image"}
    top = np.argsort(-diff, kind="stable")[:max(0, int(worst))]
    swaps = None
    if len(top):
        from verifier.audit.perturb import swap_cells

        rel_cand = reliance_maps(cand_probe.logits, sub.x_cand[top], sub.x_cand[partner[top]],
                                 y[top], k, grid)
        swapped = swap_cells(sub.x_ref[top], sub.x_ref[partner[top]], cells[top])
        swaps = SwapEvidence(pixels=to_pixels(sub.x_ref[top], ref_probe),
                             swapped=to_pixels(swapped, ref_probe), cells=cells[top],
                             cand_reliance=rel_cand, ref_reliance=rel_ref[top],
                             shift_cand=s_cand[top], shift_ref=s_ref[top], labels=y[top],
                             toward=toward[top], sources=[sub.sources[i] for i in top])
    return Check(name, fam, excess, floor, passed, reason, False, details), swaps


def to_pixels(x: np.ndarray, probe: Probe) -> np.ndarray:
    """(n, H, W) in [0, 1]: preprocessing undone, channels averaged (for pictures)."""
    spec = getattr(probe, "spec")
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return np.clip(x * std + mean, 0.0, 1.0).mean(axis=1).astype(np.float32)


def randomisation_check(candidate: ModelSpec, probe: Probe, x: np.ndarray,
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

    from verifier.probe.factory import open_probe

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


def faithfulness_check(cand_probe: Probe, ref_probe: Probe, sub: EvidenceInputs,
                        candidate: ModelSpec, ref_spec: ModelSpec, k: int, grid: int,
                        seed: int, n_max: int = 128) -> Check:
    """Deletion test of each model's Grad-CAM: cells deleted (set to black) most-attributed
    first; the area under the label-probability curve must be below that of a random order
    (the map points at what matters). Reported; the verdict does not rest on it."""
    from reference_maps.canonical import resize_maps
    from verifier.audit.perturb import deletion_curves

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
