"""Near-OOD gating on real digits: exact and PAC false-rejection promises over seeded splits,
far-OOD rejection, held-out-class power against the old fused score, and the new pieces
(smoothed and calibration-conditional p-values, tied-covariance Mahalanobis, KNN bank)
checked against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, kstest, mannwhitneyu

from calibration.conformal import (ConformalCalibrator, conformal_p_values, digest_uniforms,
                                   pac_p_values)
from calibration.indist import InDistributionConformal
from reference_maps.features import FeatureReference
from reference_maps.store import ReferenceStore

ALPHA, DELTA = 0.05, 0.1
IN = 6  # the model learns digits 0-5; 6-9 are the held-out-class near-OOD set


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def heldout_setup(mnist, tmp_path_factory):
    """SmallCNN on digits 0-5 (3 epochs), a bundle (1,200 reference / 400 calibration digits),
    and the gate's scores of 1,000 further in-distribution digits."""
    from verifier.bundle.builder import build_bundle
    from verifier.bundle.directory import Bundle
    from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier
    from verifier.runtime.gatekeeper import Gatekeeper

    x, y = mnist
    inside = np.flatnonzero(y < IN)
    ref, cal, pool = inside[:1200], inside[1200:1600], inside[1600:2600]
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(num_classes=IN), x[ref], y[ref], epochs=3, seed=0)
    out = tmp_path_factory.mktemp("nearood") / "b"
    build_bundle(mnist_spec(model, classes=IN), (x[ref], y[ref]), out, calibration=(x[cal], y[cal]),
                 seed=0)
    gate = Gatekeeper(Bundle.load(out, model=model))
    return gate, _scored(gate, x[pool]), x[y >= IN][:600]


def _scored(gate, imgs: np.ndarray) -> dict[str, np.ndarray]:
    from verifier.examples.zoo import preprocess_uint8

    xs = preprocess_uint8(imgs).numpy()
    parts = [gate.score_batch(xs[i:i + 250]) for i in range(0, len(xs), 250)]
    names = gate.bundle.combiner.names_
    return {"combined": np.concatenate([np.column_stack([p.scores[n] for n in names]) for p in parts]),
            "all": np.concatenate([np.column_stack([p.scores[n] for n in gate.bundle.score_names])
                                   for p in parts]),
            "p_value": np.concatenate([p.p_value for p in parts]),
            "pred": np.concatenate([p.predicted for p in parts]),
            "u": digest_uniforms(xs)}


# ---------------------------------------------------------------------- the promises
def test_marginal_rate_sits_at_alpha_over_200_splits(heldout_setup):
    """The bundle's fitted statistic, re-conformalised on 200 seeded random splits of 1,000
    unseen in-distribution digits (400 calibration / 600 test), with the gate's own digest
    tie-breaks: a random split of a fixed pool is exchangeable, so the smoothed p-value's
    expected rate is exactly alpha. Bound: 3 standard errors of the mean over splits,
    sqrt(alpha (1 - alpha) (1/600 + 1/402) / 200) ~ 0.0011 each (about 0.003), on both sides."""
    gate, pool, _ = heldout_setup
    comb = gate.bundle.combiner
    stat = comb.score(pool["combined"])
    rng = np.random.default_rng(20261201)
    rates = []
    for _ in range(200):
        perm = rng.permutation(len(stat))
        c, t = perm[:400], perm[400:]
        cal = ConformalCalibrator({"s": True}, comb.min_class_size).fit({"s": stat[c]}, pool["pred"][c], IN)
        p = cal.p_values({"s": stat[t]}, pool["pred"][t], u=pool["u"][t])["s"]
        rates.append(np.mean(p <= ALPHA))
    se = math.sqrt(ALPHA * (1 - ALPHA) * (1 / 600 + 1 / 402) / 200)
    assert abs(np.mean(rates) - ALPHA) <= 3 * se, (np.mean(rates), se)


def test_pac_share_of_draws_above_alpha_within_delta(heldout_setup):
    """PAC mode: 200 seeded calibration draws of 400 (with replacement) from the 1,000 unseen
    digits; each draw's exact false-rejection rate is its rejection share of the whole pool
    (the population here is the pool's empirical law, so no test-sample noise). The share
    of draws above alpha must be <= delta + 3 binomial SE, and the rate must not collapse:
    the mean sits near the Beta quantile's level (~0.036 for n = 400, delta = 0.1)."""
    gate, pool, _ = heldout_setup
    stat = gate.bundle.combiner.score(pool["combined"])
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(200):
        ref = np.sort(stat[rng.integers(0, len(stat), 400)])
        rates.append(np.mean(pac_p_values(ref, stat, True, DELTA) <= ALPHA))
    rates = np.array(rates)
    share = np.mean(rates > ALPHA)
    assert share <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / 200), share
    assert 0.025 < rates.mean() < ALPHA, rates.mean()


@pytest.mark.parametrize("source", ["photos", "textures", "dicom", "noise"])
def test_far_ood_rejection_at_least_99_percent(heldout_setup, source):
    from verifier.examples.datasets import ood_images

    gate, _, _ = heldout_setup
    decisions = gate.gate(ood_images(source, 200, seed=3))
    rate = np.mean([not d.accepted for d in decisions])
    assert rate >= 0.99, f"{source}: {rate:.3f} rejected"
    assert all(d.reasons for d in decisions if not d.accepted)


def test_held_out_class_auroc_beats_the_old_fused_score(heldout_setup):
    """Digits 6-9 against unseen digits 0-5: AUROC of the gate's p_value must exceed that of
    the previous decision score (logistic fusion vs garbage) on the same probe pass
    (measured with this fixture: 0.82 against 0.80 or less)."""
    gate, pool, held_out = heldout_setup
    ood = _scored(gate, held_out)
    auroc_gate = mannwhitneyu(pool["p_value"], ood["p_value"]).statistic / (len(pool["u"]) * len(ood["u"]))
    fused_in, fused_out = gate.bundle.fusion.score(pool["all"]), gate.bundle.fusion.score(ood["all"])
    auroc_old = mannwhitneyu(fused_out, fused_in).statistic / (len(fused_in) * len(fused_out))
    assert auroc_gate > auroc_old + 0.01, (auroc_gate, auroc_old)
    assert auroc_gate > 0.75  # measured 0.82 with this 3-epoch model (chance is 0.5)


def test_default_combination_is_round_6(heldout_setup):
    """The default statistic (docs/gate.md, round 5): normal scores summed within the relative
    distances and within the other combined scores; combined are the feature statistics, garbage
    and two early-map scores, not the output scores (still scored and reported). Round 6: the
    joint Gaussian holds the conv blocks' channel standard deviations beside their means."""
    from verifier.scoring.comparator import RELATIVE_SCORES, is_combined

    gate, pool, _ = heldout_setup
    comb = gate.bundle.combiner
    assert comb.method == "stouffer_groups"
    assert comb.names_ == [n for n in gate.bundle.score_names if is_combined(n)]
    assert {"early_wasserstein", "early_mahalanobis", "garbage", "knn", *RELATIVE_SCORES} <= set(comb.names_)
    assert not {"msp", "energy", "early_iou", "iou"} & set(comb.names_)
    assert [comb.groups_[comb.names_.index(n)] for n in RELATIVE_SCORES] == [1, 1]
    assert int(comb.groups_.sum()) == 2
    assert {"msp", "energy"} <= set(gate.bundle.score_names)
    feats = gate.bundle.store.features
    assert feats.joint_std and feats.joint_moments.dim == 2 * sum(feats.dims[:-1])


def test_bundle_records_the_guarantee(heldout_setup, mnist, tmp_path):
    """pac mode is stored in the manifest and used by the gate; decisions stay reproducible."""
    import json

    from verifier.bundle.builder import build_bundle
    from verifier.bundle.directory import Bundle
    from verifier.runtime.gatekeeper import Gatekeeper

    gate, _, _ = heldout_setup
    x, y = mnist
    inside = np.flatnonzero(y < IN)
    model = gate.bundle.spec.module
    build_bundle(gate.bundle.spec, (x[inside[:600]], y[inside[:600]]), tmp_path / "pac",
                 calibration=(x[inside[1200:1500]], y[inside[1200:1500]]), guarantee="pac",
                 delta=DELTA, seed=0)
    manifest = json.loads((tmp_path / "pac" / "manifest.json").read_text())
    assert manifest["guarantee"] == "pac" and manifest["delta"] == DELTA
    pac = Gatekeeper(Bundle.load(tmp_path / "pac", model=model))
    assert pac.bundle.combiner.guarantee == "pac"
    imgs = x[inside[2600:2700]]
    a = [d.p_value for d in pac.gate(imgs)]
    b = [d.p_value for d in pac.gate(imgs[::-1])][::-1]  # other batch order, same decisions
    assert a == b


# ---------------------------------------------------------------------- the pieces
def test_smoothed_and_pac_p_values_against_references():
    """Smoothed p-values equal the textbook count formula (ties included) and are exactly
    uniform; pac p-values reject exactly when C < j*, j* found by a brute-force Beta search."""
    from verifier.examples.datasets import load_mnist

    x, _ = load_mnist()
    ink = (x > 127).sum(axis=(1, 2)).astype(np.float64)  # real integer score: many ties
    ref, test = np.sort(ink[:400]), ink[400:]
    u = digest_uniforms(x[400:])
    got = conformal_p_values(ref, test, True, u)
    strict = (ref[None] > test[:, None]).sum(1)
    ties = (ref[None] == test[:, None]).sum(1)
    np.testing.assert_allclose(got, (strict + u * (1 + ties)) / 401, rtol=0, atol=1e-15)
    # over random splits (exchangeable), the smoothed rate is alpha exactly, ties and all;
    # the unsmoothed one sits below it (ties count against the input)
    rng = np.random.default_rng(3)
    smooth, plain = [], []
    for _ in range(200):
        perm = rng.permutation(len(ink))
        r, t = np.sort(ink[perm[:400]]), perm[400:]
        smooth.append(np.mean(conformal_p_values(r, ink[t], True, digest_uniforms(x[t])) <= ALPHA))
        plain.append(np.mean(conformal_p_values(r, ink[t], True) <= ALPHA))
    se = math.sqrt(ALPHA * (1 - ALPHA) * (1 / 4600 + 1 / 402) / 200)
    assert abs(np.mean(smooth) - ALPHA) <= 3 * se, np.mean(smooth)
    assert np.mean(plain) < ALPHA - 3 * se, np.mean(plain)
    n = 400
    j_star = max(j for j in range(1, n + 1) if beta.ppf(1 - DELTA, j, n + 1 - j) <= ALPHA)
    c = n - np.searchsorted(ref, test, side="left")
    reject = pac_p_values(ref, test, True, DELTA) <= ALPHA
    np.testing.assert_array_equal(reject, c < j_star)


def test_digest_uniforms_reproducible_and_uniform(mnist):
    x, _ = mnist
    u = digest_uniforms(x)
    np.testing.assert_array_equal(u[100:200], digest_uniforms(x[100:200]))  # batch-independent
    assert kstest(u, "uniform").pvalue > 1e-3
    assert len(np.unique(u)) == len(np.unique(x.reshape(len(x), -1), axis=0))
    # the whole set goes through the threaded path of `hash_rows`: the same keyed BLAKE2b, written out
    import hashlib

    from calibration.conformal import _PARALLEL_BYTES, hash_rows

    xf = x.astype(np.float32)  # pixels as the gate hashes them, and enough bytes for the threads
    assert xf.nbytes > _PARALLEL_BYTES
    key = (0).to_bytes(8, "little")
    expected = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8, key=key).digest(), "little")
                for r in xf[-50:]]
    np.testing.assert_array_equal(hash_rows(xf)[-50:], np.array(expected, dtype=np.uint64))
    np.testing.assert_array_equal(hash_rows(xf)[:100], hash_rows(xf[:100]))  # threaded == one thread


def _pixel_features(x: np.ndarray) -> list[np.ndarray]:
    """Real features of MNIST digits: 4x4 and 7x7 block means of the pixels."""
    f = x.astype(np.float64) / 255.0
    return [f.reshape(-1, 4, 7, 4, 7).mean(axis=(2, 4)).reshape(len(x), -1),
            f.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(x), -1)]


def test_feature_reference_against_sklearn_and_exact_merge(mnist):
    from sklearn.covariance import OAS
    from sklearn.neighbors import NearestNeighbors

    x, y = mnist
    feats = _pixel_features(x[:1500])
    whole = FeatureReference(10, [16, 49], bank_size=500, seed=3).update(y[:1500], feats)
    parts = [FeatureReference(10, [16, 49], bank_size=500, seed=3) for _ in range(3)]
    for i, p in enumerate(parts):  # three workers, then merged in another order
        sl = slice(500 * i, 500 * (i + 1))
        p.update(y[sl], [f[sl] for f in feats])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    np.testing.assert_array_equal(merged.bank, whole.bank)
    np.testing.assert_allclose(merged.moments[1].m2_, whole.moments[1].m2_, rtol=1e-10, atol=1e-12)
    # tied covariance, min over classes: against sklearn's OAS on the class-centred rows
    q = _pixel_features(x[3000:3100])[1]
    centred = feats[1] - np.stack([feats[1][y[:1500] == k].mean(0) for k in range(10)])[y[:1500]]
    prec = OAS(assume_centered=True).fit(centred).precision_
    means = np.stack([feats[1][y[:1500] == k].mean(0) for k in range(10)])
    d = q[:, None] - means[None]
    want = np.einsum("nkc,cd,nkd->nk", d, prec, d).min(1)
    np.testing.assert_allclose(whole.mahalanobis(1, q), want, rtol=1e-6)
    # KNN: 50th neighbour among the bank, against sklearn
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    nn = NearestNeighbors(n_neighbors=50).fit(whole.bank.astype(np.float64))
    np.testing.assert_allclose(whole.knn_distance(q), nn.kneighbors(qn)[0][:, -1], rtol=1e-4)


def test_relative_and_multilayer_mahalanobis_against_references(mnist):
    """`relative_mahalanobis` = the tied distance minus the distance under sklearn's OAS on all
    rows uncentred (Ren et al. 2021); `null_moments`' mean is exactly the in-sample mean own-class
    distance, tr(P Sigma_w); `multilayer_mahalanobis` sums the standardised block distances."""
    from sklearn.covariance import OAS

    x, y = mnist
    feats = _pixel_features(x[:1500])
    ref = FeatureReference(10, [16, 49], bank_size=500, seed=3).update(y[:1500], feats)
    q = _pixel_features(x[3000:3100])
    g = OAS().fit(feats[1])
    d0 = np.einsum("nc,cd,nd->n", q[1] - g.location_, g.precision_, q[1] - g.location_)
    np.testing.assert_allclose(ref.relative_mahalanobis(1, q[1]), ref.mahalanobis(1, q[1]) - d0,
                               rtol=1e-6, atol=1e-6)
    means = np.stack([feats[0][y[:1500] == k].mean(0) for k in range(10)])
    centred = feats[0] - means[y[:1500]]
    prec = OAS(assume_centered=True).fit(centred).precision_
    own = np.einsum("nc,cd,nd->n", centred, prec, centred)
    mu, sd = ref.null_moments(0)
    assert mu == pytest.approx(own.mean(), rel=1e-8)
    assert 0 < sd < 2 * mu
    np.testing.assert_allclose(ref.multilayer_mahalanobis([q[0]]), (ref.mahalanobis(0, q[0]) - mu) / sd)
    with pytest.raises(ValueError, match="block arrays"):
        ref.multilayer_mahalanobis([q[0], q[1]])


def test_joint_block_gaussian_against_sklearn_merge_and_round_trip(mnist):
    """The joint Gaussian of the conv blocks' channel means concatenated: its distance is the
    tied OAS Mahalanobis of the concatenated rows (as sklearn computes it), merging halves gives
    the whole, the arrays round-trip, and a reference saved without it loads without it."""
    from sklearn.covariance import OAS

    x, y = mnist
    f = x[:1200].astype(np.float64) / 255.0
    blocks = [f.reshape(-1, 4, 7, 4, 7).mean(axis=(2, 4)).reshape(len(f), -1),
              f.reshape(-1, 2, 14, 2, 14).mean(axis=(2, 4)).reshape(len(f), -1)]
    pen = f.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(f), -1)
    depths, lab = [*blocks, pen], y[:1200]
    ref = FeatureReference(10, [16, 4, 49], bank_size=500).update(lab, depths)
    assert ref.joint_depth == 3 and ref.joint_moments.dim == 20
    cat = np.hstack(blocks)
    means = np.stack([cat[lab == k].mean(0) for k in range(10)])
    prec = OAS(assume_centered=True).fit(cat - means[lab]).precision_
    q = np.hstack([b[:50] for b in blocks]) + 0.01
    want = np.einsum("nkc,cd,nkd->nk", q[:, None] - means[None], prec, q[:, None] - means[None]).min(1)
    np.testing.assert_allclose(ref.mahalanobis(ref.joint_depth, q), want, rtol=1e-6, atol=1e-8)
    half = FeatureReference(10, [16, 4, 49], bank_size=500).update(lab[:600], [d[:600] for d in depths])
    half.merge(FeatureReference(10, [16, 4, 49], bank_size=500).update(lab[600:], [d[600:] for d in depths]))
    np.testing.assert_allclose(half.mahalanobis(3, q), ref.mahalanobis(3, q), rtol=1e-9)
    back = FeatureReference.from_arrays(ref.to_arrays(), 10)
    np.testing.assert_array_equal(back.relative_mahalanobis(3, q), ref.relative_mahalanobis(3, q))
    old = {k: v for k, v in ref.to_arrays().items() if "joint" not in k}
    assert FeatureReference.from_arrays(old, 10).joint_depth is None
    with pytest.raises(ValueError, match="cannot merge"):
        FeatureReference(10, [16, 4, 49], joint=False).merge(ref)


def test_joint_gaussian_with_block_stds_against_sklearn_and_older_references(mnist):
    """With the conv blocks' channel standard deviations (round 6) the joint vector is every
    block's means then every block's standard deviations, and its distance is sklearn's tied OAS
    Mahalanobis of those rows; the flag round-trips, a reference saved before it (no
    `feat_joint_std`) scores the means alone, a missing or mis-sized input is refused by name,
    and references of the two layouts do not merge."""
    from sklearn.covariance import OAS

    from reference_maps.features import JOINT_MAX_DIM

    x, y = mnist
    f = x[:1200].astype(np.float64) / 255.0
    tiles = [f.reshape(-1, 4, 7, 4, 7), f.reshape(-1, 2, 14, 2, 14)]
    blocks = [t.mean(axis=(2, 4)).reshape(len(f), -1) for t in tiles]
    stds = [t.std(axis=(2, 4)).reshape(len(f), -1) for t in tiles]
    pen = f.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(f), -1)
    lab = y[:1200]
    ref = FeatureReference(10, [16, 4, 49], bank_size=500, joint_std=True).update(lab, [*blocks, pen], stds)
    assert ref.joint_moments.dim == 40
    cat = np.hstack([*blocks, *stds])
    np.testing.assert_array_equal(ref.joint_vector(blocks, stds), cat)
    means = np.stack([cat[lab == k].mean(0) for k in range(10)])
    prec = OAS(assume_centered=True).fit(cat - means[lab]).precision_
    q = cat[:50] + 0.01
    want = np.einsum("nkc,cd,nkd->nk", q[:, None] - means[None], prec, q[:, None] - means[None]).min(1)
    np.testing.assert_allclose(ref.mahalanobis(ref.joint_depth, q), want, rtol=1e-6, atol=1e-8)
    back = FeatureReference.from_arrays(ref.to_arrays(), 10)
    assert back.joint_std
    np.testing.assert_array_equal(back.relative_mahalanobis(3, q), ref.relative_mahalanobis(3, q))
    with pytest.raises(ValueError, match="standard deviations: expected 2 arrays of them, got 0"):
        ref.joint_vector(blocks)
    with pytest.raises(ValueError, match="expected 2 block arrays"):
        ref.joint_vector(blocks[:1], stds)
    # a reference of the means-only layout (saved before round 6): the standard deviations a
    # newer probe gives are not part of its vector
    old = FeatureReference(10, [16, 4, 49], bank_size=500).update(lab, [*blocks, pen])
    arrays = old.to_arrays()
    assert "feat_joint_std" not in arrays
    loaded = FeatureReference.from_arrays(arrays, 10)
    assert not loaded.joint_std and loaded.joint_moments.dim == 20
    np.testing.assert_array_equal(loaded.joint_vector(blocks, stds), np.hstack(blocks))
    with pytest.raises(ValueError, match="cannot merge"):
        loaded.merge(ref)
    # the store keeps them only where the vector fits JOINT_MAX_DIM; otherwise means only
    store_ref = FeatureReference(10, [JOINT_MAX_DIM // 2, 1, 3], joint_std=True)
    assert store_ref.joint_moments is None


def test_bundle_without_the_newer_scores_scores_its_own(heldout_setup):
    """A bundle built before `DEPTH_EXTRA` and `JOINT_SCORES` calibrates no such score: the gate reports exactly
    the bundle's own scores and decides as before (here: the same bundle with those scores
    removed from its calibration and combination)."""
    import copy

    from calibration.conformal import ConformalCalibrator
    from verifier.examples.zoo import preprocess_uint8
    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.scoring.comparator import DEPTH_EXTRA, JOINT_SCORES

    gate, _, held_out = heldout_setup
    b = copy.copy(gate.bundle)
    newer = (*DEPTH_EXTRA, *JOINT_SCORES)
    keep = [n for n in b.score_names if n not in newer]
    assert len(keep) == len(b.score_names) - len(newer)
    b.calibration_scores = {n: b.calibration_scores[n] for n in keep}
    b.calibrator = ConformalCalibrator({n: b.higher_is_worse[n] for n in keep}).fit(
        b.calibration_scores, b.calibration_classes, len(b.classes))
    cols = [j for j, n in enumerate(b.combiner.names_) if n not in newer]
    old = InDistributionConformal().fit(np.sort(b.combiner.ref_[:, cols] * b.combiner.sign_[cols], axis=0),
                                        b.combiner.sign_[cols] > 0, [b.combiner.names_[j] for j in cols])
    b.combiner = old.calibrate(np.column_stack([b.calibration_scores[n] for n in old.names_]),
                               b.calibration_classes, len(b.classes))
    batch = Gatekeeper(b, probe=gate.probe).score_batch(preprocess_uint8(held_out[:64]).numpy())
    assert tuple(batch.scores) == tuple(keep) and tuple(batch.p_values) == tuple(keep)
    assert np.isfinite(batch.p_value).all()


def test_store_round_trip_keeps_depth_features(mnist, tmp_path):
    x, y = mnist
    feats = _pixel_features(x[:300])
    maps = np.zeros((300, 4, 4))
    store = ReferenceStore([str(k) for k in range(10)], grid=(4, 4))
    store.update(y[:300], maps, maps, feats[0], depth_features=feats)
    store.save(tmp_path / "s")
    back = ReferenceStore.load(tmp_path / "s")
    q = _pixel_features(x[400:420])
    np.testing.assert_array_equal(back.features.mahalanobis(0, q[0]), store.features.mahalanobis(0, q[0]))
    np.testing.assert_array_equal(back.features.knn_distance(q[1]), store.features.knn_distance(q[1]))


def test_in_distribution_combiner_round_trip_and_refusals(mnist):
    x, y = mnist
    f = _pixel_features(x[:600])[0][:, 5:10]
    comb = InDistributionConformal("fisher").fit(f[:200], [True, False, True, True, False], list("abcde"))
    comb.calibrate(f[200:], y[200:600], 10)
    back = InDistributionConformal.from_arrays(comb.to_arrays())
    np.testing.assert_array_equal(back.p_values(f[:50], y[:50]), comb.p_values(f[:50], y[:50]))
    assert back.names_ == list("abcde")
    bad = f[:3].copy()
    bad[0, 2] = np.nan
    assert comb.p_values(bad, y[:3])[0] == 0.0  # a broken measurement is rejected
    with pytest.raises(ValueError, match="method"):
        InDistributionConformal("vote")
    with pytest.raises(ValueError, match="delta"):
        InDistributionConformal(guarantee="pac", delta=1.5)


def test_demo_table_names_the_mode_and_never_calls_a_rate_above_alpha_kept():
    """The demo's table says which guarantee it used; in pac mode a measured rate is called
    within the promise only when it is <= alpha (no +2 sd allowance for the draw)."""
    from verifier.examples.demo import DemoResult, format_table

    def table(rate: float, guarantee: str) -> str:
        r = DemoResult(alpha=0.05, guarantee=guarantee, delta=0.1 if guarantee == "pac" else None,
                       calibration_per_class=[667])
        r.rows["digits"] = {"n": 1000, "rejected": int(rate * 1000), "rejection_rate": rate}
        r.false_rejection_rate = rate
        return format_table(r)

    assert "guarantee: pac" in table(0.04, "pac") and "within its promise" in table(0.04, "pac")
    above = table(0.055, "pac")
    assert "ABOVE alpha" in above and "within" not in above
    assert "guarantee: marginal" in table(0.055, "marginal")
    assert "within alpha + 2 sd" in table(0.055, "marginal")  # marginal: one draw may scatter
