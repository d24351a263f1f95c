"""Bundles are never written over a user's folder, and no edit to one loads silently.

Issue 10, findings 1 and 2: the same steps as the report (a folder of notes and the
calibration folder given as --out; alpha, combine, higher_is_worse and class names
edited in manifest.json; checksums recomputed by hand), with HMAC and Ed25519 keys.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import CAL, POOL, TRAIN, write_onnx_model

from reference_maps.artifact import field_digests, manifest_digest
from verifier.bundle.directory import Bundle, BundleError
from verifier.cli.main import main
from verifier.data import save_dataset
from verifier.examples.zoo import mnist_spec

CLASSES = [str(i) for i in range(10)]


def _snapshot(folder):
    return {q.relative_to(folder).as_posix(): q.read_bytes() for q in sorted(folder.rglob("*")) if q.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory, mnist, gap_model):
    """An ONNX model file, its spec, PNG folders (reference, 150 calibration images) and a
    signed bundle built through the CLI, plus an HMAC key file."""

    root = tmp_path_factory.mktemp("site")
    write_onnx_model(root, gap_model)
    x, y = mnist
    save_dataset(x[TRAIN][:800], y[TRAIN][:800], CLASSES, root / "ref")
    save_dataset(x[CAL][:150], y[CAL][:150], CLASSES, root / "cal")
    (root / "key").write_bytes(hashlib.sha256(b"test key, seeded").digest())
    assert _build(root, root / "bundle", "--sign-key", str(root / "key")) == 0
    return root


def _build(root, out, *extra):
    return main(["build", "--spec", str(root / "model.toml"), "--data", str(root / "ref"),
                 "--calibration", str(root / "cal"), "--out", str(out), *extra])


def _copy(site, tmp_path, name="b"):
    return shutil.copytree(site / "bundle", tmp_path / name)


def _edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=2))
    return m


def _reseal(bundle, strip_signature=False):
    """What someone who edits a bundle and knows the format does: recompute every sha256
    and the manifest digest by hand (hashlib, not the package's code)."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in m["files"]}
    body = {k: v for k, v in m.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    m["integrity"]["digest"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    m["integrity"]["fields"] = field_digests(m)
    if strip_signature:
        m["integrity"].pop("signature")
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


# ------------------------------------------------------------------ finding 1: --out
def test_build_refuses_a_folder_of_notes(site, tmp_path, capsys):
    notes = tmp_path / "notes"
    (notes / "drafts").mkdir(parents=True)
    (notes / "meeting.txt").write_text("minutes of the meeting")
    (notes / "drafts" / "plan.md").write_text("# plan")
    before = _snapshot(notes)
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert _build(site, notes, *extra) == 2
        assert "is not empty and is not a verifier-bundle" in capsys.readouterr().err
        assert _snapshot(notes) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temp sibling left


def test_build_refuses_the_calibration_folder(site, capsys):
    before = _snapshot(site / "cal")
    assert sum(k.endswith(".png") for k in before) == 150
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert _build(site, site / "cal", *extra) == 2
        assert "refusing to write there" in capsys.readouterr().err
        assert _snapshot(site / "cal") == before


def test_overwrite_replaces_only_a_bundle(site, tmp_path, capsys):
    b = _copy(site, tmp_path)
    before = _snapshot(b)
    assert _build(site, b) == 2
    assert "already holds a verifier-bundle; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    (b / "notes.txt").write_text("a person's notes inside the bundle folder")
    assert _build(site, b, "--overwrite") == 2
    assert "holds files it did not write (notes.txt)" in capsys.readouterr().err
    assert _snapshot(b) == {**before, "notes.txt": b"a person's notes inside the bundle folder"}
    (b / "notes.txt").unlink()
    assert _build(site, b, "--overwrite", "--alpha", "0.1") == 0
    assert Bundle.load(b).alpha == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ------------------------------------------------------------------ finding 2: tampering
@pytest.mark.parametrize("field,change", [
    ("alpha", lambda m: m.__setitem__("alpha", 0.0001)),
    ("combine", lambda m: m.__setitem__("combine", "bonferroni")),
    ("higher_is_worse", lambda m: m["higher_is_worse"].__setitem__("garbage", False)),
    ("classes", lambda m: m["classes"].__setitem__(3, "three")),
    ("info", lambda m: m["info"]["build"].__setitem__("calibration_accuracy", 1.0)),
])
def test_a_manifest_edit_is_refused_and_named(site, tmp_path, capsys, field, change):
    b = _copy(site, tmp_path)
    _edit_manifest(b, change)
    with pytest.raises(BundleError, match=rf"edited after it was written: field\(s\) {field} changed"):
        Bundle.load(b)
    capsys.readouterr()
    assert main(["gate", "--bundle", str(b), str(site / "cal" / "3")]) == 2
    assert f"field(s) {field} changed" in capsys.readouterr().err
    assert main(["verify", str(b), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["manifest"]["status"] == f"EDITED ({field})"


def test_a_class_name_edited_in_spec_toml_is_refused(site, tmp_path, capsys):
    b = _copy(site, tmp_path)
    spec = (b / "spec.toml").read_text()
    (b / "spec.toml").write_text(spec.replace('"3"', '"three"', 1))
    with pytest.raises(BundleError, match="'spec.toml' .* was modified after it was written"):
        Bundle.load(b)
    assert main(["verify", str(b), "--json"]) == 1
    files = {f["name"]: f["status"] for f in json.loads(capsys.readouterr().out)["files"]}
    assert files["spec.toml"].startswith("MODIFIED") and files["model.onnx"] == "ok"


def test_resealed_by_hand_refused_with_the_key(site, tmp_path, capsys):
    """alpha 0.0001 and every checksum recomputed by hand: only the signature catches it."""
    key = site / "key"
    b = _copy(site, tmp_path)
    _edit_manifest(b, lambda m: m.__setitem__("alpha", 0.0001))
    _reseal(b)
    assert Bundle.load(b, check_model=False).alpha == 0.0001  # consistent: without a key it loads
    with pytest.raises(BundleError, match="signature is refused: the HMAC does not match"):
        Bundle.load(b, key=key)
    capsys.readouterr()
    for cmd in (["gate", "--bundle", str(b), str(site / "cal" / "3")],
                ["drift", "--bundle", str(b), "--log", str(tmp_path)],
                ["audit", "--bundle", str(b), "--spec", str(site / "model.toml"), "--data", str(site / "cal")]):
        assert main([*cmd, "--verify-key", str(key)]) == 2
        assert "HMAC does not match" in capsys.readouterr().err
    assert main(["verify", str(b), "--key", str(key), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["signature"]["status"] == "INVALID"
    assert main(["verify", str(b), "--json"]) == 0  # without a key: consistent, signature not checked
    assert json.loads(capsys.readouterr().out)["signature"]["status"] == "signed, not checked"

    _reseal(b, strip_signature=True)  # the signature removed too
    assert main(["verify", str(b)]) == 0
    out = capsys.readouterr().out
    assert "signature: unsigned (the checksums are consistent, but anyone who edits a bundle can recompute them" in out
    with pytest.raises(BundleError, match="it is not signed, so it cannot be verified with key hmac:"):
        Bundle.load(b, key=key)
    assert main(["verify", str(b), "--key", str(key)]) == 1
    assert "TAMPERED: the bundle is not signed" in capsys.readouterr().out


def test_intact_signed_bundle_verifies(site, tmp_path, capsys, mnist):
    key = site / "key"
    assert main(["verify", str(site / "bundle"), "--key", str(key), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and r["format_version"] == 2 and r["signature"]["status"] == "verified"
    assert r["model"]["status"] == "ok"
    m = json.loads((site / "bundle" / "manifest.json").read_text())
    assert r["manifest"]["digest"] == m["integrity"]["digest"] == manifest_digest(m)
    assert r["model"]["fingerprint"] == m["model_fingerprint"]
    assert {f["name"]: f["sha256"] for f in r["files"]} == m["files"]
    for f in r["files"]:  # independent hash of each file
        assert hashlib.sha256((site / "bundle" / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    other = tmp_path / "other.key"
    other.write_bytes(b"another key of 32 bytes, not it!")
    assert main(["verify", str(site / "bundle"), "--key", str(other)]) == 1
    assert main(["gate", "--bundle", str(site / "bundle"), str(site / "cal" / "3"), "--json",
                 "--verify-key", str(other)]) == 2
    capsys.readouterr()
    assert main(["gate", "--bundle", str(site / "bundle"), str(site / "cal" / "3"), "--json",
                 "--verify-key", str(key)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(list((site / "cal" / "3").iterdir()))
    short = tmp_path / "short.key"
    short.write_bytes(b"pass")
    assert main(["verify", str(site / "bundle"), "--key", str(short)]) == 2
    assert "use at least 16 random bytes" in capsys.readouterr().err
    assert main(["verify", str(site / "cal")]) == 2


def test_a_replaced_model_file_is_refused(site, tmp_path, capsys, gap_model):
    import copy

    import torch

    from verifier.probe.onnx_backend import export_onnx

    b = _copy(site, tmp_path)
    other = copy.deepcopy(gap_model)
    with torch.no_grad():
        other.head[-1].bias.add_(0.01)  # a slightly different model
    export_onnx(other, mnist_spec(other), tmp_path / "other.onnx")
    shutil.copy(tmp_path / "other.onnx", b / "model.onnx")
    _reseal(b, strip_signature=True)
    with pytest.raises(BundleError, match="was built for model"):
        Bundle.load(b)
    assert main(["verify", str(b), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["model"]["status"] == "MISMATCH"


def test_ed25519_private_signs_public_verifies(site, tmp_path, capsys):
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"seed").digest())
    (tmp_path / "priv.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    b = _copy(site, tmp_path)
    Bundle.load(b).save(b, overwrite=True, sign_key=tmp_path / "priv.pem")
    loaded = Bundle.load(b, key=tmp_path / "pub.pem")
    assert loaded.integrity["verified"] and loaded.integrity["alg"] == "ed25519"
    # independent check of the signature with the cryptography package itself
    m = json.loads((b / "manifest.json").read_text())
    private.public_key().verify(bytes.fromhex(m["integrity"]["signature"]["value"]),
                                f"verifier-manifest/1\n{m['integrity']['digest']}".encode())
    with pytest.raises(BundleError, match="public key"):
        Bundle.load(b).save(tmp_path / "c", sign_key=tmp_path / "pub.pem")
    with pytest.raises(BundleError, match="signed with ed25519 key .* not with the hmac-sha256 key"):
        Bundle.load(b, key=site / "key")
    _edit_manifest(b, lambda m: m.__setitem__("alpha", 0.0001))
    _reseal(b)
    with pytest.raises(BundleError, match="Ed25519 signature does not verify"):
        Bundle.load(b, key=tmp_path / "pub.pem")
    assert main(["verify", str(b), "--key", str(tmp_path / "pub.pem")]) == 1


def test_gate_on_intact_bundle_still_decides(site, mnist):
    """The integrity layer changes nothing in what a bundle decides."""
    from verifier.runtime.gatekeeper import Gatekeeper

    gate = Gatekeeper.load(site / "bundle", key=site / "key")
    decisions = gate.gate(np.asarray(mnist[0][POOL][:50]))
    assert sum(d.accepted for d in decisions) >= 40


def test_declare_keeps_a_signed_bundle_signed(site, gap_model, mnist, tmp_path, capsys):
    """The compatibility seal is covered by the digest and the signature: declaring on a
    signed bundle needs the key, and a hand-resealed declaration is refused with the key."""
    import torch

    key = site / "key"
    b = _copy(site, tmp_path)
    torch.jit.trace(gap_model.eval(), torch.zeros(1, 1, 28, 28)).save(str(tmp_path / "model.pt"))
    (tmp_path / "ts.toml").write_text((site / "model.toml").read_text().replace("model.onnx", "model.pt"))
    folder = tmp_path / "in"
    save_dataset(mnist[0][POOL][:40], mnist[1][POOL][:40], CLASSES, folder)
    declare = ["declare", "--bundle", str(b), "--spec", str(tmp_path / "ts.toml"), "--data", str(folder)]
    before = _snapshot(b)
    assert main(declare) == 2
    assert "is signed (hmac:" in capsys.readouterr().err
    assert _snapshot(b) == before
    assert main([*declare, "--out", str(site / "cal")]) == 2  # --out follows the same rule
    assert main([*declare, "--verify-key", str(key), "--sign-key", str(key)]) == 0
    capsys.readouterr()
    assert main(["verify", str(b), "--key", str(key), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["signature"]["status"] == "verified" and r["declarations"]["status"] == "1 sealed (model.pt)"
    gate = ["gate", "--bundle", str(b), "--spec", str(tmp_path / "ts.toml"), str(folder / "3"),
            "--verify-key", str(key)]
    assert main(gate) == 0
    # a figure of the declaration edited, its seal left alone, every checksum recomputed
    _edit_manifest(b, lambda m: m["info"]["compatibility"]["model.pt"]["figures"].__setitem__(
        "cam_cosine_min", 1.0))
    _reseal(b)
    assert main(gate) == 2
    assert "HMAC does not match" in capsys.readouterr().err
    _reseal(b, strip_signature=True)
    capsys.readouterr()
    assert main(["verify", str(b), "--json"]) == 1  # and without a key, the seal itself fails
    assert json.loads(capsys.readouterr().out)["declarations"]["status"] == "REFUSED"
