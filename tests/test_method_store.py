"""A bundle holding reference maps of several attribution methods (`build --methods gradcam,crm`):
the manifest names them and loading checks them; the stored per-class maps are the means of
`attribute(..., "crm")`; the gate and the audit score every stored method with every measure;
ONNX bundles work with the methods onnxruntime can run and refuse the others (exit code 2).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CAL, POOL, write_onnx_model

from reference_maps.artifact import _RESERVED, read_artifact, write_artifact
from reference_maps.canonical import to_grid
from reference_maps.store import ReferenceStore
from verifier.attribution import METHODS, AttributionError, attribute, onnx_methods
from verifier.audit.run import audit
from verifier.bundle.builder import build_bundle
from verifier.bundle.directory import BUNDLE_KIND, Bundle, BundleError
from verifier.cli.main import main
from verifier.data import iter_batches, save_dataset
from verifier.examples.zoo import mnist_spec
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.scoring.attention import check_methods, score_prefix
from verifier.scoring.comparator import ATTENTION_MEASURES
from verifier.scoring.measures import compare_maps
from verifier.spec import load_spec

REF = slice(0, 640)  # reference digits of the small bundles (10 batches of 64)
BATCH = 64
CRM_SCORES = tuple(f"crm_{m}" for m in ATTENTION_MEASURES)


@pytest.fixture(scope="module")
def crm_bundle(tmp_path_factory, mnist, gap_model):
    """gradcam + crm, built through the Python API from the in-memory module."""
    x, y = mnist
    out = tmp_path_factory.mktemp("crm") / "bundle"
    build_bundle(mnist_spec(gap_model), (x[REF], y[REF]), out, calibration=(x[CAL], y[CAL]),
                 seed=0, batch_size=BATCH, methods="gradcam,crm")
    return out


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory, mnist, gap_model):
    """The same model exported to ONNX, PNG folders, and a CLI-built gradcam + crm bundle."""
    root = tmp_path_factory.mktemp("crm_onnx")
    write_onnx_model(root, gap_model)
    x, y = mnist
    classes = [str(i) for i in range(10)]
    save_dataset(x[REF], y[REF], classes, root / "ref")
    save_dataset(x[CAL][:300], y[CAL][:300], classes, root / "cal")
    save_dataset(x[POOL][:20], y[POOL][:20], classes, root / "in")
    code = main(["build", "--spec", str(root / "model.toml"), "--data", str(root / "ref"),
                 "--calibration", str(root / "cal"), "--out", str(root / "bundle"),
                 "--methods", "gradcam,crm"])
    assert code == 0
    return root


def test_manifest_names_the_methods(crm_bundle, gap_model):
    manifest = json.loads((crm_bundle / "manifest.json").read_text())
    assert manifest["methods"] == ["gradcam", "crm"]
    assert {"method.crm.raw_mean", "method.crm.mean"} <= set(manifest["arrays"]["reference"])
    bundle = Bundle.load(crm_bundle, model=gap_model)
    assert bundle.methods == ("gradcam", "crm") and bundle.store.methods == ("crm",)


def test_stored_maps_are_the_class_means_of_attribute(crm_bundle, gap_model, mnist):
    """The store's raw CRM map of class c is the mean of `attribute(model, x, "crm", target=c)`
    over the reference images of class c (CRM's class-specific ROI map), to 1e-10; its
    canonical reference is the mean of the canonical maps."""
    x, y = mnist
    spec = mnist_spec(gap_model)
    maps, canon, start = [], [], 0
    for _, xb in iter_batches(x[REF], spec, batch_size=BATCH):  # the builder's batches
        lab, start = y[REF][start:start + len(xb)], start + len(xb)
        m = attribute(gap_model, xb, "crm", target=lab)
        maps.append(m)
        canon.append(to_grid(m, (16, 16)))
    maps, canon = np.concatenate(maps), np.concatenate(canon)
    store = Bundle.load(crm_bundle, model=gap_model).store
    raw = store.method_raw_mean("crm")
    assert raw.shape == (10, *maps.shape[1:]) and raw.dtype == np.float64
    assert (raw < 0).any() and (raw > 0).any()  # CRM is signed
    for c in range(10):
        np.testing.assert_allclose(raw[c], maps[y[REF] == c].mean(axis=0), rtol=0, atol=1e-10)
        np.testing.assert_allclose(store.method_reference("crm")[c],
                                   canon[y[REF] == c].astype(np.float64).mean(axis=0), rtol=0, atol=1e-6)


def test_gate_scores_every_stored_method(crm_bundle, gap_model, mnist):
    gate = Gatekeeper.load(crm_bundle, model=gap_model)
    raw = mnist[0][POOL][:32]
    batch = gate.score_batch(next(iter_batches(raw, gate.bundle.spec, batch_size=32))[1])
    crm = attribute(gap_model, next(iter_batches(raw, gate.bundle.spec, batch_size=32))[1], "crm",
                    target=batch.predicted)
    want = compare_maps(to_grid(crm, (16, 16)),
                        gate.bundle.store.method_reference("crm")[batch.predicted], prefix="crm_",
                        names=ATTENTION_MEASURES)
    for name in CRM_SCORES:
        np.testing.assert_allclose(batch.scores[name], want[name], rtol=0, atol=1e-9)
    for d in gate.gate(raw[:8]):
        row = d.to_dict()
        assert set(CRM_SCORES) | set(ATTENTION_MEASURES) <= set(row["scores"])  # gradcam names kept
        assert all(0.0 < row["p_values"][n] <= 1.0 for n in CRM_SCORES)
    assert set(CRM_SCORES) <= set(gate.bundle.calibration_scores)


def test_audit_scores_every_stored_method(crm_bundle, gap_model, mnist):
    x, y = mnist
    bundle = Bundle.load(crm_bundle, model=gap_model)
    result = audit(bundle, mnist_spec(gap_model), (x[POOL][:200], y[POOL][:200]),
                   evidence_images=40, sanity=False)
    checks = {c.name: c for c in result.checks}
    assert set(checks["crm_attention_per_image"].details["measures"]) == set(CRM_SCORES)
    assert checks["crm_attention_per_image"].passed  # the reference against itself
    assert "crm_attention_per_class" in checks
    assert set(CRM_SCORES) <= set(result.evidence.agreement)


def test_onnx_bundle_with_crm(onnx_root, capsys):
    manifest = json.loads((onnx_root / "bundle" / "manifest.json").read_text())
    assert manifest["methods"] == ["gradcam", "crm"]
    capsys.readouterr()
    assert main(["gate", "--bundle", str(onnx_root / "bundle"), str(onnx_root / "in"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 20
    for row in lines:
        assert row["error"] is None and set(CRM_SCORES) <= set(row["p_values"])
        assert all(np.isfinite(row["scores"][n]) for n in CRM_SCORES)
    bundle = Bundle.load(onnx_root / "bundle")
    spec = load_spec(onnx_root / "model.toml")
    result = audit(bundle, spec, onnx_root / "in", evidence_images=20, sanity=False)
    assert {c.name for c in result.checks} >= {"crm_attention_per_image", "crm_attention_per_class"}


@pytest.mark.parametrize("methods, words", [("gradcam,saliency", ["saliency", *onnx_methods()]),
                                            ("gradcam,nope", ["nope", *METHODS])])
def test_build_refuses_unknown_or_unsupported_methods(onnx_root, tmp_path, capsys, methods, words):
    capsys.readouterr()
    code = main(["build", "--spec", str(onnx_root / "model.toml"), "--data", str(onnx_root / "ref"),
                 "--calibration", str(onnx_root / "cal"), "--out", str(tmp_path / "b"),
                 "--methods", methods])
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err
    assert not (tmp_path / "b").exists()


def test_check_methods_puts_gradcam_first_and_refuses_on_onnx(onnx_root):
    assert check_methods("crm") == ("gradcam", "crm")
    assert check_methods(["gradcam", "crm", "crm"]) == ("gradcam", "crm")
    assert score_prefix("gradcam") == "" and score_prefix("gradcam++") == "gradcampp_"
    with pytest.raises(AttributionError, match="ONNX backend runs: gradcam, scorecam"):
        check_methods("guided_backprop", load_spec(onnx_root / "model.toml"))


def _rewrite(src, dst, edit):
    """Copy a bundle with `edit(manifest, arrays)` applied, re-digested (as an older or a
    foreign writer would have written it)."""
    art = read_artifact(src, kind=BUNDLE_KIND, supported_versions={2})
    manifest = {k: v for k, v in art.manifest.items() if k not in _RESERVED}
    edit(manifest, art.arrays)
    write_artifact(dst, kind=BUNDLE_KIND, format_version=2, arrays=art.arrays,
                   manifest=manifest, files=art.files)
    return dst


def test_bundle_without_the_fields_loads_as_gradcam_only(crm_bundle, gap_model, tmp_path):
    def old(manifest, arrays):
        del manifest["methods"], manifest["measures"]
        arrays["reference"] = {k: v for k, v in arrays["reference"].items()
                               if not k.startswith("method.")}
        drop = [k for k in manifest["higher_is_worse"] if k.startswith("crm_")]
        for k in drop:
            del manifest["higher_is_worse"][k]
    bundle = Bundle.load(_rewrite(crm_bundle, tmp_path / "old", old), model=gap_model)
    assert bundle.methods == ("gradcam",) and bundle.measures == ATTENTION_MEASURES
    assert bundle.store.methods == ()


def test_bundle_naming_an_unknown_method_is_refused(crm_bundle, gap_model, monkeypatch):
    monkeypatch.delitem(METHODS, "crm")  # code that does not know crm (restored afterwards)
    with pytest.raises(BundleError, match="crm.*does not know"):
        Bundle.load(crm_bundle, model=gap_model)


def test_bundle_whose_store_lacks_a_method_is_refused(crm_bundle, gap_model, tmp_path):
    def lacking(manifest, arrays):
        arrays["reference"] = {k: v for k, v in arrays["reference"].items()
                               if not k.startswith("method.crm.")}
    with pytest.raises(BundleError, match="maps of method 'crm' are missing"):
        Bundle.load(_rewrite(crm_bundle, tmp_path / "lacking", lacking), model=gap_model)


def test_store_methods_merge_and_round_trip(tmp_path):
    """Two stores of the same method maps merge exactly into one built from all rows."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    maps = rng.normal(size=(60, 5, 5))
    def store(rows):
        s = ReferenceStore(["a", "b", "c"], grid=(8, 8), methods=["crm", "gradcam++"])
        s.update(labels[rows], to_grid(np.abs(maps[rows]), (8, 8)), to_grid(np.abs(maps[rows]), (8, 8)),
                 rng.normal(size=(len(labels[rows]), 4)),
                 maps={"crm": maps[rows], "gradcam++": np.abs(maps[rows])})
        return s
    whole, a = store(slice(None)), store(slice(0, 25)).merge(store(slice(25, None)))
    for c in range(3):
        np.testing.assert_allclose(a.method_raw_mean("crm")[c], maps[labels == c].mean(0), atol=1e-12)
    np.testing.assert_allclose(a.method_reference("gradcam++"), whole.method_reference("gradcam++"),
                               atol=1e-6)
    a.save(tmp_path / "s")
    back = ReferenceStore.load(tmp_path / "s")
    assert back.methods == ("crm", "gradcam++")
    np.testing.assert_array_equal(back.method_raw_mean("crm"), a.method_raw_mean("crm"))
    with pytest.raises(ValueError, match="maps must be given"):
        a.update(labels[:2], to_grid(np.abs(maps[:2]), (8, 8)), to_grid(np.abs(maps[:2]), (8, 8)),
                 rng.normal(size=(2, 4)))


def test_audit_skips_a_method_the_candidate_cannot_run(onnx_root, gap_model):
    """A module-built bundle storing saliency, audited against an ONNX candidate: the saliency
    checks are skipped with the reason (naming what ONNX runs), crm is compared."""
    from types import SimpleNamespace

    from verifier.audit.run import _runnable_methods

    bundle = SimpleNamespace(store=SimpleNamespace(methods=("crm", "saliency")),
                             spec=mnist_spec(gap_model))
    ok, skipped = _runnable_methods(bundle, load_spec(onnx_root / "model.toml"))
    assert ok == ("crm",) and list(skipped) == ["saliency"]
    assert "ONNX backend runs: gradcam, scorecam, cam, crm" in skipped["saliency"]
