"""What `verifier verify` checks in a bundle, every check reported rather than stopping at the first.

Format version, the manifest digest (every field), each file's sha256, the signature
(with a key), the model fingerprint and the compatibility seals; docs/bundle.md.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reference_maps.artifact import (MANIFEST_NAME, ArtifactError, changed_fields, manifest_digest,
                                     read_artifact, sha256_file, signed_message)
from verifier.bundle.declarations import verify_declarations
from verifier.bundle.directory import BUNDLE_FORMAT_VERSION, BUNDLE_KIND, BundleError
from verifier.bundle.signing import SignatureError, SigningKey, as_key, verify

__all__ = ["VerifyReport", "verify_bundle"]


@dataclass
class VerifyReport:
    """Every check of one bundle. `ok` is False when anything was tampered with (exit 1)."""

    bundle: str
    format_version: int
    manifest: dict[str, Any]
    files: list[dict[str, str]]
    signature: dict[str, Any]
    model: dict[str, Any]
    declarations: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "ok": self.ok, "format_version": self.format_version,
                "manifest": self.manifest, "files": self.files, "signature": self.signature,
                "model": self.model, "declarations": self.declarations, "problems": self.problems}

    def lines(self) -> list[str]:
        """The report for a person: one line per check, problems last."""
        out = [f"bundle {self.bundle}: format version {self.format_version}",
               f"  manifest digest {self.manifest['digest']}: {self.manifest['status']}"]
        out += [f"  file {f['name']}: sha256 {f['sha256'][:16]}... {f['status']}" for f in self.files]
        s = self.signature
        out.append(f"  signature: {s['status']}" + (f" ({s['detail']})" if s.get("detail") else ""))
        m = self.model
        out.append(f"  model fingerprint {m['fingerprint']}: {m['status']}"
                   + (f" ({m['detail']})" if m.get("detail") else ""))
        d = self.declarations
        out.append(f"  compatibility declarations: {d['status']}"
                   + (f" ({d['detail']})" if d.get("detail") else ""))
        out.append("OK: nothing was changed since it was written" + (
            " and signed by the key given" if s["status"] == "verified" else "")
            if self.ok else "TAMPERED: " + "; ".join(self.problems))
        return out


def verify_bundle(path: str | Path, key: str | Path | SigningKey | None = None) -> VerifyReport:
    """Check a bundle without loading its model. Raises `BundleError` when `path` is not a
    readable bundle of a supported version (exit 2); tampering is reported, not raised."""
    path = Path(path)
    key = as_key(key)
    manifest = _manifest(path)
    problems: list[str] = []

    integrity = manifest.get("integrity") if isinstance(manifest.get("integrity"), dict) else {}
    recorded = integrity.get("digest")
    try:
        digest = manifest_digest(manifest)
    except ValueError:  # NaN or Infinity written by hand: no canonical JSON exists
        digest = "none (a value is not plain JSON)"
    if recorded is None:
        m_status = "missing: the manifest has no integrity record"
        problems.append("the manifest's integrity record was removed")
    elif recorded != digest:
        changed = changed_fields(manifest)
        m_status = "EDITED (" + (", ".join(changed) if changed else "fields cannot be named") + ")"
        problems.append(f"manifest.json was edited: {', '.join(changed) or 'unknown fields'}")
    else:
        m_status = "ok (matches every manifest field)"

    files = _files(path, manifest, problems)
    signature = _signature(integrity, digest, key, problems)
    model = _model(path, manifest, problems)
    declarations = _declarations(path, manifest, problems)
    return VerifyReport(bundle=str(path), format_version=manifest["format_version"],
                        manifest={"digest": digest, "recorded": recorded, "status": m_status},
                        files=files, signature=signature, model=model,
                        declarations=declarations, problems=problems)


def _manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_NAME
    if not path.is_dir() or not mpath.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST_NAME} in a folder there")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{path} is not a {BUNDLE_KIND}")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path} is a bundle in format version {manifest.get('format_version')}; "
                          f"this software reads format version {BUNDLE_FORMAT_VERSION} (rebuild it)")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath} has no 'files' table of checksums")
    return manifest


def _files(path: Path, manifest: dict[str, Any], problems: list[str]) -> list[dict[str, str]]:
    out = []
    for name, want in sorted(manifest["files"].items()):
        f = path / name
        if not f.is_file():
            status = "MISSING"
        else:
            status = "ok" if sha256_file(f) == want else "MODIFIED (sha256 differs)"
        if status != "ok":
            problems.append(f"file {name} {status.split(' ')[0].lower()}")
        out.append({"name": name, "sha256": str(want), "status": status})
    listed = set(manifest["files"])
    for extra in sorted(p.relative_to(path).as_posix() for p in path.rglob("*.npz")):
        if extra not in listed:
            problems.append(f"array file {extra} is not listed in the manifest")
            out.append({"name": extra, "sha256": sha256_file(path / extra), "status": "UNLISTED"})
    return out


def _signature(integrity: dict[str, Any], digest: str, key: SigningKey | None,
               problems: list[str]) -> dict[str, Any]:
    record = integrity.get("signature")
    info = {"alg": record.get("alg") if isinstance(record, dict) else None,
            "key_id": record.get("key_id") if isinstance(record, dict) else None}
    if record is None:
        if key is not None:
            problems.append(f"the bundle is not signed, so it cannot be verified with key {key.key_id}")
            return {**info, "status": "UNSIGNED", "detail": "a key was given: an unsigned bundle fails"}
        return {**info, "status": "unsigned", "detail": "the checksums are consistent, but anyone "
                "who edits a bundle can recompute them: sign it to prove who issued it"}
    if key is None:
        return {**info, "status": "signed, not checked",
                "detail": f"by {info['alg']} key {info['key_id']}; give --key to verify"}
    try:
        verify(key, record, signed_message(digest))
    except SignatureError as e:
        problems.append(f"signature refused: {e}")
        return {**info, "status": "INVALID", "detail": str(e)}
    return {**info, "status": "verified", "detail": f"{key.alg} key {key.key_id}"}


def _model(path: Path, manifest: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    from verifier.spec import SpecError, model_fingerprint, spec_from_dict

    expected = str(manifest.get("model_fingerprint"))
    try:
        tables = tomllib.loads((path / "spec.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        problems.append("spec.toml cannot be read")
        return {"fingerprint": expected, "status": "NOT CHECKED", "detail": f"spec.toml: {e}"}
    if "path" not in tables.get("model", {}):
        return {"fingerprint": expected, "status": "not checkable",
                "detail": "built from an in-memory PyTorch module, whose weights the bundle does not hold"}
    try:
        actual = model_fingerprint(spec_from_dict(tables, base_dir=path, source=path / "spec.toml"))
    except (SpecError, OSError) as e:
        problems.append(f"the model cannot be fingerprinted: {e}")
        return {"fingerprint": expected, "status": "NOT CHECKED", "detail": str(e)}
    if actual != expected:
        problems.append("the model file is not the model the bundle was built for")
        return {"fingerprint": expected, "status": "MISMATCH", "detail": f"the model file has {actual}"}
    return {"fingerprint": expected, "status": "ok", "detail": "the bundle's model file matches"}


def _declarations(path: Path, manifest: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    declared = manifest.get("compatible_fingerprints") or {}
    if not declared:
        return {"status": "none"}
    if problems:
        return {"status": "not checked", "detail": "the bundle's content is already refused"}
    try:
        art = read_artifact(path, kind=BUNDLE_KIND, supported_versions={BUNDLE_FORMAT_VERSION})
        verify_declarations(path, art.manifest, art.arrays, art.files.get("spec.toml", b""))
    except (ArtifactError, BundleError) as e:
        problems.append(f"compatibility declaration refused: {e}")
        return {"status": "REFUSED", "detail": str(e)}
    return {"status": f"{len(declared)} sealed ({', '.join(sorted(declared))})"}
