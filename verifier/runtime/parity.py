"""Declaring another model file compatible with a bundle (e.g. the ONNX export of its model):
the parity run through two gates and the rewrite of the bundle with a sealed declaration
(`verifier.bundle.declarations` holds the seal and the check on load).

The rule: a bundle is valid only for the model it was calibrated with (its
`model_fingerprint`). Another model is accepted (`Bundle.load(path, spec=other)`,
`Gatekeeper.load(path, spec=other)`, `Gatekeeper(bundle, probe=...)`) only once
`declare_compatible` has measured, on real images plus the builder's synthetic
garbage made from them, that both models give

- the same predicted class on every image,
- logits within `LOGIT_REL_TOL * max(1, largest |logit|)` (max abs difference),
- Grad-CAM maps with cosine >= `CAM_COSINE_MIN` on every image (two maps whose
  norms are both ~0 agree),
- the same gate decision on every image (`Gatekeeper.score_batch(...).accept`),

and has rewritten the bundle (load, then save through the same atomic write path)
with `compatible_fingerprints[label]` and the figures in `info["compatibility"][label]`.

Each declaration carries a `seal`: sha256 over the declaration record and a digest
of the bundle's content (calibration and reference arrays, spec, alpha, classes, the
bundle's own model fingerprint). `Bundle.load` verifies every seal, so a fingerprint
added to `manifest.json` by hand, a figure edited, or a declaration copied into
another bundle is refused. The seal is integrity, not authenticity: it has no secret
key, so whoever can run this code can compute a seal for anything (docs/onnx.md). The
seal lives in the manifest, so the bundle's digest and (with `sign_key`) its signature
cover it too: a signed bundle is re-signed on declaring, never silently left unsigned.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reference_maps.artifact import read_artifact
from verifier.bundle.builder import from_raw_pixels, to_raw_pixels
from verifier.bundle.declarations import (CAM_COSINE_MIN, LOGIT_REL_TOL, ZERO_NORM_REL,
                                          CompatibilityError, content_digest, seal)
from verifier.bundle.directory import (BUNDLE_FORMAT_VERSION, BUNDLE_KIND, Bundle, BundleError,
                                       check_bundle_out, contract_differences)
from verifier.bundle.signing import as_key
from verifier.data import iter_batches
from verifier.probe.factory import open_probe
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.scoring.garbage import synthetic_garbage
from verifier.spec import ModelSpec, model_fingerprint

__all__ = ["declare_compatible", "parity_figures", "map_cosine", "CompatibilityError",
           "LOGIT_REL_TOL", "CAM_COSINE_MIN"]


# ------------------------------------------------------------------ declaring
def declare_compatible(bundle_path: str | Path, other: ModelSpec, images: Any, *,
                       model: Any = None, label: str | None = None, out: str | Path | None = None,
                       garbage: int | None = None, batch_size: int = 64, seed: int = 0,
                       key: Any = None, sign_key: Any = None) -> dict:
    """Measure `other` against the bundle's model and, if it passes the rule, declare it.

    bundle_path: a bundle; `model` is its nn.Module when it was built from one.
    other: the spec of the other model (same classes, garbage output and input contract).
    images: real in-distribution images, as `Gatekeeper.gate` takes them (files, folders,
        or raw pixels (N, H, W[, C])); `garbage` synthetic garbage images are made from
        them (default: half as many, at least 32) so out-of-distribution inputs count too.
    label: the declaration's name (default: the other model's file name).
    out: write the declared bundle there instead of rewriting `bundle_path` in place
        (a new or empty folder, or a bundle this tool wrote).
    key: verify the bundle's signature with this key file first (refused if it fails).
    sign_key: sign the declared bundle; required when the bundle is signed, so that
        declaring never strips a signature.

    Returns the declaration record (figures, fingerprints, seal). Raises
    `CompatibilityError` with the failing figure; the bundle is then left unchanged.
    """
    bundle_path = Path(bundle_path)
    bundle = Bundle.load(bundle_path, model=model, key=key)
    if out is not None and Path(out).resolve() != bundle_path.resolve():
        check_bundle_out(out)  # before the parity run, not after
    sign_key = as_key(sign_key)
    if bundle.integrity.get("signed") and sign_key is None:
        raise BundleError(f"bundle {bundle_path} is signed ({bundle.integrity.get('key_id')}): "
                          f"give the signing key (--sign-key) so the declared bundle is "
                          f"signed again")
    label = label if label is not None else (other.path.name if other.path is not None else "module")
    if not isinstance(label, str) or not label:
        raise ValueError("label must be a non-empty string")
    stored = bundle.spec.to_toml_dict()
    diff = contract_differences(stored, other)
    if diff:
        raise CompatibilityError(f"{_name(other)} cannot be declared compatible with bundle "
                                 f"{bundle_path}: its input contract differs ({'; '.join(diff)})")
    fp = model_fingerprint(other)
    if fp == bundle.model_fingerprint:
        raise ValueError(f"{_name(other)} is the bundle's own model (same fingerprint): "
                         "nothing to declare")

    base_probe = open_probe(bundle.spec)
    other_probe = open_probe(other)
    base_gate = Gatekeeper(bundle, probe=base_probe, batch_size=batch_size)
    trial = replace(bundle, compatible_fingerprints={**bundle.compatible_fingerprints, label: fp})
    other_gate = Gatekeeper(trial, probe=other_probe, batch_size=batch_size)

    x, unreadable = _inputs(images, bundle.spec, batch_size)
    n_garbage = max(32, len(x) // 2) if garbage is None else int(garbage)
    g = _garbage(x, bundle.spec, n_garbage, seed)
    figures = parity_figures(base_gate, other_gate, np.concatenate([x, g]) if len(g) else x,
                             n_real=len(x), batch_size=batch_size)
    figures["unreadable_inputs"] = unreadable
    _enforce(figures, _name(other), bundle_path)

    record = {
        "fingerprint": fp,
        "bundle_model_fingerprint": bundle.model_fingerprint,
        "model": {"file": other.path.name if other.path is not None else None,
                  "backend": other.backend,
                  "target_layer": other_probe.target_layer,
                  "early_layer": other_probe.early_layer,
                  "gradient_method": other_probe.gradient_method},
        "bundle_probe": {"backend": bundle.spec.backend, "target_layer": base_probe.target_layer,
                         "early_layer": base_probe.early_layer,
                         "gradient_method": base_probe.gradient_method},
        "rule": {"logit_rel_tol": LOGIT_REL_TOL, "cam_cosine_min": CAM_COSINE_MIN,
                 "same_class": True, "same_gate_decision": True},
        "figures": figures,
        "declared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    bundle.compatible_fingerprints = {**bundle.compatible_fingerprints, label: fp}
    compat = dict(bundle.info.get("compatibility", {}))
    compat[label] = record
    bundle.info = {**bundle.info, "compatibility": compat}
    _save_sealed(bundle, Path(out) if out is not None else bundle_path,
                 in_place=out is None or Path(out).resolve() == bundle_path.resolve(),
                 sign_key=sign_key)
    return bundle.info["compatibility"][label]


def parity_figures(base_gate: Any, other_gate: Any, x: np.ndarray, *, n_real: int | None = None,
                   batch_size: int = 64) -> dict[str, Any]:
    """Compare two gates (same bundle, two probes) on preprocessed (N, C, H, W) images.

    Returns plain-JSON figures; the first `n_real` rows are real images, the rest garbage.
    Lists of offending indices are truncated to 20.
    """
    n = len(x)
    n_real = n if n_real is None else int(n_real)
    cls_a, cls_b, acc_a, acc_b, p_a, p_b, cos = [], [], [], [], [], [], []
    logit_diff = feat_diff = early_diff = scale = 0.0
    for i in range(0, n, batch_size):
        a, b = base_gate.score_batch(x[i:i + batch_size]), other_gate.score_batch(x[i:i + batch_size])
        ra, rb = a.result, b.result
        cls_a.append(a.predicted)
        cls_b.append(b.predicted)
        acc_a.append(a.accept)
        acc_b.append(b.accept)
        p_a.append(a.p_value)
        p_b.append(b.p_value)
        cos.append(map_cosine(ra.cam, rb.cam))
        scale = max(scale, float(np.abs(ra.logits).max(initial=0.0)))
        logit_diff = max(logit_diff, _maxabs(ra.logits, rb.logits, "logits"))
        feat_diff = max(feat_diff, _maxabs(ra.features, rb.features, "penultimate features"))
        early_diff = max(early_diff, _maxabs(ra.early_map, rb.early_map, "early maps"))
        if ra.cam.shape != rb.cam.shape:
            raise CompatibilityError(f"Grad-CAM maps have shapes {list(ra.cam.shape[1:])} and "
                                     f"{list(rb.cam.shape[1:])}: the two models' target layers differ")
    cls_a, cls_b = np.concatenate(cls_a), np.concatenate(cls_b)
    acc_a, acc_b = np.concatenate(acc_a), np.concatenate(acc_b)
    p_a, p_b, cos = np.concatenate(p_a), np.concatenate(p_b), np.concatenate(cos)
    alpha = base_gate.alpha
    return {
        "images": n_real,
        "garbage_images": n - n_real,
        "class_disagreements": _where(cls_a != cls_b),
        "class_disagreement_count": int((cls_a != cls_b).sum()),
        "logit_max_abs_diff": logit_diff,
        "logit_scale": scale,
        "logit_tolerance": LOGIT_REL_TOL * max(1.0, scale),
        "cam_cosine_min": float(cos.min()) if n else 1.0,
        "cam_cosine_median": float(np.median(cos)) if n else 1.0,
        "cam_below_min": _where(cos < CAM_COSINE_MIN),
        "feature_max_abs_diff": feat_diff,
        "early_map_max_abs_diff": early_diff,
        "gate_disagreements": _where(acc_a != acc_b),
        "gate_disagreement_count": int((acc_a != acc_b).sum()),
        "accepted": {"bundle_model": int(acc_a.sum()), "other": int(acc_b.sum())},
        "accepted_real": {"bundle_model": int(acc_a[:n_real].sum()), "other": int(acc_b[:n_real].sum())},
        "p_value_max_abs_diff": float(np.abs(p_a - p_b).max(initial=0.0)),
        "alpha": alpha,
        # how close the bundle model's p-values come to the threshold (a flip needs this much)
        "p_value_min_margin_to_alpha": float(np.abs(p_a - alpha).min(initial=1.0)),
    }


def map_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image cosine of (N, ...) maps; two maps whose norms are both ~0 agree (1.0)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    tiny = ZERO_NORM_REL * max(1.0, float(np.max(na, initial=0.0)), float(np.max(nb, initial=0.0)))
    both_zero = (na <= tiny) & (nb <= tiny)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300))


def _enforce(f: dict[str, Any], name: str, bundle_path: Path) -> None:
    head = f"{name} is not compatible with bundle {bundle_path}: "
    n = f["images"] + f["garbage_images"]
    if f["class_disagreement_count"]:
        raise CompatibilityError(head + f"predicted classes differ on {f['class_disagreement_count']} "
                                 f"of {n} images ({_describe(f['class_disagreements'], f['images'])})")
    if f["logit_max_abs_diff"] > f["logit_tolerance"]:
        raise CompatibilityError(head + f"logits differ by up to {f['logit_max_abs_diff']:.3g} "
                                 f"> tolerance {f['logit_tolerance']:.3g} "
                                 f"({LOGIT_REL_TOL:g} x max(1, logit scale {f['logit_scale']:.3g}))")
    if f["cam_cosine_min"] < CAM_COSINE_MIN:
        raise CompatibilityError(head + f"Grad-CAM cosine {f['cam_cosine_min']:.6f} < {CAM_COSINE_MIN} "
                                 f"({_describe(f['cam_below_min'], f['images'])})")
    if f["gate_disagreement_count"]:
        raise CompatibilityError(head + f"gate decisions differ on {f['gate_disagreement_count']} of "
                                 f"{n} images ({_describe(f['gate_disagreements'], f['images'])}; "
                                 f"p-values differ by up to {f['p_value_max_abs_diff']:.3g})")



def _save_sealed(bundle: Bundle, out: Path, in_place: bool = True, sign_key: Any = None) -> None:
    """Save `bundle` to `out` with every declaration sealed over the content it is saved with
    (replacing `out` only when it is the bundle's own folder, `in_place`).

    The content digest is read back from a first save to a temporary sibling (the same
    in-memory objects are then saved to `out`, so the arrays are identical); `out` is
    replaced atomically, once, by the second save.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.seal-{uuid.uuid4().hex[:12]}"
    compat = {label: {k: v for k, v in rec.items() if k != "seal"}
              for label, rec in bundle.info.get("compatibility", {}).items()}
    bundle.info = {**bundle.info, "compatibility": compat}
    try:
        bundle.save(tmp)
        art = read_artifact(tmp, kind=BUNDLE_KIND, supported_versions={BUNDLE_FORMAT_VERSION})
        # the saved manifest holds the info as JSON: seal what load will read back
        saved = art.manifest["info"]["compatibility"]
        content = content_digest(art.manifest, art.arrays, art.files.get("spec.toml", b""))
        for label in bundle.compatible_fingerprints:
            compat[label] = {**saved[label], "seal": seal(label, saved[label], content)}
        bundle.info = {**bundle.info, "compatibility": compat}
        bundle.save(out, overwrite=in_place, sign_key=sign_key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Bundle.load(out, model=bundle.spec.module, key=sign_key)  # fails loudly if a seal does not verify


# ------------------------------------------------------------------ inputs
def _inputs(images: Any, spec: ModelSpec, batch_size: int) -> tuple[np.ndarray, int]:
    parts, bad = [], 0
    for records, x in iter_batches(images, spec, batch_size=batch_size):
        bad += sum(r.error is not None for r in records)
        if len(x):
            parts.append(x)
    if not parts:
        raise ValueError("declare_compatible needs at least one readable image")
    return np.concatenate(parts), bad


def _garbage(x: np.ndarray, spec: ModelSpec, n: int, seed: int) -> np.ndarray:
    if n <= 0:
        return np.empty((0, *x.shape[1:]), dtype=np.float32)
    synth, _ = synthetic_garbage(to_raw_pixels(x, spec), n, seed=seed)
    return from_raw_pixels(synth, spec)


def _maxabs(a: np.ndarray, b: np.ndarray, what: str) -> float:
    if a.shape != b.shape:
        raise CompatibilityError(f"the two models' {what} have different shapes "
                                 f"{list(a.shape[1:])} and {list(b.shape[1:])}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


def _where(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:20]]


def _describe(idx: Sequence[int], n_real: int) -> str:
    if not idx:
        return "none listed"
    names = [f"real image {i}" if i < n_real else f"garbage image {i - n_real}" for i in idx[:5]]
    return "first: " + ", ".join(names)


def _name(spec: ModelSpec) -> str:
    return f"model {spec.path.name}" if spec.path is not None else "the given module"
