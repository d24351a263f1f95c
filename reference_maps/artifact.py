"""Safe on-disk artifacts: a directory of .npz arrays and raw files under a checksummed manifest.

Written to a temporary sibling then renamed into place; read back only if kind,
format version and the sha256 of every file agree with `manifest.json`. Never pickle.
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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Artifact", "ArtifactError", "write_artifact", "read_artifact", "sha256_file",
           "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
#: manifest keys this module owns; a caller's manifest may not set them
_RESERVED = ("kind", "format_version", "created", "package_versions", "files", "arrays")
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


def write_artifact(path: str | os.PathLike[str], *, kind: str, format_version: int,
                   arrays: Mapping[str, Mapping[str, np.ndarray]], manifest: Mapping[str, Any],
                   files: Mapping[str, bytes] | None = None) -> None:
    """Write an artifact directory at `path`, replacing any directory already there.

    `arrays` maps a group name ("reference" or "store/moments") to the arrays of one
    `.npz` file ("reference.npz"); `files` maps relative names ("spec.toml") to raw bytes.
    Object dtypes are refused. Everything goes to a temporary sibling first, so a
    failure mid-way leaves `path` as it was and no temporary directory behind.
    """
    path = Path(path)
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
        try:
            text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest is not plain JSON (numbers, strings, lists, dicts; "
                                f"no NaN): {exc}") from exc
        _write_bytes(tmp / MANIFEST_NAME, text.encode("utf-8"))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_artifact(path: str | os.PathLike[str], *, kind: str,
                  supported_versions: Collection[int]) -> Artifact:
    """Read and verify an artifact directory; `ArtifactError` with the reason otherwise.

    Checks, in order: directory and manifest present; `kind` matches; format version
    supported; every listed file present with its recorded sha256; no unlisted `.npz`.
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside first and deleted after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; refusing to replace it")
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
