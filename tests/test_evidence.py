"""Region swaps and deletions (verifier.audit.perturb) against naive per-image, per-cell loops on a
trained CNN and real digits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from verifier.audit.perturb import (cell_index, deletion_curves, other_class_partner,
                                    reliance_maps, swap_cells, swap_shift, unused_cells)
from verifier.examples.zoo import preprocess_uint8

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def batch(mnist):
    x, y = mnist
    idx = np.arange(4000, 4024)
    return preprocess_uint8(x[idx]).numpy(), y[idx].astype(np.int64)


@pytest.fixture(scope="module")
def logits(gap_model):
    def f(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return gap_model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return f


def _naive_swap(img: np.ndarray, donor: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """One image: cell (r, c) of a G x G lattice covers rows [r*H/G, (r+1)*H/G) (floor)."""
    out = img.copy()
    g = cells.shape[0]
    h, w = img.shape[-2:]
    for r in range(g):
        for c in range(g):
            if cells[r, c]:
                rows = [i for i in range(h) if i * g // h == r]
                cols = [j for j in range(w) if j * g // w == c]
                out[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = \
                    donor[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return out


def test_cell_index_splits_evenly_and_rejects_bad_grids():
    assert list(np.bincount(cell_index(28, 7))) == [4] * 7
    assert list(np.bincount(cell_index(10, 3))) == [4, 3, 3]
    with pytest.raises(ValueError):
        cell_index(10, 11)


def test_swap_cells_matches_a_naive_loop(batch):
    x, _ = batch
    rng = np.random.default_rng(0)
    donor = x[::-1].copy()
    for g in (3, 7):
        cells = rng.random((len(x), g, g)) < 0.4
        got = swap_cells(x, donor, cells)
        want = np.stack([_naive_swap(x[i], donor[i], cells[i]) for i in range(len(x))])
        np.testing.assert_array_equal(got, want)


def test_reliance_maps_match_one_forward_per_cell(batch, logits):
    x, y = batch
    partner = other_class_partner(y, seed=1)
    got = reliance_maps(logits, x, x[partner], y, 10, grid=7)
    want = np.zeros((len(x), 7, 7))
    for i in range(len(x)):
        p0 = softmax(logits(x[i:i + 1]).astype(np.float64), axis=1)[0, y[i]]
        for r in range(7):
            for c in range(7):
                cells = np.zeros((7, 7), bool)
                cells[r, c] = True
                img = _naive_swap(x[i], x[partner[i]], cells)[None]
                want[i, r, c] = p0 - softmax(logits(img).astype(np.float64), axis=1)[0, y[i]]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got).max() > 0.05  # the digit's own cells matter: the test can fail


def test_unused_cells_are_below_the_level_of_the_class_peak():
    rel = np.zeros((4, 2, 2))
    rel[:2, 0, 0], rel[:2, 1, 1] = 1.0, 0.15  # class 0
    rel[2:, 0, 1] = -0.5  # class 1 relies on nothing: no cell can be called unused
    got = unused_cells(rel, np.array([0, 0, 1, 1]), 3, level=0.2)
    assert got[0].tolist() == [[False, True], [True, True]]
    assert not got[1].any() and not got[2].any()


def test_swap_shift_and_partners(batch, logits):
    x, y = batch
    partner = other_class_partner(y, seed=0)
    assert np.all(y[partner] != y)
    cells = np.ones((len(x), 7, 7), bool)  # swap everything: the prediction becomes the partner's
    rise, follows = swap_shift(logits, x, x[partner], cells, y[partner], 10)
    p_before = softmax(logits(x).astype(np.float64), axis=1)[np.arange(len(x)), y[partner]]
    p_after = softmax(logits(x[partner]).astype(np.float64), axis=1)[np.arange(len(x)), y[partner]]
    np.testing.assert_allclose(rise, p_after - p_before, atol=1e-9)
    assert follows.mean() > 0.7


def test_deletion_and_insertion_curves_match_a_naive_loop(batch, logits):
    x, y = batch
    x, y = x[:6], y[:6]
    rng = np.random.default_rng(3)
    order = np.argsort(rng.random((len(x), 16)), axis=1)
    black = np.array([(0 - 0.1307) / 0.3081], dtype=np.float32)
    for insertion in (False, True):
        got = deletion_curves(logits, x, order, y, black, 10, steps=4, insertion=insertion)
        for i in range(len(x)):
            for t in range(5):
                chosen = np.zeros(16, bool)
                chosen[order[i, :round(t * 16 / 4)]] = True
                blank = np.full_like(x[i], black[0])
                img = (_naive_swap(blank, x[i], chosen.reshape(4, 4)) if insertion
                       else _naive_swap(x[i], blank, chosen.reshape(4, 4)))
                want = softmax(logits(img[None]).astype(np.float64), axis=1)[0, y[i]]
                assert got[i, t] == pytest.approx(want, abs=1e-6)
