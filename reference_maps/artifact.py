"""Safe on-disk artifacts: a directory of .npz arrays and raw files under a checksummed manifest.

Written to a temporary sibling then renamed into place, never over a folder this module
did not write; read back only if kind, format version, the digest of the whole manifest
and the sha256 of every file agree. An optional signature covers that digest. Never pickle.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Artifact", "ArtifactError", "write_artifact", "read_artifact", "sha256_file",
           "MANIFEST_NAME", "INTEGRITY_SCHEME", "manifest_digest", "field_digests",
           "changed_fields", "signed_message", "check_destination", "Signer"]

MANIFEST_NAME = "manifest.json"
#: name and version of the canonical manifest hashing below (part of every signed message)
INTEGRITY_SCHEME = "verifier-manifest/1"
#: manifest keys this module owns; a caller's manifest may not set them
_RESERVED = ("kind", "format_version", "created", "package_versions", "files", "arrays",
             "integrity")
#: a signer gets the message to sign (bytes) and returns a JSON-able signature record
Signer = Callable[[bytes], dict[str, Any]]
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class ArtifactError(ValueError):
    """An artifact cannot be written or read as asked (missing, foreign, modified, unsafe)."""


@dataclass
class Artifact:
    """What `read_artifact` returns.

    manifest: the whole parsed `manifest.json`
    arrays:   {group name (file name without ".npz"): {key: array}}, loaded without pickle
    files:    {relative file name: bytes} for every listed file that is not an array group
    """

    manifest: dict[str, Any]
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """"sha256:<hex>" of the canonical manifest (every field except `integrity`)."""
        return self.manifest["integrity"]["digest"]

    @property
    def signature(self) -> dict[str, Any] | None:
        """The signature record written with the artifact, or None (not verified here)."""
        return self.manifest["integrity"].get("signature")


def write_artifact(path: str | os.PathLike[str], *, kind: str, format_version: int,
                   arrays: Mapping[str, Mapping[str, np.ndarray]], manifest: Mapping[str, Any],
                   files: Mapping[str, bytes] | None = None, overwrite: bool = False,
                   sign: Signer | None = None) -> None:
    """Write an artifact directory at `path`.

    `arrays` maps a group name ("reference" or "store/moments") to the arrays of one
    `.npz` file ("reference.npz"); `files` maps relative names ("spec.toml") to raw bytes.
    Object dtypes are refused. Everything goes to a temporary sibling first, so a
    failure mid-way leaves `path` as it was and no temporary directory behind.

    `path` may be missing or an empty folder; an existing artifact of the same `kind` is
    replaced only with `overwrite=True` (see `check_destination`); anything else is refused
    and left untouched. `sign(message) -> record` adds a signature over the manifest digest.
    """
    path = Path(path)
    check_destination(path, kind, overwrite)
    clash = sorted(set(manifest) & set(_RESERVED))
    if clash:
        raise ArtifactError(f"manifest fields {clash} are reserved for the artifact writer")
    files = dict(files or {})
    names = [_check_name(g + ".npz") for g in arrays] + [_check_name(n) for n in files]
    if MANIFEST_NAME in names or len(set(names)) != len(names):
        raise ArtifactError(f"artifact file names must be unique and not {MANIFEST_NAME!r}: {names}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        digests: dict[str, str] = {}
        layout: dict[str, dict[str, dict[str, Any]]] = {}
        for group, content in arrays.items():
            data = _npz_bytes(group, content)
            digests[group + ".npz"] = _write_bytes(tmp / (group + ".npz"), data)
            layout[group] = {k: {"dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v))}
                             for k, v in content.items()}
        for name, data in files.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ArtifactError(f"file {name!r} must be bytes, got {type(data).__name__}")
            digests[name] = _write_bytes(tmp / name, bytes(data))
        full = {
            "kind": kind,
            "format_version": int(format_version),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_versions": _package_versions(),
            **dict(manifest),
            "arrays": layout,
            "files": dict(sorted(digests.items())),
        }
        try:  # through JSON and back: the digest is of what a reader will parse
            full = json.loads(json.dumps(full, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest is not plain JSON (numbers, strings, lists, dicts; "
                                f"no NaN): {exc}") from exc
        digest = manifest_digest(full)
        integrity: dict[str, Any] = {"scheme": INTEGRITY_SCHEME, "digest": digest,
                                     "fields": field_digests(full)}
        if sign is not None:
            integrity["signature"] = dict(sign(signed_message(digest)))
        full["integrity"] = integrity
        text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
        _write_bytes(tmp / MANIFEST_NAME, text.encode("utf-8"))
        _swap_into_place(tmp, path, kind, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_artifact(path: str | os.PathLike[str], *, kind: str,
                  supported_versions: Collection[int]) -> Artifact:
    """Read and verify an artifact directory; `ArtifactError` with the reason otherwise.

    Checks, in order: directory and manifest present; `kind` matches; format version
    supported; the manifest's digest (every field, so no hand edit passes); every listed
    file present with its recorded sha256; no unlisted `.npz`. A signature is returned
    (`Artifact.signature`), not verified: the caller holds the key.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"no {kind} at {path}: the directory does not exist")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a {kind}: it has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nesting: fuzzing
        raise ArtifactError(f"{mpath} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} must hold a JSON object")
    actual = manifest.get("kind")
    if actual != kind:
        raise ArtifactError(f"{path} is a {actual or 'directory of unknown kind'}, not a {kind}")
    version = manifest.get("format_version")
    supported = sorted(int(v) for v in supported_versions)
    if version not in supported:
        raise ArtifactError(f"{path} is a {kind} in format version {version}; this software "
                            f"reads format version(s) {supported}")
    _check_integrity(path, manifest)
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{mpath} has no 'files' table of checksums")

    out = Artifact(manifest=manifest)
    for name, digest in sorted(listed.items()):
        _check_name(name)
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(f"{kind} at {path} is incomplete: listed file {name!r} is missing")
        data = fpath.read_bytes()  # hash and parse the same bytes
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{name!r} in {path} was modified after it was written "
                                f"(sha256 differs from the manifest)")
        if name.endswith(".npz"):
            out.arrays[name[:-4]] = _load_npz(name, data)
        else:
            out.files[name] = data
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.npz")
                   if p.relative_to(path).as_posix() not in listed)
    if extra:
        raise ArtifactError(f"{path} holds array files its manifest does not list: {extra}")
    return out


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """"sha256:<hex>" of the canonical JSON of every manifest field except `integrity`
    (keys sorted, no spaces, UTF-8): any edit to any value changes it."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def field_digests(manifest: Mapping[str, Any]) -> dict[str, str]:
    """{top-level field: short sha256 of its canonical JSON}: names what an edit changed."""
    return {k: hashlib.sha256(_canonical_or_repr(v)).hexdigest()[:16]
            for k, v in sorted(manifest.items()) if k != "integrity"}


def changed_fields(manifest: Mapping[str, Any]) -> list[str]:
    """Top-level fields whose value differs from the digests recorded at write time
    ("x (added)", "x (removed)"); empty when the record itself was edited too."""
    recorded = (manifest.get("integrity") or {}).get("fields")
    if not isinstance(recorded, dict):
        return []
    now = field_digests(manifest)
    out = [k for k in sorted(now) if k in recorded and recorded[k] != now[k]]
    out += [f"{k} (added)" for k in sorted(set(now) - set(recorded))]
    out += [f"{k} (removed)" for k in sorted(set(recorded) - set(now))]
    return out


def signed_message(digest: str) -> bytes:
    """The bytes a signature covers: the scheme name and the manifest digest."""
    return f"{INTEGRITY_SCHEME}\n{digest}".encode("ascii")


def check_destination(path: str | os.PathLike[str], kind: str, overwrite: bool) -> None:
    """Refuse (ArtifactError) to write an artifact of `kind` at `path` unless `path` is
    missing, an empty folder, or (with `overwrite`) an artifact of the same kind holding
    nothing but the files its manifest lists. Never deletes anything itself."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        what = "a symbolic link" if path.is_symlink() else "not a folder"
        raise ArtifactError(f"{path} exists and is {what}; refusing to replace it")
    entries = _entries(path)
    if not entries:
        return
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        written_by_us = isinstance(manifest, dict) and manifest.get("kind") == kind
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        written_by_us = False
    if not written_by_us:
        raise ArtifactError(f"{path} is not empty and is not a {kind} written by this tool; "
                            f"refusing to write there (nothing was changed): choose a new or "
                            f"empty folder")
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    allowed = {MANIFEST_NAME, *listed}
    allowed |= {p.as_posix() for n in listed for p in Path(n).parents if p.as_posix() != "."}
    foreign = [e for e in entries if e not in allowed]
    if foreign:
        raise ArtifactError(f"{path} is a {kind} but also holds files it did not write "
                            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                            f"refusing to replace it (nothing was changed)")
    if not overwrite:
        raise ArtifactError(f"{path} already holds a {kind}; pass overwrite=True "
                            f"(--overwrite) to replace it")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical_or_repr(obj: Any) -> bytes:
    try:
        return _canonical(obj)
    except ValueError:  # NaN or Infinity written by hand: still differs from any JSON value
        return b"not plain JSON: " + repr(obj).encode("utf-8")


def _entries(path: Path) -> list[str]:
    """Every name under `path` (folders too), relative POSIX; links are listed, not followed."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path)
        out += [(rel / n).as_posix() for n in dirs + files]
    return sorted(out)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _check_integrity(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest without an integrity record or whose digest does not match."""
    integrity = manifest.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("digest"), str):
        raise ArtifactError(f"{path / MANIFEST_NAME} has no integrity record (written by an "
                            f"older version, or stripped by hand): rebuild it")
    if integrity.get("scheme") != INTEGRITY_SCHEME:
        raise ArtifactError(f"{path / MANIFEST_NAME} uses integrity scheme "
                            f"{integrity.get('scheme')!r}; this software checks {INTEGRITY_SCHEME!r}")
    try:
        actual = manifest_digest(manifest)
    except ValueError:  # NaN or Infinity written by hand: never what was written
        actual = None
    if actual != integrity["digest"]:
        changed = changed_fields(manifest)
        what = (f"field(s) {', '.join(changed)} changed" if changed
                else "its content and its integrity record were both edited")
        raise ArtifactError(f"{path / MANIFEST_NAME} was edited after it was written: {what} "
                            f"(the manifest digest differs); refusing to load it")


def _check_name(name: str) -> str:
    """Relative POSIX names of plain characters only: no '..', no absolute paths."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise ArtifactError(f"unsafe or invalid artifact file name {name!r}")
    return name


def _npz_bytes(group: str, content: Mapping[str, np.ndarray]) -> bytes:
    clean: dict[str, np.ndarray] = {}
    for key, value in content.items():
        if not _KEY_RE.match(key):
            raise ArtifactError(f"invalid array name {key!r} in {group!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise ArtifactError(f"array {group}/{key} has object dtype; artifacts hold plain "
                                f"numeric or fixed-width string arrays only (no pickle)")
        clean[key] = arr
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **clean)
    return buf.getvalue()


def _load_npz(name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise ArtifactError(f"{name!r} cannot be loaded without pickle: {exc}") from exc


def _write_bytes(target: Path, data: bytes) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _swap_into_place(tmp: Path, path: Path, kind: str, overwrite: bool) -> None:
    """Rename `tmp` to `path`; an existing artifact at `path` (checked again, just before)
    is moved aside first and deleted after; an empty folder is simply replaced."""
    check_destination(path, kind, overwrite)
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # rename onto a missing or empty folder
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _package_versions() -> dict[str, str]:
    import scipy
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
