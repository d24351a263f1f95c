"""Garbage head: a (K+1)-way linear head on frozen penultimate features, and synthetic garbage.

The certified model is never modified: the head reads the features the probe
already computed. It is trained on reference images (their K classes) plus
garbage (a user folder and images generated here) and stored as plain arrays.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import softmax

__all__ = ["GarbageHead", "garbage_score", "synthetic_garbage", "GARBAGE_KINDS"]


class GarbageHead:
    """Multinomial logistic regression over K real classes + 1 garbage class.

    `fit(features, labels)` with labels in 0..K (K = garbage); `garbage_probability`
    gives P(garbage | features), the score the gate calibrates (higher = worse).
    """

    def __init__(self, num_classes: int, C: float = 1.0, max_iter: int = 300, seed: int = 0) -> None:
        self.num_classes = int(num_classes)
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, features: np.ndarray, labels: np.ndarray) -> GarbageHead:
        """features (n, D) float; labels (n,) int in 0..K, with K the garbage class."""
        from sklearn.linear_model import LogisticRegression

        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if not np.any(labels == self.num_classes):
            raise ValueError("the garbage head needs garbage examples (label K) to learn from")
        self.mean_ = features.mean(axis=0)
        self.scale_ = features.std(axis=0) + 1e-6
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        clf.fit((features - self.mean_) / self.scale_, labels)
        coef = np.zeros((self.num_classes + 1, features.shape[1]))
        intercept = np.zeros(self.num_classes + 1)
        if len(clf.classes_) > 2:
            coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
        else:  # binary: P(second) = sigmoid(z) = softmax([0, z]), so the first row stays 0
            coef[clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
        missing = np.setdiff1d(np.arange(self.num_classes + 1), clf.classes_)
        intercept[missing] = -1e3  # a class never seen in training gets no probability
        self.coef_, self.intercept_ = coef, intercept
        return self

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, K+1) softmax probabilities; the last column is garbage."""
        z = ((np.asarray(features, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return softmax(z, axis=1)

    def garbage_probability(self, features: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) P(garbage)."""
        return self.probabilities(features)[:, -1]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_,
                "scale": self.scale_, "num_classes": np.array(self.num_classes)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GarbageHead:
        head = cls(int(arrays["num_classes"]))
        head.coef_, head.intercept_ = arrays["coef"], arrays["intercept"]
        head.mean_, head.scale_ = arrays["mean"], arrays["scale"]
        return head


def garbage_score(logits: np.ndarray, features: np.ndarray, head: GarbageHead | None,
                  garbage_class: int | None) -> np.ndarray:
    """(n,) P(garbage): the model's own garbage output when the spec names one, else the head's."""
    if garbage_class is not None:
        return softmax(np.asarray(logits, dtype=np.float64), axis=1)[:, garbage_class]
    if head is None:
        raise ValueError("no garbage head and no model garbage output")
    return head.garbage_probability(features)


def synthetic_garbage(reference: np.ndarray, n: int, seed: int = 0,
                      kinds: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` garbage images like `reference` (M, H, W[, C]) float32 pixels in [0, 1].

    Returns (images (n, H, W[, C]) float32, kind index (n,)). Kinds: noise of several
    spectra, constant and near-constant images, ramps and stripes, patch-shuffled and
    strongly corrupted reference images, inverted-polarity references.
    """
    kinds = kinds or tuple(GARBAGE_KINDS)
    rng = np.random.default_rng(seed)
    reference = np.asarray(reference, dtype=np.float32)
    which = rng.integers(0, len(kinds), size=n)
    out = np.empty((n, *reference.shape[1:]), dtype=np.float32)
    for k, name in enumerate(kinds):  # one vectorised call per kind, not per image
        idx = np.flatnonzero(which == k)
        if idx.size:
            out[idx] = GARBAGE_KINDS[name](reference, idx.size, rng)
    return np.clip(out, 0.0, 1.0), which


def _pick(reference: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return reference[rng.integers(0, len(reference), size=m)].copy()


def _uniform(ref, m, rng):
    return rng.random((m, *ref.shape[1:]), dtype=np.float32)


def _gaussian(ref, m, rng):
    mu = rng.uniform(0.2, 0.8, size=(m,) + (1,) * (ref.ndim - 1))
    return (mu + rng.normal(0, 0.25, size=(m, *ref.shape[1:]))).astype(np.float32)


def _salt_pepper(ref, m, rng):
    return (rng.random((m, *ref.shape[1:])) < rng.uniform(0.05, 0.6, size=(m,) + (1,) * (ref.ndim - 1))).astype(np.float32)


def _smooth_noise(ref, m, rng):
    from reference_maps.canonical import resize_maps

    h, w = ref.shape[1:3]
    coarse = rng.random((m, 4, 4)).astype(np.float32)
    img = resize_maps(coarse, (h, w))
    return _like(img, ref)


def _constant(ref, m, rng):
    return np.broadcast_to(rng.random((m,) + (1,) * (ref.ndim - 1)), (m, *ref.shape[1:])).astype(np.float32)


def _near_constant(ref, m, rng):
    return _constant(ref, m, rng) + rng.normal(0, 0.03, size=(m, *ref.shape[1:])).astype(np.float32)


def _ramp_stripes(ref, m, rng):
    h, w = ref.shape[1:3]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi, size=(m, 1, 1))
    freq = rng.choice([0.0, 0.1, 0.3, 0.8], size=(m, 1, 1))
    t = (np.cos(theta) * xx + np.sin(theta) * yy) / max(h, w)
    img = np.where(freq == 0, t, 0.5 + 0.5 * np.sin(2 * np.pi * freq * t * max(h, w)))
    return _like(img.astype(np.float32), ref)


def _patch_shuffle(ref, m, rng):
    imgs = _pick(ref, m, rng)
    h, w = imgs.shape[1:3]
    g = 4
    ph, pw = h // g, w // g
    core = imgs[:, : ph * g, : pw * g]
    blocks = core.reshape(m, g, ph, g, pw, *imgs.shape[3:]).swapaxes(2, 3).reshape(m, g * g, ph, pw, *imgs.shape[3:])
    perm = np.argsort(rng.random((m, g * g)), axis=1)
    blocks = np.take_along_axis(blocks, perm.reshape(m, g * g, *([1] * (blocks.ndim - 2))), axis=1)
    imgs[:, : ph * g, : pw * g] = blocks.reshape(m, g, g, ph, pw, *imgs.shape[3:]).swapaxes(2, 3).reshape(core.shape)
    return imgs


def _corrupt(ref, m, rng):
    from scipy.ndimage import uniform_filter

    imgs = _pick(ref, m, rng)
    size = (1, 7, 7) + (1,) * (imgs.ndim - 3)
    blurred = uniform_filter(imgs, size=size)
    noisy = imgs + rng.normal(0, 0.5, size=imgs.shape).astype(np.float32)
    contrast = (imgs > np.median(imgs, axis=tuple(range(1, imgs.ndim)), keepdims=True)).astype(np.float32)
    choice = rng.integers(0, 3, size=(m,) + (1,) * (imgs.ndim - 1))
    return np.where(choice == 0, blurred, np.where(choice == 1, noisy, 1.0 - contrast * 0.7))


def _inverted(ref, m, rng):
    return 1.0 - _pick(ref, m, rng)


def _like(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(m, H, W) -> the reference's per-image shape (adds a channel axis when needed)."""
    if ref.ndim == 4:
        img = np.repeat(img[..., None], ref.shape[3], axis=3)
    return img


#: kind name -> generator(reference, count, rng) returning (count, *image shape) float32
GARBAGE_KINDS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "uniform_noise": _uniform,
    "gaussian_noise": _gaussian,
    "salt_pepper": _salt_pepper,
    "smooth_noise": _smooth_noise,
    "constant": _constant,
    "near_constant": _near_constant,
    "ramp_stripes": _ramp_stripes,
    "patch_shuffle": _patch_shuffle,
    "corrupted": _corrupt,
    "inverted": _inverted,
}
