"""What a bundle holds is what was fitted: issue 10, finding 7 (the bundle's part) and finding 3.

The binary garbage head equals scikit-learn's logistic regression; any class name
survives the spec.toml round trip; an ONNX model's external weights are fingerprinted
and copied; the report colormaps match matplotlib's without depending on it.
"""
from __future__ import annotations

import shutil
import tomllib
from dataclasses import replace

import numpy as np
import pytest
from conftest import CAL, POOL, TRAIN
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from verifier.bundle.directory import Bundle, BundleError
from verifier.examples.zoo import mnist_spec
from verifier.scoring.garbage import GarbageHead
from verifier.spec import ModelSpec, model_fingerprint


def _digits(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Real 8x8 digits of two classes as 64-d features, and their labels (a -> 0, b -> 1)."""
    x, y = load_digits(return_X_y=True)
    keep = (y == a) | (y == b)
    return x[keep].astype(np.float64), (y[keep] == b).astype(np.int64)


@pytest.mark.parametrize("pair", [(3, 8), (1, 7)])
def test_binary_garbage_head_equals_sklearn(pair):
    """One real class plus garbage: P(garbage) is sklearn's predict_proba, not sigmoid(2z)."""
    x, lab = _digits(*pair)  # label 1 plays the garbage class of a one-class model
    head = GarbageHead(num_classes=1, seed=0).fit(x, lab)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    ref = LogisticRegression(C=1.0, max_iter=300, random_state=0).fit(z, lab)
    want = ref.predict_proba(z)
    got = head.probabilities(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    logit = z @ ref.coef_[0] + ref.intercept_[0]
    doubled = 1.0 / (1.0 + np.exp(-2.0 * logit))  # what rows [-coef, coef] gave: sigmoid(2z)
    assert np.abs(doubled - want[:, 1]).max() > 1e-3  # so this test tells the two apart


def test_two_class_model_with_one_class_seen_equals_sklearn():
    """K=2 but only class 1 and garbage in the head's sample: the unseen class gets ~0 and
    the two seen columns are sklearn's probabilities."""
    x, lab = _digits(3, 8)
    labels = np.where(lab == 1, 2, 1)  # class 1 and garbage (2); class 0 unseen
    head = GarbageHead(num_classes=2, seed=0).fit(x, labels)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    want = LogisticRegression(C=1.0, max_iter=300, random_state=0).fit(z, labels).predict_proba(z)
    got = head.probabilities(x)
    assert got[:, 0].max() < 1e-300
    np.testing.assert_allclose(got[:, 1:], want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(head.garbage_probability(x), want[:, 1], rtol=0, atol=1e-9)


def test_class_names_outside_the_bmp_round_trip(gap_bundle, gap_model, tmp_path, mnist):
    b = Bundle.load(gap_bundle, model=gap_model)
    names = ("𝔸 normal", "pneumonia 🫁", 'quote " and \\ backslash', "tab\tname", "ünïcødé",
             "\U0010fffd private", "5", "6", "7", "8")
    b.spec = replace(b.spec, classes=names)
    b.save(tmp_path / "b")
    raw = tomllib.loads((tmp_path / "b" / "spec.toml").read_text(encoding="utf-8"))
    assert tuple(raw["model"]["classes"]) == names  # an independent TOML reader agrees
    back = Bundle.load(tmp_path / "b", model=gap_model)
    assert back.classes == names
    from verifier.runtime.gatekeeper import Gatekeeper

    d = Gatekeeper(back).gate(np.asarray(mnist[0][POOL][:5]))
    assert all(x.predicted_class in names for x in d)


@pytest.fixture(scope="module")
def external_onnx(tmp_path_factory, gap_model):
    """The gap model as ONNX with every tensor in an external file `weights.bin`."""
    import onnx

    from verifier.probe.onnx_backend import export_onnx

    root = tmp_path_factory.mktemp("ext")
    export_onnx(gap_model, mnist_spec(gap_model), root / "plain.onnx")
    model = onnx.load(str(root / "plain.onnx"))
    (root / "m").mkdir()
    onnx.save_model(model, str(root / "m" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (root / "m" / "weights.bin").stat().st_size > 10_000
    return root


def _spec(path):
    return ModelSpec(classes=tuple(str(i) for i in range(10)), size=(28, 28), channels=1,
                     mean=(0.1307,), std=(0.3081,), path=path)


def test_onnx_external_data_is_fingerprinted(external_onnx, tmp_path):
    src = external_onnx / "m"
    work = shutil.copytree(src, tmp_path / "m")
    fp = model_fingerprint(_spec(work / "model.onnx"))
    raw = bytearray((work / "weights.bin").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one weight changed; model.onnx itself unchanged
    (work / "weights.bin").write_bytes(bytes(raw))
    assert (work / "model.onnx").read_bytes() == (src / "model.onnx").read_bytes()
    assert model_fingerprint(_spec(work / "model.onnx")) != fp
    plain = _spec(external_onnx / "plain.onnx")  # no external data: the plain file hash, as before
    import hashlib
    assert model_fingerprint(plain) == "sha256:" + hashlib.sha256(
        (external_onnx / "plain.onnx").read_bytes()).hexdigest()


def test_onnx_external_data_is_copied_into_the_bundle(external_onnx, tmp_path, mnist):
    from verifier.bundle.builder import build_bundle
    from verifier.bundle.integrity import verify_bundle
    from verifier.runtime.gatekeeper import Gatekeeper

    work = shutil.copytree(external_onnx / "m", tmp_path / "m")
    x, y = mnist
    build_bundle(_spec(work / "model.onnx"), (x[TRAIN][:600], y[TRAIN][:600]), tmp_path / "b",
                 calibration=(x[CAL][:200], y[CAL][:200]), seed=0)
    assert (tmp_path / "b" / "weights.bin").read_bytes() == (work / "weights.bin").read_bytes()
    shutil.rmtree(work)  # the bundle must not need the original files
    report = verify_bundle(tmp_path / "b")
    assert report.ok and report.model["status"] == "ok"
    assert {f["name"] for f in report.files} >= {"model.onnx", "weights.bin"}
    d = Gatekeeper.load(tmp_path / "b").gate(np.asarray(x[POOL][:40]))
    assert sum(z.accepted for z in d) >= 30
    raw = bytearray((tmp_path / "b" / "weights.bin").read_bytes())
    raw[100] ^= 0x01
    (tmp_path / "b" / "weights.bin").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="'weights.bin' .* was modified"):
        Bundle.load(tmp_path / "b")


def test_colormaps_match_matplotlib():
    colormaps = pytest.importorskip("matplotlib").colormaps
    from verifier.reports.html import COLORMAPS, colormap

    t = np.linspace(0, 1, 1001)
    for name in COLORMAPS:
        got = colormap(t, name).astype(int)
        want = colormaps[name](t, bytes=True).astype(int)
        assert np.abs(got - want).max() <= 4, name
        assert (got[:, 3] == 255).all()
    with pytest.raises(ValueError, match="unknown colormap"):
        colormap(t, "no-such-map")
