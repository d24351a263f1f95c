"""Compatibility declarations inside a bundle: their seal, and the check `Bundle.load` runs.

A bundle is valid only for the model it was calibrated with (its `model_fingerprint`).
Another model (e.g. the ONNX export of the same network) is accepted only once
`verifier.runtime.parity.declare_compatible` has measured that both models agree and has
written a declaration into the bundle's manifest (`compatible_fingerprints[label]`, figures in
`info["compatibility"][label]`). The rule and the measuring live there; this module holds
what the bundle needs to trust a declaration on load.

Each declaration carries a `seal`: sha256 over the declaration record and a digest of the
bundle's content (calibration and reference arrays, spec, alpha, classes, the bundle's own
model fingerprint). `Bundle.load` verifies every seal, so a fingerprint added to
`manifest.json` by hand, a figure edited, or a declaration copied into another bundle is
refused. The seal is integrity, not authenticity: it has no secret key, so whoever can run
this code can compute a seal for anything (docs/onnx.md). The seal lives in the manifest,
so the bundle's digest and (with `sign_key`) its signature cover it too.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from verifier.bundle.errors import BundleError

__all__ = ["verify_declarations", "content_digest", "seal", "CompatibilityError",
           "LOGIT_REL_TOL", "CAM_COSINE_MIN", "ZERO_NORM_REL", "SEAL_VERSION"]

#: logits may differ by at most this times max(1, largest |logit| of the bundle's model)
LOGIT_REL_TOL = 1e-4
#: every image's Grad-CAM cosine between the two models must reach this
CAM_COSINE_MIN = 0.999
#: a map whose norm is below this times max(1, largest map norm in the batch) counts as ~0
ZERO_NORM_REL = 1e-6
#: version of the seal's hashed layout
SEAL_VERSION = 1
#: manifest keys a declaration is bound to (besides arrays and spec.toml)
_BOUND_KEYS = ("kind", "format_version", "model_fingerprint", "alpha", "combine",
               "calibration_size", "classes", "grid", "higher_is_worse", "reference_metadata")


class CompatibilityError(BundleError):
    """Another model is not compatible with a bundle; the message names the failing figure."""



# ------------------------------------------------------------------ sealing
def verify_declarations(path: Path, manifest: Mapping[str, Any],
                        arrays: Mapping[str, Mapping[str, np.ndarray]], spec_toml: bytes) -> None:
    """Refuse (BundleError) a bundle whose compatibility declarations are not all sealed
    over its present content. Called by `Bundle.load` on every bundle that has some."""
    declared = manifest.get("compatible_fingerprints") or {}
    if not isinstance(declared, dict):
        raise BundleError(f"bundle {path}: compatible_fingerprints must be a JSON object")
    records = (manifest.get("info") or {}).get("compatibility") or {}
    content = None
    for label, fp in sorted(declared.items()):
        rec = records.get(label) if isinstance(records, dict) else None
        why = None
        if not isinstance(rec, dict) or "seal" not in rec:
            why = "it has no sealed declaration record (info.compatibility)"
        elif rec.get("fingerprint") != fp:
            why = "its fingerprint differs from the one its declaration record measured"
        else:
            content = content or content_digest(manifest, arrays, spec_toml)
            if rec["seal"] != seal(label, rec, content):
                why = ("its seal does not match the record and this bundle's content "
                       "(edited by hand, or copied from another bundle)")
        if why:
            raise BundleError(
                f"bundle {path}: the compatibility declaration {label!r} for model "
                f"{str(fp).split(':')[-1][:12]} is refused: {why}. Only "
                f"verifier.runtime.parity.declare_compatible may add one; re-declare the model with it")


def content_digest(manifest: Mapping[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]],
                   spec_toml: bytes) -> str:
    """sha256 of what a declaration is bound to: the calibration-defining manifest fields,
    spec.toml, and every array's name, dtype, shape and bytes (not file bytes, which
    carry zip timestamps)."""
    h = hashlib.sha256()
    bound = {k: manifest.get(k) for k in _BOUND_KEYS}
    h.update(json.dumps(bound, sort_keys=True, allow_nan=False).encode("utf-8"))
    h.update(b"\0spec.toml\0" + bytes(spec_toml))
    for group in sorted(arrays):
        for key in sorted(arrays[group]):
            a = np.ascontiguousarray(arrays[group][key])
            h.update(f"\0{group}/{key}\0{a.dtype.str}\0{list(a.shape)}\0".encode("utf-8"))
            h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def seal(label: str, record: Mapping[str, Any], content: str) -> str:
    body = {k: v for k, v in record.items() if k != "seal"}
    text = json.dumps({"seal_version": SEAL_VERSION, "label": label, "record": body,
                       "content": content}, sort_keys=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
