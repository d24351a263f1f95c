"""The audit's comparisons of two models' outputs on the same images: Grad-CAM and early-map
measures against the reference's own variability, channel statistics, paired accuracy,
garbage rejection and expected regions (docs/audit.md gives every threshold).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from reference_maps.canonical import normalise_max, resize_maps
from verifier.audit.result import AuditError, Check
from verifier.bundle.builder import LabelledData
from verifier.bundle.directory import Bundle
from verifier.probe.base import Probe
from verifier.scoring.measures import compare_maps, measure_direction
from verifier.spec import ModelSpec

#: a candidate's early channels count as corresponding to the reference's when at least this
#: share of them has its best-correlated reference channel at the same index
CHANNEL_MATCH_SHARE = 0.9


@dataclass
class ModelRun:
    """One model's outputs on the audit images: logits (N, K_out), canonical cam and early
    maps (N, G, G), early channel statistics (N, C), and the canonical maps (N, G, G) of the
    bundle's further attribution methods, by method."""

    logits: np.ndarray
    cam: np.ndarray
    early: np.ndarray
    stats: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    def probs(self, k: int) -> np.ndarray:
        return softmax(self.logits[:, :k], axis=1)



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


def per_image_check(name: str, family: str, cand: dict[str, np.ndarray],
                     null: dict[str, np.ndarray], q: float, tolerance: float, need: int,
                     method: str = "Grad-CAM") -> Check:
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
    what = f"{method} attention" if family == "attention" else "early feature maps"
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


def per_class_check(name: str, family: str, cand_class: np.ndarray, store_ref: np.ndarray,
                     null: dict[str, np.ndarray], labels: np.ndarray, classes: Sequence[str],
                     q: float, tolerance: float, need: int, prefix: str,
                     method: str = "") -> Check:
    """Each class's mean candidate map against the stored class reference, per measure at the
    q-level of the reference's single images against their class reference; a class fails
    when fewer than `need` measures pass. Allowed failing classes: the 95% binomial quantile
    of K classes at rate tolerance x q."""
    from scipy.stats import binom

    present = [k for k in range(len(classes)) if (labels == k).any()]
    names = [m[len(prefix):] for m in null]  # the bundle's measures, as the null was scored
    vals = compare_maps(cand_class[present], store_ref[present], names, prefix=prefix)
    per_class, failing = {}, []
    for j, k in enumerate(present):
        rows = labels == k
        per = _measure_verdicts({m: v[j:j + 1] for m, v in vals.items()}, null, q)
        ok = sum(v["passed"] for v in per.values()) >= need
        per_class[classes[k]] = {"passed": ok, "images": int(rows.sum()), "measures": per}
        if not ok:
            failing.append(classes[k])
    what = f"{method} attention".strip() if family == "attention" else "early feature maps"
    allowed = int(binom.ppf(0.95, len(present), min(1.0, tolerance * q)))
    passed = len(failing) <= allowed
    reason = (f"{what} per class: {len(failing)} of {len(present)} classes' mean candidate maps "
              f"lie beyond the reference's own {100 * q:g}% level around the stored class "
              f"reference on more than {len(names) - need} of {len(names)} measures ({allowed} allowed)")
    if failing:
        reason += f"; differing class(es): {', '.join(failing)}"
    if not passed:
        reason += f"; the candidate's mean {what} maps differ from the reference's"
    return Check(name, family, float(len(failing)), float(allowed), passed, reason, False,
                 details={"classes": per_class})


def channel_check(store: Any, ref: ModelRun, cand: ModelRun, labels: np.ndarray, q: float,
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
def accuracy_check(ref: ModelRun, cand: ModelRun, labels: np.ndarray, k: int, margin: float) -> Check:
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


def garbage_check(bundle: Bundle, candidate: ModelSpec, ref_probe: Probe, cand_probe: Probe,
                   ref: ModelRun, cand: ModelRun, ood: Any, q: float, batch_size: int) -> Check:
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
    from verifier.data import iter_batches

    inputs = ood if isinstance(ood, np.ndarray) else [Path(ood)]
    if not isinstance(ood, np.ndarray) and not Path(ood).is_dir():
        raise AuditError(f"--ood {ood} is not a folder")
    conf = [softmax(probe.run(x).logits[:, :k], axis=1).max(1)
            for _, x in iter_batches(inputs, spec, batch_size=batch_size) if len(x)]
    if not conf:
        raise AuditError(f"no readable out-of-distribution image in {ood}")
    return np.concatenate(conf)


# ------------------------------------------------------------------ expected regions
def region_checks(ref_cam: np.ndarray, cand_cam: np.ndarray, masks: np.ndarray,
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


def load_masks(roi: Any, data: LabelledData, kept: np.ndarray, labels: np.ndarray,
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
    from verifier.data import decode_image

    m = np.asarray(decode_image(path), dtype=np.float32)
    return m.mean(axis=-1) if m.ndim == 3 else m


def _mask_grid(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Masks of any size -> (n, G, G) {0, 1}: a cell is inside when at least half of it is."""
    m = np.asarray(masks, dtype=np.float32)
    peak = m.reshape(len(m), -1).max(1)
    m = m / np.where(peak > 0, peak, 1.0)[:, None, None]
    return (resize_maps(m, grid) >= 0.5).astype(np.float32)


# ------------------------------------------------------------------ helpers
def same_class_partner(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) index of another image of the same class for every image (itself if alone)."""
    rng = np.random.default_rng(seed)
    partner = np.arange(len(labels))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = rng.permutation(idx)
        partner[order] = np.roll(order, 1)  # a cycle: nobody is paired with itself
    return partner


def class_means(maps: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, G, G) mean canonical map per class, rescaled to max 1; NaN for absent classes."""
    out = np.full((k, *maps.shape[1:]), np.nan, dtype=np.float32)
    for c in range(k):
        rows = labels == c
        if rows.any():
            out[c] = normalise_max(maps[rows].mean(0, keepdims=True))[0]
    return out


def disagreement_order(agreement: dict[str, np.ndarray]) -> np.ndarray:
    """Image indices, most disagreeing first: mean rank of badness over the measures."""
    ranks = []
    for name, v in agreement.items():
        bad = -v if measure_direction(name) else v
        ranks.append(np.argsort(np.argsort(np.nan_to_num(bad, nan=np.inf))))
    return np.argsort(-np.mean(ranks, axis=0), kind="stable")


def worst_pixels(data: LabelledData, idx: np.ndarray, spec: ModelSpec,
                  batch_size: int) -> tuple[np.ndarray, list[str]]:
    """The reference-preprocessed pixels (n, H, W) in [0, 1] of a few images, for overlays."""
    from verifier.data import iter_batches

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
