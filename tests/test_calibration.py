"""Tests for calibration: conformal p-values vs a naive loop, finite-sample validity on real
MNIST scores over random splits, p-value mergers, the fused conformal score, round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from calibration import (MERGERS, ConformalCalibrator, FusedConformal, decide, merge_bonferroni,
                         merge_twice_mean)
from reference_maps.artifact import read_artifact, write_artifact
from verifier.examples.datasets import load_mnist, ood_images  # tests only: real images

ALPHA = 0.05
HIGHER_IS_WORSE = {"ink": True, "spread": False, "edges": True}


def _scores(images: np.ndarray) -> dict[str, np.ndarray]:
    """Real per-image scores: ink = pixels above 127 (integer: many ties), spread = pixel
    std, edges = mean Sobel gradient magnitude."""
    x = images.astype(np.float64) / 255.0
    grad = np.hypot(ndimage.sobel(x, axis=1), ndimage.sobel(x, axis=2))
    return {"ink": (images > 127).sum(axis=(1, 2)).astype(np.float64),
            "spread": x.std(axis=(1, 2)), "edges": grad.mean(axis=(1, 2))}


@pytest.fixture(scope="module")
def mnist():
    x, y = load_mnist()
    return _scores(x), np.asarray(y)


def _naive_p(cal: np.ndarray, s: float, worse_high: bool) -> float:
    if math.isnan(s):
        return 0.0
    extreme = 0
    for c in cal:
        if (c >= s) if worse_high else (c <= s):
            extreme += 1
    return (1 + extreme) / (len(cal) + 1)


def test_p_values_equal_naive_loop_with_pooled_fallback(mnist):
    scores, y = mnist
    cal_rows = np.arange(0, 900)
    cal_rows = cal_rows[(y[cal_rows] != 3) | (np.cumsum(y[cal_rows] == 3) <= 20)]  # class 3: 20 points
    test_rows = np.arange(3000, 3250)
    cal = ConformalCalibrator(HIGHER_IS_WORSE, min_class_size=50).fit(
        {k: v[cal_rows] for k, v in scores.items()}, y[cal_rows], 10)
    assert cal.uses_pooled_.tolist() == [k == 3 for k in range(10)]
    test = {k: v[test_rows].copy() for k, v in scores.items()}
    test["edges"][:3] = np.nan
    test["ink"][3] = scores["ink"][cal_rows].max() + 1   # beyond every calibration point
    got = cal.p_values(test, y[test_rows])
    for name, worse_high in HIGHER_IS_WORSE.items():
        for j, r in enumerate(test_rows):
            k = y[r]
            ref_rows = cal_rows if k == 3 else cal_rows[y[cal_rows] == k]
            want = _naive_p(scores[name][ref_rows], test[name][j], worse_high)
            assert got[name][j] == want, (name, j)
    assert (got["edges"][:3] == 0).all()
    assert got["ink"][3] == 1 / (1 + (y[cal_rows] == y[test_rows[3]]).sum())
    # ties: the integer ink score has repeated values, and ties count against the test point
    assert len(np.unique(scores["ink"][cal_rows])) < len(cal_rows)


def test_validity_over_random_splits(mnist):
    """Mean in-distribution rejection rate over 200 random splits is <= alpha + 3 SE.

    SE = sqrt(alpha (1 - alpha) (1/n_cal + 1/n_test) / S): the binomial error of the test
    rejections plus that of the calibrated threshold, per split, averaged over S splits
    (~0.00054 here, so the bound is ~0.0516). A random split of a fixed sample makes
    calibration and test points exchangeable, so conformal validity applies exactly; for
    tie-free scores the expected rate is exactly floor(alpha (n_k + 1)) / (n_k + 1) for a
    test point of class k with n_k calibration points, which the mean must also match.
    """
    scores, y = mnist
    n, n_cal, splits = len(y), 1000, 200
    rng = np.random.default_rng(12345)
    rates = {name: [] for name in [*HIGHER_IS_WORSE, *MERGERS]}
    exact = []
    for _ in range(splits):
        perm = rng.permutation(n)
        c, t = perm[:n_cal], perm[n_cal:]
        cal = ConformalCalibrator(HIGHER_IS_WORSE, min_class_size=50).fit(
            {k: v[c] for k, v in scores.items()}, y[c], 10)
        p = cal.p_values({k: v[t] for k, v in scores.items()}, y[t])
        for name in HIGHER_IS_WORSE:
            rates[name].append(1 - decide(p[name], ALPHA).mean())
        stacked = np.stack([p[k] for k in HIGHER_IS_WORSE], axis=1)
        for name, merge in MERGERS.items():
            rates[name].append(1 - decide(merge(stacked), ALPHA).mean())
        n_k = np.bincount(y[c], minlength=10)[y[t]]
        exact.append(np.mean(np.floor(ALPHA * (n_k + 1)) / (n_k + 1)))
    se = math.sqrt(ALPHA * (1 - ALPHA) * (1 / n_cal + 1 / (n - n_cal)) / splits)
    for name, r in rates.items():
        assert np.mean(r) <= ALPHA + 3 * se, (name, np.mean(r), ALPHA + 3 * se)
    assert len(np.unique(scores["spread"])) == n and len(np.unique(scores["edges"])) == n
    for name in ("spread", "edges"):  # tie-free: the exact conformal rate, not just below alpha
        assert abs(np.mean(rates[name]) - np.mean(exact)) <= 3 * se, (name, np.mean(rates[name]))
    assert np.mean(exact) > 0.04
    assert ALPHA / 2 < np.mean(rates["ink"]) <= np.mean(exact) + 3 * se  # ties: conservative
    assert np.mean(rates["bonferroni"]) > ALPHA / 4  # valid yet not inert
    # twice_mean is valid but, for these anti-correlated p-values, never rejects (see README)
    assert np.mean(rates["twice_mean"]) <= ALPHA / 2


def test_mergers_formula_and_validity_under_dependence(mnist):
    scores, y = mnist
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(y))
    c, t = perm[:1000], perm[1000:]
    cal = ConformalCalibrator({"spread": False}, 50).fit({"spread": scores["spread"][c]}, y[c], 10)
    p = cal.p_values({"spread": scores["spread"][t]}, y[t])["spread"]
    base = 1 - decide(p, ALPHA).mean()
    for k in (2, 5):
        same = np.repeat(p[:, None], k, axis=1)  # perfectly dependent columns
        assert np.array_equal(merge_bonferroni(same), np.minimum(1, k * p))
        np.testing.assert_allclose(merge_twice_mean(same), np.minimum(1, 2 * p), rtol=1e-15)
        rej_b = 1 - decide(merge_bonferroni(same), ALPHA).mean()
        rej_t = 1 - decide(merge_twice_mean(same), ALPHA).mean()
        assert 0 < rej_b <= base / k + 1e-3 and 0 < rej_t <= base / 2 + 1e-3
    assert 0.02 < base < 0.08  # one split: alpha up to ~4 SD of calibration + test noise

    m, k = 200_000, 4
    indep = rng.random((m, k))  # independent uniform p-values
    margin = 3 * math.sqrt(ALPHA * (1 - ALPHA) / m)
    for name, merge in MERGERS.items():
        merged = merge(indep)
        assert 1 - decide(merged, ALPHA).mean() <= ALPHA + margin, name
    row = np.array([[0.3, 0.01, np.nan, 0.9]])
    assert merge_bonferroni(row)[0] == 0.0 and merge_twice_mean(row)[0] == pytest.approx(0.605)
    assert merge_bonferroni(np.array([[0.3, 0.01, 0.5, 0.9]]))[0] == pytest.approx(0.04)


def test_decide_tie_convention():
    p = np.array([0.0, 0.049, 0.05, 0.0500001, 1.0, np.nan])
    assert decide(p, 0.05).tolist() == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="alpha"):
        decide(p, 0.0)


@pytest.fixture(scope="module")
def fusion_data(mnist):
    scores, y = mnist
    neg = np.concatenate([ood_images(s, 200, seed=3) for s in ("textures", "dicom", "noise")])
    neg_scores = _scores(neg)
    names = list(HIGHER_IS_WORSE)
    return (np.stack([scores[k] for k in names], axis=1), y,
            np.stack([neg_scores[k] for k in names], axis=1))


def test_fused_conformal_valid_on_held_out_and_useful(fusion_data):
    feats, y, neg = fusion_data
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    fit_rows, rest = perm[:1000], perm[1000:]
    fused = FusedConformal(min_class_size=50).fit(feats[fit_rows], neg[:450])
    splits, n_cal = 50, 1000
    rates, power = [], []
    for _ in range(splits):
        r = rng.permutation(rest)
        c, t = r[:n_cal], r[n_cal:]
        fused.calibrate(feats[c], y[c], 10)
        rates.append(1 - decide(fused.p_values(feats[t], y[t]), ALPHA).mean())
        held_neg = neg[450:]
        power.append(1 - decide(fused.p_values(held_neg, rng.integers(0, 10, len(held_neg))),
                                ALPHA).mean())
    se = math.sqrt(ALPHA * (1 - ALPHA) * (1 / n_cal + 1 / (len(rest) - n_cal)) / splits)
    assert np.mean(rates) <= ALPHA + 3 * se
    assert np.mean(rates) > ALPHA / 2
    assert np.mean(power) > 0.5  # rejects most held-out texture/CT-MR/noise crops
    nan_row = feats[:1].copy()
    nan_row[0, 1] = np.nan
    assert fused.p_values(nan_row, y[:1])[0] == 0.0


def test_round_trips_through_plain_arrays(fusion_data, mnist, tmp_path):
    feats, y, neg = fusion_data
    scores, _ = mnist
    cal = ConformalCalibrator(HIGHER_IS_WORSE, min_class_size=300).fit(
        {k: v[:2000] for k, v in scores.items()}, y[:2000], 10)
    fused = FusedConformal("neglog", C=0.5, min_class_size=40).fit(
        np.clip(feats[:500] / feats.max(0), 1e-9, 1), np.clip(neg / feats.max(0), 1e-9, 1))
    fused.calibrate(np.clip(feats[500:1500] / feats.max(0), 1e-9, 1), y[500:1500], 10)
    write_artifact(tmp_path / "cal", kind="calibration", format_version=1,
                   arrays={"conformal": cal.to_arrays(), "fused": fused.to_arrays()}, manifest={})
    art = read_artifact(tmp_path / "cal", kind="calibration", supported_versions=[1])
    cal2 = ConformalCalibrator.from_arrays(art.arrays["conformal"])
    fused2 = FusedConformal.from_arrays(art.arrays["fused"])
    test = {k: v[2000:] for k, v in scores.items()}
    p1, p2 = cal.p_values(test, y[2000:]), cal2.p_values(test, y[2000:])
    assert cal2.higher_is_worse == HIGHER_IS_WORSE and cal2.uses_pooled_.tolist() == cal.uses_pooled_.tolist()
    for name in HIGHER_IS_WORSE:
        assert np.array_equal(p1[name], p2[name])
    x = np.clip(feats[2000:] / feats.max(0), 1e-9, 1)
    assert fused2.transform == "neglog" and fused2.C == 0.5
    assert np.array_equal(fused.p_values(x, y[2000:]), fused2.p_values(x, y[2000:]))
    assert np.array_equal(fused.coef_, fused2.coef_) and fused.intercept_ == fused2.intercept_


def test_refusals(mnist):
    scores, y = mnist
    cal = ConformalCalibrator({"ink": True})
    with pytest.raises(ValueError, match="NaN"):
        cal.fit({"ink": np.array([1.0, np.nan])}, np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="lack 'ink'"):
        cal.fit({"other": np.ones(2)}, np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="no calibration points"):
        cal.fit({"ink": np.ones(0)}, np.zeros(0, dtype=int), 2)
    cal.fit({"ink": scores["ink"][:100]}, y[:100], 10)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 10\)"):
        cal.p_values({"ink": np.ones(1)}, np.array([10]))


def test_false_rejection_sd_matches_simulated_calibration_draws():
    """One calibration draw + one test sample: the formula's SD against 2,000 simulated
    draws of per-class conformal calibration (continuous scores, K=10 classes x 67 points)."""
    from calibration.conformal import ConformalCalibrator
    from calibration.decide import false_rejection_sd

    rng = np.random.default_rng(5)
    k, n_k, n_test, alpha = 10, 67, 1000, 0.05
    rates = []
    for _ in range(2000):
        cal_cls = np.repeat(np.arange(k), n_k)
        test_cls = rng.integers(0, k, n_test)
        cal = ConformalCalibrator({"s": True}, min_class_size=50).fit(
            {"s": rng.random(k * n_k)}, cal_cls, k)
        p = cal.p_values({"s": rng.random(n_test)}, test_cls)["s"]
        rates.append(np.mean(p <= alpha))
    predicted = false_rejection_sd(alpha, n_test, [n_k] * k)
    assert abs(np.std(rates) / predicted - 1) < 0.15, (np.std(rates), predicted)
    assert np.mean(rates) <= alpha
