"""The grouped in-distribution combinations ("fisher_groups", issue 12 round 4; "stouffer_groups",
round 5) against a straightforward re-computation, and the loading of combiners saved before them."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from calibration.indist import ARRAYS_VERSION, InDistributionConformal


def _features(x: np.ndarray) -> np.ndarray:
    """Six real scores of MNIST digits: 7x7 block means of the pixels (a few columns)."""
    f = x.astype(np.float64) / 255.0
    return f.reshape(-1, 4, 7, 4, 7).mean(axis=(2, 4)).reshape(len(x), -1)[:, [5, 6, 9, 10, 2, 13]]


def _normal_score(fit_column: list[float], v: float) -> float:
    """z = Phi^-1(1 - q) of one value against one fit column, written out: q = (1 + #{fit >= v}) /
    (n + 2) inside the fit range; beyond it, the Gaussian tail from the median and the root mean
    square of the upper half's deviations, never below the ECDF's last step."""
    n = len(fit_column)
    count = sum(1 for f in fit_column if f >= v)
    if count > 0:
        return norm.isf((1 + count) / (n + 2))
    s = sorted(fit_column)
    med = (s[(n - 1) // 2] + s[n // 2]) / 2
    upper = s[n // 2:]
    scale = math.sqrt(sum((u - med) ** 2 for u in upper) / len(upper)) or 1.0
    return max((v - med) / scale, norm.isf(1 / (n + 2)))


def _neg_log_tail(fit_column: list[float], v: float) -> float:
    """-log q of one value against one fit column (the q of `_normal_score`)."""
    return -norm.logsf(_normal_score(fit_column, v))


def _straightforward(fit: np.ndarray, rows: np.ndarray, sign: list[float], groups: list[int],
                     within: str = "fisher") -> list[float]:
    """Fisher over the groups' tail probabilities of the group statistics: within each group the
    sum of -log q_j ("fisher") or of z_j ("stouffer")."""
    cols = [[s * float(v) for v in fit[:, j]] for j, s in enumerate(sign)]
    labels = sorted(set(groups))
    term = _neg_log_tail if within == "fisher" else _normal_score

    def group_sums(row):
        return [sum(term(cols[j], sign[j] * float(row[j])) for j in range(len(sign)) if groups[j] == g)
                for g in labels]

    fit_sums = [group_sums(r) for r in fit]
    group_cols = [[t[i] for t in fit_sums] for i in range(len(labels))]
    return [sum(_neg_log_tail(group_cols[i], t) for i, t in enumerate(group_sums(r))) for r in rows]


def test_fisher_groups_statistic_against_a_straightforward_computation(mnist):
    x, _ = mnist
    f = _features(x[:700])
    fit, rows = f[:150], np.vstack([f[150:250], 3.0 * f[250:260], -f[260:265]])  # beyond the range too
    worse = [True, False, True, True, False, True]
    groups = [2, 0, 2, 0, 5, 5]  # any non-negative labels
    comb = InDistributionConformal("fisher_groups").fit(fit, worse, list("abcdef"), groups)
    expected = _straightforward(fit, rows, [1.0 if w else -1.0 for w in worse], groups)
    np.testing.assert_allclose(comb.score(rows), expected, rtol=1e-9, atol=1e-9)
    # one group: the statistic is plain Fisher
    one = InDistributionConformal("fisher_groups").fit(fit, worse, groups=[3] * 6)
    np.testing.assert_array_equal(one.score(rows), InDistributionConformal("fisher").fit(fit, worse).score(rows))
    with pytest.raises(ValueError, match="groups"):
        InDistributionConformal("fisher_groups").fit(fit, worse, groups=[0, 1])


def test_stouffer_groups_statistic_against_a_straightforward_computation(mnist):
    """The gate's default since round 5: normal scores summed within each group, each sum mapped to
    its fit-split tail probability, Fisher over the groups; one group is the plain sum of z."""
    x, _ = mnist
    f = _features(x[:700])
    fit, rows = f[:150], np.vstack([f[150:250], 3.0 * f[250:260], -f[260:265]])
    worse = [True, False, True, True, False, True]
    groups = [1, 0, 1, 0, 0, 0]
    comb = InDistributionConformal("stouffer_groups").fit(fit, worse, list("abcdef"), groups)
    expected = _straightforward(fit, rows, [1.0 if w else -1.0 for w in worse], groups, within="stouffer")
    np.testing.assert_allclose(comb.score(rows), expected, rtol=1e-9, atol=1e-9)
    # not the Fisher-within statistic (the two differ on these rows)
    fisher = InDistributionConformal("fisher_groups").fit(fit, worse, list("abcdef"), groups).score(rows)
    assert not np.allclose(comb.score(rows), fisher)
    one = InDistributionConformal("stouffer_groups").fit(fit, worse, groups=[0] * 6)
    sign = [1.0 if w else -1.0 for w in worse]
    cols = [[sign[j] * float(v) for v in fit[:, j]] for j in range(6)]
    np.testing.assert_allclose(one.score(rows), [sum(_normal_score(cols[j], sign[j] * float(r[j])) for j in range(6))
                                                 for r in rows], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["fisher_groups", "stouffer_groups"])
def test_grouped_round_trip_and_earlier_layout(mnist, method):
    x, y = mnist
    f = _features(x[:800])
    worse = [True, False, True, True, False, True]
    comb = InDistributionConformal(method).fit(f[:200], worse, list("abcdef"), [0, 0, 1, 1, 1, 0])
    comb.calibrate(f[200:600], y[200:600], 10)
    u = np.linspace(0.01, 0.99, 200)
    arrays = comb.to_arrays()
    assert int(arrays["version"]) == ARRAYS_VERSION
    back = InDistributionConformal.from_arrays(arrays)
    np.testing.assert_array_equal(back.p_values(f[600:], y[600:800], u), comb.p_values(f[600:], y[600:800], u))
    # a combiner saved before the groups (layout 1: no version, no group arrays) scores as before
    plain = InDistributionConformal("fisher").fit(f[:200], worse, list("abcdef")).calibrate(f[200:600], y[200:600], 10)
    old = {k: v for k, v in plain.to_arrays().items() if k not in ("version", "groups", "group_ref", "group_loc",
                                                                   "group_scale")}
    loaded = InDistributionConformal.from_arrays(old)
    np.testing.assert_array_equal(loaded.p_values(f[600:], y[600:800], u), plain.p_values(f[600:], y[600:800], u))
    assert (loaded.groups_ == 0).all()
    with pytest.raises(ValueError, match="layout"):
        InDistributionConformal.from_arrays({**arrays, "version": np.array(ARRAYS_VERSION + 1)})
