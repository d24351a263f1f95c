"""Tests for reference_maps.store on real MNIST digits: streaming equals one-shot, merge, save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import OAS

from reference_maps.artifact import ArtifactError
from reference_maps.canonical import to_grid
from reference_maps.store import ReferenceStore
from verifier.examples.datasets import (load_mnist)  # tests only: real digits as stand-in probe outputs

CLASSES = [str(d) for d in range(10)]
FINGERPRINT = "a1b2c3d4e5f6" + "0" * 52
META = {"model_fingerprint": FINGERPRINT, "target_layer": "conv2", "early_layer": "conv1",
        "attribution": "gradcam"}


@pytest.fixture(scope="module")
def data():
    """~1,800 real digits; class 9 cut to 6 images so it must use the pooled covariance."""
    x, y = load_mnist()
    x, y = x[:2000].astype(np.float64) / 255.0, np.asarray(y[:2000])
    keep = (y != 9) | (np.cumsum(y == 9) <= 6)
    x, y = x[keep], y[keep]
    cam = to_grid(x)                                                   # (N, 16, 16)
    grad = np.hypot(ndimage.sobel(x, axis=1), ndimage.sobel(x, axis=2))
    early = to_grid(grad)                                              # (N, 16, 16)
    blocks = x.reshape(len(x), 4, 7, 4, 7).mean(axis=(2, 4)).reshape(len(x), 16)
    stats = np.concatenate([blocks, x.std(axis=(1, 2))[:, None]], axis=1)  # (N, 17)
    return y, cam, early, stats


def _stream(y, cam, early, stats, cuts, metadata=META):
    store = ReferenceStore(CLASSES, grid=(16, 16), metadata=metadata)
    for idx in np.split(np.arange(len(y)), cuts):
        store.update(y[idx], cam[idx], early[idx], stats[idx])
    return store


def test_streaming_equals_one_shot(data):
    y, cam, early, stats = data
    store = _stream(y, cam, early, stats, cuts=[1, 7, 300, 301, 1200])
    assert store.counts.tolist() == np.bincount(y, minlength=10).tolist()
    assert store.counts[9] == 6 and store.early_channels == 17
    arr = store.to_arrays()
    for k in range(10):
        rows = y == k
        c64, e64 = cam[rows].astype(np.float64), early[rows].astype(np.float64)
        np.testing.assert_allclose(arr["cam_mean"][k], c64.mean(0).ravel(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(arr["early_m2"][k] / rows.sum(), e64.var(0).ravel(),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(store.cam_reference[k], c64.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(store.cam_std[k], c64.std(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(store.early_reference[k], e64.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(store.early_std[k], e64.std(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(store.stats_mean[k], stats[rows].mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(arr["stats_m2"][k] / (rows.sum() - 1), np.cov(stats[rows].T),
                                   rtol=1e-10, atol=1e-14)
    assert store.cam_reference.dtype == np.float32 and store.cam_reference.shape == (10, 16, 16)


def test_shrunk_covariance_matches_sklearn_oas(data):
    y, cam, early, stats = data
    store = _stream(y, cam, early, stats, cuts=[500, 1000])
    assert store.min_class_count == 10  # max(10, ceil(17 / 4))
    assert store.stats_pooled.tolist() == [False] * 9 + [True]
    cov, prec = store.stats_covariance, store.stats_precision
    for k in range(9):
        oas = OAS(assume_centered=False).fit(stats[y == k])
        np.testing.assert_allclose(cov[k], oas.covariance_, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(store.stats_shrinkage[k], oas.shrinkage_, rtol=1e-9)
    # pooled: every row centred on its own class mean, then OAS over all rows
    centred = stats - np.stack([stats[y == k].mean(0) for k in range(10)])[y]
    pooled = OAS(assume_centered=False).fit(centred).covariance_
    np.testing.assert_allclose(cov[9], pooled, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(prec[9] @ pooled, np.eye(17), atol=1e-6)
    assert np.linalg.eigvalsh(cov).min() > 0


def test_mahalanobis_matches_scipy(data):
    y, cam, early, stats = data
    store = _stream(y, cam, early, stats, cuts=[900])
    rng = np.random.default_rng(1)
    rows = rng.choice(len(y), 60, replace=False)
    classes = rng.integers(0, 10, 60)  # also distances to other classes' statistics
    got = store.mahalanobis(stats[rows], classes)
    centred = stats - np.stack([stats[y == k].mean(0) for k in range(10)])[y]
    for i, (r, k) in enumerate(zip(rows, classes)):
        sample = stats[y == k] if k != 9 else centred
        vi = np.linalg.inv(OAS().fit(sample).covariance_)
        want = scipy_mahalanobis(stats[r], stats[y == k].mean(0), vi)
        assert got[i] == pytest.approx(want, rel=1e-7)
    assert got.dtype == np.float64 and got.shape == (60,)
    # a digit's own class is closer on average than a wrong class (real signal, not noise)
    own = store.mahalanobis(stats[:500], y[:500])
    other = store.mahalanobis(stats[:500], (y[:500] + 1) % 9)
    assert np.median(own) < np.median(other)


def test_merge_of_halves_equals_whole(data):
    y, cam, early, stats = data
    whole = _stream(y, cam, early, stats, cuts=[])
    a = _stream(y[:700], cam[:700], early[:700], stats[:700], cuts=[100])
    b = _stream(y[700:], cam[700:], early[700:], stats[700:], cuts=[3, 400])
    merged = a.merge(b)
    for key, value in whole.to_arrays().items():
        np.testing.assert_allclose(merged.to_arrays()[key], value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.stats_covariance, whole.stats_covariance, rtol=1e-9, atol=1e-15)
    foreign = _stream(y[:50], cam[:50], early[:50], stats[:50], cuts=[],
                      metadata={**META, "model_fingerprint": "f" * 64})
    with pytest.raises(ValueError, match="different metadata"):
        merged.merge(foreign)
    with pytest.raises(ValueError, match="different classes"):
        merged.merge(ReferenceStore(CLASSES[:5], metadata=META))


def test_empty_class_is_nan_and_bad_input_refused(data):
    y, cam, early, stats = data
    rows = y < 5
    store = _stream(y[rows], cam[rows], early[rows], stats[rows], cuts=[])
    assert np.isnan(store.cam_reference[7]).all() and np.isnan(store.stats_mean[7]).all()
    assert np.isfinite(store.cam_reference[:5]).all()
    assert np.isnan(store.mahalanobis(stats[:1], np.array([7]))).all()
    with pytest.raises(ValueError, match="labels must lie"):
        store.update(np.array([10]), cam[:1], early[:1], stats[:1])
    with pytest.raises(ValueError, match="canonical"):
        store.update(y[:2], cam[:2, :8], early[:2], stats[:2])
    with pytest.raises(ValueError, match="channels"):
        store.update(y[:2], cam[:2], early[:2], stats[:2, :5])
    bad = cam[:2].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.update(y[:2], bad, early[:2], stats[:2])


def test_save_load_round_trip_and_refusals(data, tmp_path):
    y, cam, early, stats = data
    store = _stream(y, cam, early, stats, cuts=[1000])
    path = tmp_path / "store"
    store.save(path)
    back = ReferenceStore.load(path, expected_fingerprint=FINGERPRINT)
    assert back.classes == CLASSES and back.grid == (16, 16) and back.metadata == META
    for key, value in store.to_arrays().items():
        assert back.to_arrays()[key].dtype == value.dtype
        assert np.array_equal(back.to_arrays()[key], value)
    for name in ("counts", "cam_reference", "cam_std", "early_reference", "early_std",
                 "stats_mean", "stats_covariance", "stats_precision"):
        assert np.array_equal(getattr(back, name), getattr(store, name), equal_nan=True), name
    assert np.array_equal(back.mahalanobis(stats[:20], y[:20]), store.mahalanobis(stats[:20], y[:20]))

    with pytest.raises(ArtifactError, match=r"built for another model .*a1b2c3d4e5f6.*ffffffffffff"):
        ReferenceStore.load(path, expected_fingerprint="f" * 64)

    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 7}))
    with pytest.raises(ArtifactError, match=r"format version 7; .*\[1, 2\]"):
        ReferenceStore.load(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    ReferenceStore.load(path)

    raw = bytearray((path / "moments.npz").read_bytes())
    raw[len(raw) // 3] ^= 0x40
    (path / "moments.npz").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        ReferenceStore.load(path)
    (path / "moments.npz").unlink()
    with pytest.raises(ArtifactError, match="'moments.npz' is missing"):
        ReferenceStore.load(path)
