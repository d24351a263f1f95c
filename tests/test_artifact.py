"""Tests for reference_maps.artifact: checksummed, versioned, atomic, pickle-free directories."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from reference_maps.artifact import (MANIFEST_NAME, ArtifactError, field_digests, manifest_digest,
                                     read_artifact, sha256_file, write_artifact)


def _arrays() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "main": {"a": rng.normal(size=(3, 4)), "b": np.arange(5, dtype=np.int64),
                 "names": np.array(["normal", "pneumonia"])},
        "reference/maps": {"m": rng.random((2, 16, 16)).astype(np.float32)},
    }


def _write(path, **kw):
    args = dict(kind="test-kind", format_version=2, arrays=_arrays(),
                manifest={"model_fingerprint": "abc", "grid": [16, 16]},
                files={"spec.toml": b"[model]\npath = 'm.onnx'\n", "model.onnx": b"\x00\x01binary"})
    args.update(kw)
    write_artifact(path, **args)


def test_round_trip_and_manifest(tmp_path):
    p = tmp_path / "art"
    _write(p)
    art = read_artifact(p, kind="test-kind", supported_versions=[1, 2])
    for group, content in _arrays().items():
        assert set(art.arrays[group]) == set(content)
        for k, v in content.items():
            assert art.arrays[group][k].dtype == v.dtype
            assert np.array_equal(art.arrays[group][k], v)
    assert art.files == {"spec.toml": b"[model]\npath = 'm.onnx'\n", "model.onnx": b"\x00\x01binary"}
    m = json.loads((p / MANIFEST_NAME).read_text())
    assert m["kind"] == "test-kind" and m["format_version"] == 2
    assert m["model_fingerprint"] == "abc" and m["grid"] == [16, 16]
    assert set(m["package_versions"]) == {"python", "numpy", "scipy", "scikit-learn"}
    assert m["created"].endswith("+00:00")
    assert set(m["files"]) == {"main.npz", "reference/maps.npz", "spec.toml", "model.onnx"}
    for name, digest in m["files"].items():  # independent hash of each file on disk
        assert hashlib.sha256((p / name).read_bytes()).hexdigest() == digest
        assert sha256_file(p / name) == digest
    assert m["arrays"]["reference/maps"]["m"] == {"dtype": "<f4", "shape": [2, 16, 16]}


def test_refusals(tmp_path):
    p = tmp_path / "art"
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(p, kind="test-kind", supported_versions=[2])
    p.mkdir()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_artifact(p, kind="test-kind", supported_versions=[2])
    _write(p)
    with pytest.raises(ArtifactError, match="is a test-kind, not a reference-store"):
        read_artifact(p, kind="reference-store", supported_versions=[2])
    with pytest.raises(ArtifactError, match=r"format version 2; .*reads format version\(s\) \[1, 3\]"):
        read_artifact(p, kind="test-kind", supported_versions=[3, 1])

    (p / "extra.npz").write_bytes((p / "main.npz").read_bytes())
    with pytest.raises(ArtifactError, match=r"does not list: \['extra.npz'\]"):
        read_artifact(p, kind="test-kind", supported_versions=[2])
    (p / "extra.npz").unlink()

    raw = bytearray((p / "reference" / "maps.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (p / "reference" / "maps.npz").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="'reference/maps.npz' .* was modified after it was written"):
        read_artifact(p, kind="test-kind", supported_versions=[2])

    _write(p, overwrite=True)  # replaces the damaged artifact
    read_artifact(p, kind="test-kind", supported_versions=[2])
    (p / "spec.toml").unlink()
    with pytest.raises(ArtifactError, match="listed file 'spec.toml' is missing"):
        read_artifact(p, kind="test-kind", supported_versions=[2])


def test_object_arrays_and_bad_names_refused_atomically(tmp_path):
    p = tmp_path / "art"
    bad = {"good": {"x": np.ones(3)}, "bad": {"o": np.array([{"a": 1}, None], dtype=object)}}
    with pytest.raises(ArtifactError, match="object dtype"):
        _write(p, arrays=bad)
    assert list(tmp_path.iterdir()) == []  # no half directory, no temp sibling

    _write(p)
    before = {q.relative_to(p).as_posix(): q.read_bytes() for q in p.rglob("*") if q.is_file()}
    with pytest.raises(ArtifactError, match="object dtype"):
        _write(p, arrays=bad, overwrite=True)
    after = {q.relative_to(p).as_posix(): q.read_bytes() for q in p.rglob("*") if q.is_file()}
    assert before == after  # the old artifact survives a failed overwrite untouched
    assert [q.name for q in tmp_path.iterdir()] == ["art"]

    for name in ("../escape", "/abs", "a/../../b"):
        with pytest.raises(ArtifactError, match="unsafe or invalid"):
            _write(p, files={name: b"x"}, overwrite=True)
    with pytest.raises(ArtifactError, match="reserved"):
        _write(p, manifest={"files": {}}, overwrite=True)
    with pytest.raises(ArtifactError, match="plain JSON"):
        _write(p, manifest={"x": float("nan")}, overwrite=True)
    assert [q.name for q in tmp_path.iterdir()] == ["art"]


def test_overwrite_replaces_content(tmp_path):
    p = tmp_path / "art"
    _write(p)
    write_artifact(p, kind="test-kind", format_version=2, arrays={"only": {"z": np.zeros(2)}},
                   manifest={}, overwrite=True)
    art = read_artifact(p, kind="test-kind", supported_versions=[2])
    assert list(art.arrays) == ["only"] and art.files == {}
    assert not (p / "spec.toml").exists() and not (p / "main.npz").exists()
    assert [q.name for q in tmp_path.iterdir()] == ["art"]


def test_pickled_npz_is_refused_even_if_listed(tmp_path):
    """A hand-made artifact whose npz holds a pickled object array does not load."""
    p = tmp_path / "art"
    p.mkdir()
    np.savez(p / "evil.npz", o=np.array([1, "x"], dtype=object), allow_pickle=True)
    manifest = {"kind": "test-kind", "format_version": 2,
                "files": {"evil.npz": sha256_file(p / "evil.npz")}}
    manifest["integrity"] = {"scheme": "verifier-manifest/1", "digest": manifest_digest(manifest)}
    (p / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="without pickle"):
        read_artifact(p, kind="test-kind", supported_versions=[2])


def _snapshot(folder):
    return {q.relative_to(folder).as_posix(): q.read_bytes() for q in folder.rglob("*") if q.is_file()}


def test_never_replaces_a_folder_it_did_not_write(tmp_path):
    """A folder of notes, a foreign artifact, or an artifact with extra files is never touched."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    (notes / "sub").mkdir()
    (notes / "sub" / "scan.png").write_bytes(b"\x89PNG fake")
    before = _snapshot(notes)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not empty and is not a test-kind"):
            _write(notes, overwrite=overwrite)
        assert _snapshot(notes) == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["notes"]  # no temp sibling left

    other = tmp_path / "other"  # an artifact of another kind
    _write(other, kind="other-kind")
    with pytest.raises(ArtifactError, match="not a test-kind"):
        _write(other, overwrite=True)

    art = tmp_path / "art"
    _write(art)
    with pytest.raises(ArtifactError, match="already holds a test-kind; pass overwrite"):
        _write(art)
    (art / "my-notes.txt").write_text("added by a person")
    with_notes = _snapshot(art)
    with pytest.raises(ArtifactError, match=r"holds files it did not write \(my-notes.txt\)"):
        _write(art, overwrite=True)
    assert _snapshot(art) == with_notes
    (art / "my-notes.txt").unlink()
    _write(art, overwrite=True, files={})
    assert not (art / "spec.toml").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty)  # an empty folder is fine
    read_artifact(empty, kind="test-kind", supported_versions=[2])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        _write(tmp_path / "file")


def _edit(path, change):
    m = json.loads((path / MANIFEST_NAME).read_text())
    change(m)
    (path / MANIFEST_NAME).write_text(json.dumps(m))
    return m


@pytest.mark.parametrize("field,change", [
    ("grid", lambda m: m["grid"].__setitem__(0, 8)),
    ("grid", lambda m: m["grid"].__setitem__(0, float("nan"))),  # not even plain JSON
    ("model_fingerprint", lambda m: m.__setitem__("model_fingerprint", "abd")),
    ("arrays", lambda m: m["arrays"]["main"]["a"].__setitem__("shape", [4, 3])),
    ("files", lambda m: m["files"].__setitem__("spec.toml", "0" * 64)),
    ("extra (added)", lambda m: m.__setitem__("extra", 1)),
    ("created (removed)", lambda m: m.pop("created")),
])
def test_every_manifest_edit_is_refused_and_named(tmp_path, field, change):
    p = tmp_path / "art"
    _write(p)
    m = json.loads((p / MANIFEST_NAME).read_text())
    assert m["integrity"]["digest"] == manifest_digest(m)
    # the digest is of the canonical JSON: independent recomputation with hashlib
    body = {k: v for k, v in m.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert m["integrity"]["digest"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    _edit(p, change)
    with pytest.raises(ArtifactError, match=rf"edited after it was written: field\(s\) {re.escape(field)} changed"):
        read_artifact(p, kind="test-kind", supported_versions=[2])


def test_integrity_record_required_and_checked(tmp_path):
    p = tmp_path / "art"
    _write(p)
    # the edit and its recorded field digests both rewritten: still refused (digest differs)
    def forge(m):
        m["grid"] = [8, 8]
        m["integrity"]["fields"] = field_digests(m)
    _edit(p, forge)
    with pytest.raises(ArtifactError, match="content and its integrity record were both edited"):
        read_artifact(p, kind="test-kind", supported_versions=[2])
    _edit(p, lambda m: m.pop("integrity"))
    with pytest.raises(ArtifactError, match="has no integrity record"):
        read_artifact(p, kind="test-kind", supported_versions=[2])


def test_signer_record_is_stored_over_the_digest(tmp_path):
    import hmac

    key = b"k" * 32
    p = tmp_path / "art"
    _write(p, sign=lambda msg: {"alg": "hmac-sha256", "value": hmac.new(key, msg, "sha256").hexdigest()})
    art = read_artifact(p, kind="test-kind", supported_versions=[2])
    msg = f"verifier-manifest/1\n{art.digest}".encode()
    assert art.signature["value"] == hmac.new(key, msg, "sha256").hexdigest()
