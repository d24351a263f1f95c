"""Label-coded patterns: does the candidate read a pattern in the images that encodes the label?

A shortcut that sits in the image itself (a marker whose position, a border whose gray level, a
burnt-in label whose text gives away the class) shows up in the audit images as pixels whose
value is fixed by the label: their between-class share of variance (eta squared) is near 1,
where anatomy (strokes, organs) varies within a class and stays far below it (measured on
MNIST: at most 0.31 for the strokes; 1.0 for a marker or a border). When such pixels exist, the
images are given the pattern of each other class in turn (only those pixels change; the object
and everything else stay) and both models are asked how far that moves them toward the
pattern's class *specifically*: the mean rise of log P(pattern's class) minus the mean rise of
log P of the other wrong classes. A model that never learned the pattern is disturbed, but in
no particular direction; a model that learned it, even on a minority of its training images,
moves toward the class the pattern encodes. The check fails when the candidate's specific rise
exceeds the reference's by more than `floor` nats and a permutation test over class
relabelings gives p < 0.05. docs/audit.md gives the figures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax

from verifier.audit.evidence import EvidenceInputs, to_pixels
from verifier.audit.perturb import LogitsFn
from verifier.audit.result import Check, PatternEvidence
from verifier.probe.base import Probe

__all__ = ["PATTERN_LEVEL", "PATTERN_FLOOR", "class_coded_pixels", "pattern_response",
           "specificity", "pattern_check"]

#: a pixel belongs to a label-coded pattern when the label explains this share of its variance
PATTERN_LEVEL = 0.9
#: the check fails when, given a class's pattern, the candidate's log-probability of that class
#: rises more than the other classes' by this many nats beyond the reference's (and the
#: permutation p < PATTERN_P); measured in benchmarks/audit_accuracy.py, see docs/audit.md
PATTERN_FLOOR = 0.25
#: classes with fewer audit images than this are left out of the pattern search (a class
#: mean over two or three images makes every pixel look label-coded)
MIN_PER_CLASS = 5
#: classes (with MIN_PER_CLASS images each) the test needs: 4! = 24 relabelings reach p < 0.05
MIN_CLASSES = 4
#: patterns tried (classes, a seeded choice when there are more): one batched forward each
MAX_PATTERNS = 16
#: class relabelings of the permutation test, and its level (with 10 classes the test cannot
#: go much below 0.01; suitable models measured: p >= 0.24)
PERMUTATIONS = 2000
PATTERN_P = 0.05

_CHUNK_ELEMENTS = 32 * 1024 * 1024


def class_coded_pixels(x: np.ndarray, labels: np.ndarray, k: int,
                       level: float = PATTERN_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(mask (C, H, W) bool, class means (K, C, H, W) float64): the pixels whose between-class
    share of variance is at least `level` over the images `x` (N, C, H, W), and each class's
    mean image (NaN for a class with no image)."""
    n = len(x)
    flat = x.reshape(n, -1).astype(np.float64)
    onehot = np.eye(k, dtype=np.float64)[np.asarray(labels, dtype=np.int64)]
    counts = onehot.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (onehot.T @ flat) / counts[:, None]
    grand = flat.mean(axis=0)
    total = ((flat - grand) ** 2).mean(axis=0)
    present = counts > 0
    between = (counts[present, None] / n * (means[present] - grand) ** 2).sum(axis=0)
    eta2 = np.where(total > 1e-12, between / np.maximum(total, 1e-12), 0.0)
    return (eta2 >= level).reshape(x.shape[1:]), means.reshape(k, *x.shape[1:])


def pattern_response(logits: LogitsFn, x: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                     means: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), K) float64: R[r, j], the mean rise of log P(j) over the images not of class
    rows[r] (nor j), when their `mask` pixels are given class rows[r]'s pattern (its class mean
    there); one batched forward per pattern class."""
    base = _log_probs(logits, x, k)
    out = np.full((len(rows), k), np.nan)
    for r, c in enumerate(rows):
        other = labels != c
        if not other.any():
            continue
        moved = np.where(mask[None], means[c].astype(x.dtype), x[other])
        rise = _log_probs(logits, np.ascontiguousarray(moved), k) - base[other]
        valid = np.ones_like(rise, dtype=bool)
        valid[np.arange(len(rise)), labels[other]] = False
        with np.errstate(invalid="ignore"):
            out[r] = (rise * valid).sum(axis=0) / valid.sum(axis=0)
    return out


def specificity(d: np.ndarray, cols: np.ndarray) -> float:
    """Mean of d[r, cols[r]] minus the mean of every other finite entry of d (R, J): how much
    more the responses rise toward the class each pattern encodes than toward the rest."""
    hit = np.zeros(d.shape, dtype=bool)
    hit[np.arange(len(cols)), cols] = True
    ok = np.isfinite(d)
    return float(d[hit & ok].mean() - d[~hit & ok].mean())


def pattern_check(sub: EvidenceInputs, ref_probe: Probe, cand_probe: Probe, k: int, seed: int,
                  floor: float, worst: int, classes: Sequence[str],
                  level: float = PATTERN_LEVEL) -> tuple[Check, PatternEvidence | None]:
    """Label-coded patterns in the audit images, and whether the candidate reads them more
    than the reference (module docstring). Skipped when the images hold no such pattern."""
    name, fam = "evidence_label_pattern", "evidence"
    y = sub.labels
    counts = np.bincount(y, minlength=k)
    keep = counts[y] >= MIN_PER_CLASS
    present = np.unique(y[keep])
    if len(present) < MIN_CLASSES:
        return Check(name, fam, math.nan, floor, None,
                     f"skipped: the label-pattern test needs at least {MIN_PER_CLASS} images in "
                     f"each of {MIN_CLASSES} classes or more (got {len(present)}): with fewer, "
                     f"its permutation test cannot reach p < {PATTERN_P:g}", False), None
    y = y[keep]
    x_ref, x_cand = sub.x_ref[keep], sub.x_cand[keep]
    mask_r, means_r = class_coded_pixels(x_ref, y, k, level)
    mask_c, means_c = class_coded_pixels(x_cand, y, k, level)
    if not mask_r.any() or not mask_c.any():
        return Check(name, fam, math.nan, floor, None,
                     f"skipped: no label-coded pattern in the audit images (no pixel whose value "
                     f"the label fixes: between-class share of variance >= {level:g})", False,
                     {"pattern_pixels": int(mask_r.sum())}), None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(present)[:MAX_PATTERNS])
    r_ref = pattern_response(ref_probe.logits, x_ref, y, mask_r, means_r, rows, k)[:, present]
    r_cand = pattern_response(cand_probe.logits, x_cand, y, mask_c, means_c, rows, k)[:, present]
    d = r_cand - r_ref
    cols = np.searchsorted(present, rows)
    figure = specificity(d, cols)
    null = np.array([specificity(d, rng.permutation(len(present))[:len(rows)])
                     for _ in range(PERMUTATIONS)])
    p = float((1 + np.sum(null >= figure)) / (1 + PERMUTATIONS))
    passed = not (figure > floor and p < PATTERN_P)
    own, own_ref = specificity(r_cand, cols), specificity(r_ref, cols)
    area = float(mask_r.any(axis=0).mean())
    n = len(y)
    reason = (f"label-coded pattern: {100 * area:.1f}% of the picture holds pixels whose value "
              f"the label fixes (a marker, border or burnt-in label in the audit images); given "
              f"another class's pattern (the object unchanged), the candidate's log-probability "
              f"of that class rises {own:+.2f} nats more than the other classes', the "
              f"reference's {own_ref:+.2f} (excess {figure:+.2f}, allowed {floor:g}; permutation "
              f"p = {p:.2g}, FAIL below {PATTERN_P:g}; {len(rows)} patterns on {n} images)")
    if not passed:
        reason += ("; the candidate reads the pattern, not only the object: see the pattern and "
                   "the images in the report")
    details = {"n": n, "patterns": len(rows), "pattern_pixels": int(mask_r.sum()),
               "pattern_area": area, "permutation_p": p, "specific_rise_candidate": own,
               "specific_rise_reference": own_ref, "level": level,
               "per_class_excess": {classes[c]: float(d[i, cols[i]]) for i, c in enumerate(rows)}}
    evidence = _evidence(sub.sources, keep, ref_probe, cand_probe, x_ref, x_cand, y,
                         (mask_r, mask_c), (means_r, means_c), rows, k, seed, worst)
    return Check(name, fam, figure, floor, passed, reason, False, details), evidence


def _evidence(sources: list[str], keep: np.ndarray, ref_probe: Probe, cand_probe: Probe,
              x_ref: np.ndarray, x_cand: np.ndarray, y: np.ndarray,
              masks: tuple[np.ndarray, np.ndarray], means: tuple[np.ndarray, np.ndarray],
              rows: np.ndarray, k: int, seed: int, worst: int) -> PatternEvidence | None:
    """The images where the candidate moved most, beyond the reference, toward one other
    class's pattern (a seeded choice per image), for the report."""
    if worst <= 0:
        return None
    toward = _other_row(rows, y, np.random.default_rng(seed + 1))
    i = np.arange(len(y))
    pulls = []
    for probe, x, mask, mean in ((ref_probe, x_ref, masks[0], means[0]),
                                 (cand_probe, x_cand, masks[1], means[1])):
        moved = np.where(mask[None], mean[toward].astype(x.dtype), x)
        rise = _log_probs(probe.logits, moved, k) - _log_probs(probe.logits, x, k)
        rest = rise.copy()
        rest[i, y] = np.nan
        rest[i, toward] = np.nan
        pulls.append(rise[i, toward] - np.nanmean(rest, axis=1))
    pull_r, pull_c = pulls
    top = np.argsort(-(pull_c - pull_r), kind="stable")[:int(worst)]
    changed = np.where(masks[0][None], means[0][toward[top]].astype(x_ref.dtype), x_ref[top])
    kept_sources = [s for s, kk in zip(sources, keep) if kk]
    return PatternEvidence(mask=masks[0].mean(axis=0).astype(np.float32),
                           pixels=to_pixels(x_ref[top], ref_probe),
                           changed=to_pixels(changed, ref_probe), labels=y[top],
                           toward=toward[top], pull_cand=pull_c[top], pull_ref=pull_r[top],
                           sources=[kept_sources[j] for j in top])


def _other_row(rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) a uniform random entry of the sorted `rows` other than each label, vectorised."""
    pos = np.searchsorted(rows, labels)
    own = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == labels)
    j = np.floor(rng.random(len(labels)) * (len(rows) - own)).astype(np.int64)
    return rows[j + (own & (j >= pos))]


def _log_probs(logits: LogitsFn, x: np.ndarray, k: int) -> np.ndarray:
    """Log-softmax over the first k (real) classes, batched in memory-bounded chunks."""
    per = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    parts = [np.asarray(logits(np.ascontiguousarray(x[s:s + per])), dtype=np.float64)[:, :k]
             for s in range(0, len(x), per)]
    return log_softmax(np.concatenate(parts), axis=1)
