"""Tests of verifier.data on real images written in each format a user would hand in.

MNIST digits, skimage photos and pydicom's shipped CT/MR slices, saved to tmp_path.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage.data as skd
from PIL import Image

from verifier.data import (IMAGE_SUFFIXES, MAX_FILE_BYTES, DatasetError, EncodedImage, InputError,
                           decode_image, iter_batches,
                           labelled_dataset, load_images, pixels_from_array, preprocess,
                           save_dataset)
from verifier.examples.datasets import dicom_test_files, load_mnist
from verifier.spec import ModelSpec

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CLASSES = tuple(str(d) for d in range(10))


def _spec(size=(28, 28), channels=1, mean=(0.0,), std=(1.0,)) -> ModelSpec:
    # io never touches the model; any stand-in object satisfies the spec's "one of path/module"
    return ModelSpec(classes=CLASSES, size=size, channels=channels, mean=mean, std=std,
                     module=object())


def _dicom(name: str) -> Path:
    by_name = {p.name: p for p in dicom_test_files()}
    p = by_name.get(name, DICOM_DIR / name)
    if not p.exists():
        pytest.skip(f"{name} not shipped with this pydicom")
    return p


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_mnist()
    return np.array(x[:60]), np.array(y[:60])


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return np.asarray(skd.camera())  # uint8 (512, 512)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(skd.astronaut())  # uint8 (512, 512, 3)


# ------------------------------------------------------------------ Pillow formats

def test_gray_png_8_and_16_bit_decode_to_same_floats(tmp_path, digits):
    d8 = digits[0][3]
    Image.fromarray(d8).save(tmp_path / "d8.png")
    Image.fromarray((d8.astype(np.uint16) * 257)).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode == "I;16"
    a8 = decode_image(tmp_path / "d8.png")
    a16 = decode_image(tmp_path / "d16.png")
    assert a8.dtype == np.float32 and a8.shape == (28, 28)
    np.testing.assert_allclose(a8, d8 / 255.0, atol=1e-7)
    np.testing.assert_allclose(a16, a8, atol=1e-7)


def test_16_bit_big_endian_tiff_and_bmp(tmp_path, camera):
    wide = camera.astype(np.uint16) * 257 + 3
    Image.fromarray(wide.astype(">u2")).save(tmp_path / "cam.tif")
    assert Image.open(tmp_path / "cam.tif").mode == "I;16B"
    np.testing.assert_allclose(decode_image(tmp_path / "cam.tif"), wide / 65535.0, atol=1e-6)
    Image.fromarray(camera).save(tmp_path / "cam.bmp")
    np.testing.assert_allclose(decode_image(tmp_path / "cam.bmp"), camera / 255.0, atol=1e-7)


def test_rgb_jpeg(tmp_path, astronaut):
    Image.fromarray(astronaut).save(tmp_path / "astro.jpg", quality=95)
    a = decode_image(tmp_path / "astro.jpg")
    assert a.shape == (512, 512, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - astronaut / 255.0).mean() < 0.02  # lossy, but the same photo


def test_rgba_is_composited_onto_black(tmp_path, astronaut):
    alpha = np.tile(np.linspace(0, 255, 512).round().astype(np.uint8), (512, 1))
    rgba = np.dstack([astronaut, alpha])
    Image.fromarray(rgba).save(tmp_path / "astro.png")
    a = decode_image(tmp_path / "astro.png")
    want = astronaut / 255.0 * (alpha / 255.0)[..., None]
    np.testing.assert_allclose(a, want, atol=1e-6)
    assert a[:, 0].max() == 0.0  # fully transparent column is black


def test_palette_and_la_png(tmp_path, astronaut, camera):
    pal = Image.fromarray(astronaut).quantize(colors=64)
    assert pal.mode == "P"
    pal.save(tmp_path / "pal.png")
    want = np.asarray(pal.convert("RGB")) / 255.0
    np.testing.assert_allclose(decode_image(tmp_path / "pal.png"), want, atol=1e-6)
    la = Image.fromarray(np.dstack([camera, np.full_like(camera, 128)]), mode="LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_allclose(decode_image(tmp_path / "la.png"),
                               camera / 255.0 * (128 / 255.0), atol=1e-6)


def test_multipage_tiff_refused():
    path = Path(skd.__file__).parent / "multipage.tif"
    if not path.exists():
        pytest.skip("skimage multipage.tif missing")
    with pytest.raises(InputError, match="multi-page"):
        decode_image(path)


# ------------------------------------------------------------------ DICOM

def test_dicom_ct_rescale_and_minmax():
    path = _dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = (hu - hu.min()) / (hu.max() - hu.min())
    a = decode_image(path)
    assert a.shape == (128, 128) and a.dtype == np.float32
    np.testing.assert_allclose(a, want, atol=1e-6)


def test_dicom_mr_window_center_width():
    path = _dicom("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 LINEAR window, to [0, 1]
    want = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(decode_image(path), want, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "ct_mono1.dcm")
    mono2 = decode_image(_dicom("CT_small.dcm"))
    mono1 = decode_image(tmp_path / "ct_mono1.dcm")
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_rgb_ybr_and_palette_accepted():
    rgb = decode_image(_dicom("examples_rgb_color.dcm"))
    assert rgb.shape == (240, 320, 3) and 0 <= rgb.min() and rgb.max() <= 1
    ybr = decode_image(_dicom("SC_ybr_full_422_uncompressed.dcm"))
    ds = pydicom.dcmread(_dicom("SC_ybr_full_422_uncompressed.dcm"))
    np.testing.assert_allclose(ybr, ds.pixel_array / 255.0, atol=1e-6)  # pydicom's YBR->RGB
    pal = decode_image(_dicom("examples_palette.dcm"))
    assert pal.shape == (350, 800, 3) and pal.std() > 0.01


def test_dicom_refusals_name_the_cause(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.save_as(tmp_path / "odd.dcm")
    with pytest.raises(InputError, match="odd.dcm.*photometric interpretation 'YBR_PARTIAL_420'"):
        decode_image(tmp_path / "odd.dcm")
    pal = pydicom.dcmread(_dicom("examples_palette.dcm"))
    for kw in ("RedPaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData"):
        del pal[kw]
    pal.save_as(tmp_path / "pal_nolut.dcm")
    with pytest.raises(InputError, match="PALETTE COLOR.*lookup table"):
        decode_image(tmp_path / "pal_nolut.dcm")
    with pytest.raises(InputError, match="multi-frame"):
        decode_image(_dicom("examples_ybr_color.dcm"))
    with pytest.raises(InputError, match="no decoder plugin.*JPEG-LS.*(pylibjpeg|gdcm)"):
        decode_image(_dicom("JPEGLSNearLossless_08.dcm"))
    with pytest.raises(InputError, match="less than expected"):
        decode_image(_dicom("MR_truncated.dcm"))
    with pytest.raises(InputError, match="no pixel data"):
        decode_image(_dicom("rtplan.dcm"))


def test_dicom_without_suffix_found_in_folder(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001").write_bytes(_dicom("MR_small.dcm").read_bytes())
    (tmp_path / "series" / "notes").write_text("not an image")
    recs = load_images([tmp_path / "series"], _spec(size=(64, 64)))
    assert [Path(r.source).name for r in recs] == ["IM0001"] and recs[0].ok


# ------------------------------------------------------------------ arrays and .npy

def test_npy_and_pixels_from_array(tmp_path, digits):
    d = digits[0][5]
    np.save(tmp_path / "d.npy", d)
    np.testing.assert_allclose(decode_image(tmp_path / "d.npy"), d / 255.0, atol=1e-7)
    np.save(tmp_path / "obj.npy", np.array([d, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):
        decode_image(tmp_path / "obj.npy")
    np.testing.assert_array_equal(pixels_from_array(d > 100), (d > 100).astype(np.float32))
    np.testing.assert_allclose(pixels_from_array(d.astype(np.uint16) * 257), d / 255.0, atol=1e-7)
    f = d / 255.0
    np.testing.assert_allclose(pixels_from_array(f), f, atol=1e-7)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pixels_from_array(f * 255)
    with pytest.raises(InputError, match="NaN"):
        pixels_from_array(np.where(d > 200, np.nan, f))
    with pytest.raises(InputError, match="dtype int32"):
        pixels_from_array(d.astype(np.int32))
    with pytest.raises(InputError, match="zero size"):
        pixels_from_array(np.zeros((0, 28), np.uint8))
    with pytest.raises(InputError, match="aspect"):
        pixels_from_array(np.zeros((2, 1000), np.uint8))


def test_load_images_from_array(digits):
    x = digits[0][:5]
    recs = load_images(x, _spec())
    assert [r.source for r in recs] == [f"array[{i}]" for i in range(5)]
    assert all(r.ok for r in recs)
    assert recs[2].digest == "sha256:" + hashlib.sha256(x[2].tobytes()).hexdigest()
    np.testing.assert_allclose(recs[2].pixels[0], x[2] / 255.0, atol=1e-6)
    bad = [x[0], np.full((28, 28), np.nan, np.float32)]
    recs = load_images(bad, _spec())
    assert recs[0].ok and not recs[1].ok and "array[1]" in recs[1].error and "NaN" in recs[1].error


@pytest.mark.parametrize("case", ["rgb_same_size", "rgb_resized", "gray_to_rgb", "gray16_resized",
                                  "gray_trailing_1", "rgba", "rgb_to_gray", "float"])
def test_array_chunks_equal_image_by_image_bit_for_bit(case, astronaut, camera):
    """A whole uint8 / uint16 array chunk is converted in one go (fewer copies); its pixels must
    be the same bits as `pixels_from_array` + `preprocess` image by image (the tie-breaking
    uniform hashes them), and the chunks it does not take go the per-image way unchanged."""
    rng = np.random.default_rng(3)
    rgb = np.stack([astronaut[i * 40:i * 40 + 97, :61] for i in range(5)])  # (5, 97, 61, 3) uint8
    gray = np.stack([camera[i * 50:i * 50 + 97, :61] for i in range(5)])
    arr, spec = {
        "rgb_same_size": (rgb, _spec(size=(97, 61), channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))),
        "rgb_resized": (rgb, _spec(size=(28, 40), channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))),
        "gray_to_rgb": (gray, _spec(size=(64, 64), channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))),
        "gray16_resized": ((gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape)).astype(np.uint16),
                           _spec(size=(30, 20), mean=(0.3,), std=(0.2,))),
        "gray_trailing_1": (gray[..., None], _spec(size=(97, 61), mean=(0.3,), std=(0.2,))),
        "rgba": (np.concatenate([rgb, rgb[..., :1]], axis=-1), _spec(size=(28, 28), channels=3,
                                                                      mean=(0.5,) * 3, std=(0.25,) * 3)),
        "rgb_to_gray": (rgb, _spec(size=(28, 28), mean=(0.3,), std=(0.2,))),
        "float": (gray / 255.0, _spec(size=(28, 28), mean=(0.3,), std=(0.2,))),
    }[case]
    from verifier.data.pixels import MAX_PIXELS
    from verifier.data.stream import _whole_chunk

    # the first five cases take the whole-chunk path, the last three the per-image one
    assert (_whole_chunk(arr[:3], spec, MAX_PIXELS) is None) == (case in ("rgba", "rgb_to_gray", "float"))
    got = np.concatenate([x for _, x in iter_batches(arr, spec, batch_size=3)])
    one_by_one = np.concatenate([preprocess([pixels_from_array(a)], spec) for a in arr])
    assert got.dtype == np.float32 and got.shape == one_by_one.shape
    np.testing.assert_array_equal(got.view(np.uint32), one_by_one.view(np.uint32))


# ------------------------------------------------------------------ bad inputs in one call

def test_each_bad_input_is_its_own_error_record(tmp_path, digits, camera):
    d = digits[0][0]
    good = tmp_path / "good.png"
    Image.fromarray(d).save(good)
    raw = good.read_bytes()
    files = {
        "corrupt.png": (np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
                        "not a recognised image"),
        "empty.png": (b"", "empty"),
        "truncated.png": (raw[: len(raw) // 2], "truncated or corrupt"),
        "notes.txt": (b"patient list, do not share\n", "not a recognised image"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan, np.float32))
    Image.fromarray(camera).save(tmp_path / "big.png")  # 512 x 512 over the test limit
    Image.fromarray(d).save(tmp_path / "good2.jpg")
    inputs = [good, *(tmp_path / n for n in files), tmp_path / "nan.npy", tmp_path / "big.png",
              tmp_path / "missing.png", tmp_path / "good2.jpg"]
    recs = load_images(inputs, _spec(), max_pixels=100_000)
    assert [r.source for r in recs] == [str(p) for p in inputs]
    causes = [c for _, c in files.values()] + ["NaN", "pixel limit", "not found"]
    for rec, cause in zip(recs[1:-1], causes):
        assert not rec.ok and rec.pixels is None
        assert rec.source in rec.error and cause in rec.error, rec.error
    assert recs[0].ok and recs[-1].ok
    assert recs[0].pixels.shape == (1, 28, 28) and recs[0].pixels.dtype == np.float32
    assert recs[0].digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert recs[1].digest is not None and recs[-2].digest is None  # corrupt was read; missing was not


def test_in_memory_files_decode_as_the_same_files_on_disk(tmp_path, digits, camera):
    """An upload held in memory (`EncodedImage`, what the service gates) gives the pixels and
    digest of the same bytes read from a file, and the same per-input error records, named
    after the client's file name; the decoder follows the suffix hint when the name has none."""
    files = {"a.png": digits[0][0], "b.jpg": digits[0][1], "c.tif": camera[:40, :50]}
    for name, arr in files.items():
        Image.fromarray(arr).save(tmp_path / name)
    np.save(tmp_path / "d.npy", digits[0][2].astype(np.float32) / 255.0)
    names = [*files, "d.npy"]
    on_disk = load_images([tmp_path / n for n in names], _spec(), workers=1)
    in_memory = load_images([EncodedImage(n, (tmp_path / n).read_bytes()) for n in names], _spec(),
                            workers=1)
    for disk, mem, name in zip(on_disk, in_memory, names):
        assert disk.ok and mem.ok and mem.source == name
        np.testing.assert_array_equal(mem.pixels, disk.pixels)
        assert mem.digest == disk.digest
    # a name without suffix: the bytes' magic decides, with or without the suffix hint
    npy = (tmp_path / "d.npy").read_bytes()
    hinted = load_images([EncodedImage("upload-7", npy, ".npy"), EncodedImage("upload-8", npy)],
                         _spec(), workers=1)
    for rec in hinted:
        np.testing.assert_array_equal(rec.pixels, on_disk[3].pixels)
    bad = load_images([EncodedImage("empty.png", b""),
                       EncodedImage("trunc.png", (tmp_path / "a.png").read_bytes()[:40]),
                       EncodedImage("big.png", b"\0" * (MAX_FILE_BYTES + 1))], _spec(), workers=1)
    for rec, cause in zip(bad, ["empty", "corrupt", "over the"]):
        assert not rec.ok and rec.source in rec.error and cause in rec.error, rec.error
    # the streaming path and a bare (single) upload take them too
    (records, x), = iter_batches(EncodedImage("a.png", (tmp_path / "a.png").read_bytes()), _spec(),
                                 workers=1)
    np.testing.assert_array_equal(x[0], on_disk[0].pixels)


# ------------------------------------------------------------------ preprocess

def test_preprocess_mean_std_by_hand(digits, astronaut):
    d = digits[0][7] / 255.0
    spec = _spec(channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = preprocess([d], spec)
    assert out.shape == (1, 3, 28, 28) and out.dtype == np.float32
    for c, (m, s) in enumerate(zip(spec.mean, spec.std)):
        np.testing.assert_allclose(out[0, c], (d - m) / s, atol=1e-5)
    rgb = astronaut[:28, 100:128] / 255.0
    gray = preprocess([rgb], _spec(mean=(0.1,), std=(0.5,)))[0, 0]
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(gray, (luma - 0.1) / 0.5, atol=1e-5)


def test_resize_agrees_with_pillow_bilinear(camera, astronaut):
    spec = _spec(size=(224, 200))
    x = camera / 255.0
    ours = preprocess([x], spec)[0, 0]
    pil_f = np.asarray(Image.fromarray(x.astype(np.float32), mode="F")
                       .resize((200, 224), Image.BILINEAR))
    np.testing.assert_allclose(ours, pil_f, atol=1e-5)
    pil_8 = np.asarray(Image.fromarray(camera).resize((200, 224), Image.BILINEAR)) / 255.0
    assert np.abs(ours - pil_8).max() <= 1.0 / 255 + 1e-6  # Pillow's 8-bit path rounds
    up = preprocess([x[200:264, 200:264]], _spec(size=(100, 150)))[0, 0]
    pil_up = np.asarray(Image.fromarray(x[200:264, 200:264].astype(np.float32), mode="F")
                        .resize((150, 100), Image.BILINEAR))
    np.testing.assert_allclose(up, pil_up, atol=1e-5)
    rgb = preprocess([astronaut / 255.0], _spec(size=(64, 64), channels=3))[0]
    pil_rgb = np.asarray(Image.fromarray(astronaut).resize((64, 64), Image.BILINEAR)) / 255.0
    assert np.abs(np.moveaxis(rgb, 0, -1) - pil_rgb).max() <= 1.0 / 255 + 1e-6


def test_preprocess_mixed_sizes_match_one_by_one(camera, digits, astronaut):
    imgs = [camera / 255.0, digits[0][0] / 255.0, astronaut / 255.0, digits[0][1] / 255.0]
    spec = _spec(size=(32, 32), mean=(0.2,), std=(0.3,))
    together = preprocess(imgs, spec)
    alone = np.concatenate([preprocess([im], spec) for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-6)


# ------------------------------------------------------------------ datasets and streaming

def test_save_and_list_folder_dataset(tmp_path, digits):
    x, y = digits
    paths = save_dataset(x[:40], y[:40], CLASSES, tmp_path / "data")
    (tmp_path / "data" / "README.txt").write_text("ignored")
    items = labelled_dataset(tmp_path / "data", CLASSES)
    assert sorted(items) == sorted((p, int(lab)) for p, lab in zip(paths, y[:40]))
    assert [lab for _, lab in items] == sorted(lab for _, lab in items)
    for p, lab in items:
        i = int(p.stem)
        assert lab == y[i] and np.array_equal(np.asarray(Image.open(p)), x[i])


def test_csv_manifest_names_and_indices(tmp_path, digits):
    x, y = digits
    paths = save_dataset(x[:6], y[:6], CLASSES, tmp_path / "imgs")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, p in enumerate(paths):  # class names and indices mixed, paths relative
            w.writerow([p.relative_to(tmp_path), CLASSES[y[i]] if i % 2 else int(y[i])])
    items = labelled_dataset(tmp_path / "m.csv", CLASSES)
    assert items == [(tmp_path / p.relative_to(tmp_path), int(lab)) for p, lab in zip(paths, y[:6])]
    (tmp_path / "bad.csv").write_text("path,label\nimgs/a.png,cat\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2.*'cat'.*known classes"):
        labelled_dataset(tmp_path / "bad.csv", CLASSES)
    (tmp_path / "hdr.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(DatasetError, match="path,label"):
        labelled_dataset(tmp_path / "hdr.csv", CLASSES)


def test_dataset_errors(tmp_path, digits):
    x, y = digits
    save_dataset(x[:3], [0, 1, 1], ["normal", "pneumonia"], tmp_path / "d")
    with pytest.raises(DatasetError, match=r"\['pneumonia'\].*known classes: \['normal', 'fracture'\]"):
        labelled_dataset(tmp_path / "d", ["normal", "fracture"])
    (tmp_path / "e" / "normal").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no image files"):
        labelled_dataset(tmp_path / "e", ["normal"])
    with pytest.raises(DatasetError, match="not found"):
        labelled_dataset(tmp_path / "nowhere", ["normal"])


def test_iter_batches_streams_in_order(tmp_path, digits):
    x, y = digits
    save_dataset(x, y, CLASSES, tmp_path / "data")
    items = labelled_dataset(tmp_path / "data", CLASSES)
    broken = items[25][0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths, labels = [p for p, _ in items], [lab for _, lab in items]
    spec = _spec(size=(16, 16), mean=(0.13,), std=(0.31,))
    chunks = list(iter_batches(paths, spec, batch_size=16, labels=labels))
    assert [len(r) for r, _ in chunks] == [16, 16, 16, 12]
    recs = [r for rs, _ in chunks for r in rs]
    assert [r.source for r in recs] == [str(p) for p in paths]
    assert [r.label for r in recs] == labels
    assert chunks[1][1].shape == (15, 1, 16, 16) and chunks[1][1].dtype == np.float32
    assert not recs[25].ok and str(broken) in recs[25].error
    whole = load_images(paths, spec, labels=labels)
    stacked = np.concatenate([b for _, b in chunks])
    np.testing.assert_array_equal(stacked, np.stack([r.pixels for r in whole if r.ok]))
    # a folder streams the same files in the same sorted order
    folder = [r.source for rs, _ in iter_batches([tmp_path / "data"], spec, batch_size=7)
              for r in rs]
    assert folder == sorted(folder, key=lambda s: Path(s).parts) and len(folder) == 60
    stream = iter_batches([tmp_path / "data"], spec, batch_size=8)
    first, _ = next(stream)
    stream.close()  # stopping early cancels the decode-ahead chunk and returns
    assert len(first) == 8
    # decoding inline (workers=1, as the service does per micro-batch) gives the same chunks
    inline = list(iter_batches(paths, spec, batch_size=16, labels=labels, workers=1))
    assert [[(r.source, r.label, r.error) for r in rs] for rs, _ in inline] == \
        [[(r.source, r.label, r.error) for r in rs] for rs, _ in chunks]
    for (_, a), (_, b) in zip(inline, chunks):
        np.testing.assert_array_equal(a, b)


def test_iter_batches_decodes_at_most_two_chunks_ahead(tmp_path, digits, monkeypatch):
    import verifier.data.stream as vio  # _load_one is looked up there

    x, y = digits
    save_dataset(x, y, CLASSES, tmp_path / "data")
    calls = []
    real = vio._load_one
    monkeypatch.setattr(vio, "_load_one", lambda *a: calls.append(a[0][0]) or real(*a))
    stream = iter_batches([tmp_path / "data"], _spec(), batch_size=10, workers=2)
    records, _ = next(stream)
    assert len(records) == 10 and 10 <= len(calls) <= 20  # this chunk and the one decoding ahead
    stream.close()


def test_folder_expansion_and_empty_folder(tmp_path, digits):
    d = digits[0][0]
    (tmp_path / "in" / "b").mkdir(parents=True)
    (tmp_path / "in" / ".hidden").mkdir()
    Image.fromarray(d).save(tmp_path / "in" / "b" / "z.png")
    Image.fromarray(d).save(tmp_path / "in" / "a.png")
    Image.fromarray(d).save(tmp_path / "in" / "c.png")
    Image.fromarray(d).save(tmp_path / "in" / ".hidden" / "x.png")
    (tmp_path / "in" / "notes.txt").write_text("skip me")
    (tmp_path / "empty").mkdir()
    recs = load_images([tmp_path / "in", tmp_path / "empty"], _spec(), workers=1)
    assert [Path(r.source).relative_to(tmp_path).as_posix() for r in recs] == [
        "in/a.png", "in/b/z.png", "in/c.png", "empty"]
    assert all(r.ok for r in recs[:3]) and "no image files" in recs[3].error
    assert {".png", ".dcm", ".npy", ".jpg", ".tif"} <= IMAGE_SUFFIXES


_DIGEST_SCRIPT = """
import sys, numpy as np
from skimage import data
from calibration.conformal import hash_rows
from verifier.data import load_images, EncodedImage, preprocess
from verifier.spec import ModelSpec
from PIL import Image
import io
imgs = [data.astronaut(), data.coffee(), data.camera(), data.brick()]
out = []
for size, c in (((28, 28), 1), ((224, 224), 3), ((97, 61), 3)):
    spec = ModelSpec(classes=("a", "b"), size=size, channels=c, mean=(0.5,) * c, std=(0.25,) * c,
                     module=object())
    x = preprocess([i.astype(np.float32) / 255 for i in imgs], spec)
    enc = []
    for k, i in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(np.tile(i, (4, 4, 1)) if i.ndim == 3 else np.tile(i, (4, 4))).save(buf, "PNG")
        enc.append(EncodedImage(f"big{k}.png", buf.getvalue()))  # 2048 px and more: the strip path
    big = np.stack([r.pixels for r in load_images(enc, spec, workers=1)])
    out += [int(v) for v in hash_rows(x)] + [int(v) for v in hash_rows(big)]
print(" ".join(map(str, out)))
"""


def test_preprocessed_pixels_do_not_depend_on_blas_threads():
    """The tie-breaking uniform is a hash of the preprocessed pixels, so they must be the same
    bits with 1 or 2 BLAS threads (float32 products differed for downsized images; the resize
    accumulates in float64 and rounds once). Plain and strip-wise (large image) paths."""
    import subprocess
    import sys

    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        digests.append(run.stdout.split())
    assert len(digests[0]) == 24 and digests[0] == digests[1]
