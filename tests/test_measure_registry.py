"""The measure registry, fully wired: a measure registered once (here a toy negative-L1
distance, registered by this test and removed afterwards) is built into a bundle, named in its
manifest, calibrated, scored by the gate and reported by the audit with no other edit.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CAL, POOL

from verifier.audit.run import audit
from verifier.bundle.builder import build_bundle
from verifier.bundle.directory import Bundle, BundleError
from verifier.examples.zoo import mnist_spec, preprocess_uint8
from verifier.reports.audit import render_html
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.scoring.comparator import ATTENTION_MEASURES, higher_is_worse
from verifier.scoring.measures import (MEASURES, compare_maps, measure_direction, measure_of,
                                       register_measure, unregister_measure)

TOY = "neg_l1"
TOY_SCORES = (TOY, f"early_{TOY}")


def _neg_l1(maps: np.ndarray, refs: np.ndarray, options: object) -> np.ndarray:
    """Minus the mean absolute difference of two canonical maps (0 = identical)."""
    return -np.abs(maps - refs).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory, mnist, gap_model, gap_bundle):
    """A bundle built while the toy measure is registered; the measure is removed on teardown.

    `gap_bundle` (session-wide, seven measures) is built first, so it never holds the toy."""
    x, y = mnist
    register_measure(TOY, higher_is_better=True, ideal=0.0,
                     description="minus the mean absolute difference")(_neg_l1)
    try:
        out = tmp_path_factory.mktemp("toy") / "bundle"
        build_bundle(mnist_spec(gap_model), (x[:1500], y[:1500]), out,
                     calibration=(x[CAL], y[CAL]), seed=0)
        yield out
    finally:
        unregister_measure(TOY)
    assert TOY not in MEASURES


def test_manifest_names_the_measures_and_calibration_holds_the_toy(toy_bundle, gap_model):
    manifest = json.loads((toy_bundle / "manifest.json").read_text())
    assert manifest["measures"] == [*ATTENTION_MEASURES, TOY]
    bundle = Bundle.load(toy_bundle, model=gap_model)
    assert bundle.measures == (*ATTENTION_MEASURES, TOY)
    for name in TOY_SCORES:
        assert name in bundle.calibration_scores and np.isfinite(bundle.calibration_scores[name]).all()
        assert bundle.calibrator.higher_is_worse[name] is False  # higher = more similar
        assert bundle.higher_is_worse[name] is False


def test_gate_scores_and_calibrates_the_toy(toy_bundle, gap_model, mnist):
    gate = Gatekeeper.load(toy_bundle, model=gap_model)
    x = preprocess_uint8(mnist[0][POOL][:64]).numpy()
    batch = gate.score_batch(x)
    cam, early = gate.comparator.canonical(batch.result)
    store = gate.bundle.store
    want = _neg_l1(cam.astype(np.float64), store.cam_reference[batch.predicted].astype(np.float64), None)
    np.testing.assert_allclose(batch.scores[TOY], want, rtol=0, atol=1e-12)
    decisions = gate.gate(mnist[0][POOL][:16])
    for d in decisions:
        row = d.to_dict()
        for name in TOY_SCORES:
            assert np.isfinite(row["scores"][name])
            assert 0.0 < row["p_values"][name] <= 1.0


def test_audit_reports_the_toy(toy_bundle, gap_model, mnist):
    x, y = mnist
    bundle = Bundle.load(toy_bundle, model=gap_model)
    result = audit(bundle, mnist_spec(gap_model), (x[POOL][:300], y[POOL][:300]),
                   evidence_images=60, sanity=False)
    checks = {c.name: c for c in result.checks}
    assert TOY in checks["attention_per_image"].details["measures"]
    assert f"early_{TOY}" in checks["early_per_image"].details["measures"]
    per_class = checks["attention_per_class"].details["classes"]
    assert all(TOY in v["measures"] for v in per_class.values())
    assert result.evidence is not None and TOY in result.evidence.agreement
    assert TOY in json.dumps(result.to_dict())
    assert f">{TOY}<" in render_html(result)  # its histogram's axis label


def test_an_older_bundle_keeps_its_own_measures(toy_bundle, gap_bundle, gap_model, mnist):
    """A bundle built with the seven measures is scored with those seven, toy registered or not."""
    gate = Gatekeeper.load(gap_bundle, model=gap_model)
    assert gate.bundle.measures == ATTENTION_MEASURES
    batch = gate.score_batch(preprocess_uint8(mnist[0][POOL][:8]).numpy())
    assert not set(TOY_SCORES) & set(batch.scores)


def test_a_bundle_with_an_unregistered_measure_is_refused(toy_bundle, gap_model, monkeypatch):
    monkeypatch.delitem(MEASURES, TOY)  # restored after this test
    with pytest.raises(BundleError, match=f"{TOY}.*not register"):
        Bundle.load(toy_bundle, model=gap_model)


def test_prefixed_names_resolve_to_their_measure(toy_bundle):
    assert measure_of("crm_iou") == "iou" and measure_of(f"early_{TOY}") == TOY
    assert measure_of("early_mahalanobis") is None and measure_of("knn") is None
    assert measure_direction("gradcampp_kl") is False and higher_is_worse("crm_kl") is True
    assert measure_direction(f"crm_{TOY}") is True


def test_build_refuses_an_unknown_measure(mnist, gap_model, tmp_path):
    x, y = mnist
    with pytest.raises(ValueError, match="unknown measure"):
        build_bundle(mnist_spec(gap_model), (x[:200], y[:200]), tmp_path / "b",
                     calibration=(x[CAL], y[CAL]), measures=["iou", "nope"])


def test_builtin_measures_cannot_be_unregistered():
    with pytest.raises(ValueError, match="built-in"):
        unregister_measure("iou")
    with pytest.raises(KeyError):
        unregister_measure("never_registered")
    assert list(compare_maps(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), ["iou"])) == ["iou"]
