"""Issue 10, inputs: special files, link loops, unreadable folders and non-UTF-8 names each
become one error record, and the rest of the folder is still gated.

Runs as root in CI, so an unreadable folder is simulated by making `os.scandir` raise
PermissionError for that one folder (chmod 000 does not stop root).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from verifier.data import count_inputs, decode_image, load_images, safe_name
from verifier.spec import ModelSpec

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices and bytes names are POSIX")


def _spec() -> ModelSpec:
    return ModelSpec(classes=("a", "b"), size=(28, 28), channels=1, mean=(0.0,), std=(1.0,),
                     module=object())  # io never touches the model


def _in_thread(fn, timeout: float = 20.0):
    """Run fn in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout} s"
    return out["v"]


@pytest.fixture()
def digit(mnist) -> np.ndarray:
    return mnist[0][0]


def test_fifo_and_dev_zero_given_directly_are_refused_at_once(tmp_path, digit):
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    good = tmp_path / "good.png"
    Image.fromarray(digit).save(good)
    recs = _in_thread(lambda: load_images([fifo, "/dev/zero", good], _spec(), workers=1))
    assert [r.ok for r in recs] == [False, False, True]
    assert "FIFO" in recs[0].error and str(fifo) in recs[0].error
    assert "character device" in recs[1].error and recs[1].digest is None
    from verifier.data import InputError

    with pytest.raises(InputError, match="FIFO"):
        _raise_from_thread(decode_image, fifo)


def _raises(fn, *a):
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
        return e
    return None


def _raise_from_thread(fn, *a):
    e = _in_thread(lambda: _raises(fn, *a))
    if e is not None:
        raise e


def _bad_folder(root: Path, digit: np.ndarray, monkeypatch) -> dict[str, str]:
    """A folder with 3 good images and one bad entry of each kind; name -> expected cause."""
    d = root / "in"
    (d / "sub").mkdir(parents=True)
    (d / "locked").mkdir()
    Image.fromarray(digit).save(d / "a.png")
    Image.fromarray(digit).save(d / "sub" / "b.png")
    Image.fromarray(digit).save(os.fsencode(d) + b"/\xff\xfe.png")  # not valid UTF-8
    Image.fromarray(digit).save(d / "locked" / "hidden_by_perm.png")
    os.symlink("loop.png", d / "loop.png")          # a link to itself: ELOOP
    os.symlink("nowhere.png", d / "gone.png")       # dangling
    os.symlink("..", d / "sub" / "up")              # a folder loop
    os.mkfifo(d / "pipe.png")
    os.mkfifo(d / "pipe")                           # no suffix: must not be sniffed (would block)
    (d / "notes.txt").write_text("not an image, passed over")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return {"gone.png": "dangling", "locked": "cannot list folder", "loop.png": "link loop",
            "pipe": "FIFO", "pipe.png": "FIFO", "sub/up": "already walked"}


def test_every_bad_entry_in_a_folder_is_its_own_record(tmp_path, digit, monkeypatch):
    causes = _bad_folder(tmp_path, digit, monkeypatch)
    folder = tmp_path / "in"
    recs = _in_thread(lambda: load_images([folder], _spec(), workers=2))
    by_name = {Path(r.source).relative_to(folder).as_posix(): r for r in recs}
    assert set(by_name) == {"a.png", "sub/b.png", "\\xff\\xfe.png", *causes}
    for name, cause in causes.items():
        assert not by_name[name].ok and cause in by_name[name].error, by_name[name].error
    good = [by_name[n] for n in ("a.png", "sub/b.png", "\\xff\\xfe.png")]
    assert all(r.ok for r in good)
    np.testing.assert_array_equal(good[0].pixels, good[2].pixels)  # the same digit, read fine
    assert count_inputs([folder, folder / "a.png"]) == len(recs) + 1
    for r in recs:  # every name and message is valid UTF-8, hence valid JSON and Arrow text
        r.source.encode("utf-8")
        (r.error or "").encode("utf-8")


def test_safe_name_escapes_only_undecodable_bytes():
    assert safe_name(b"/x/\xff.png") == "/x/\\xff.png"
    assert safe_name(os.fsdecode(b"caf\xc3\xa9-\xe9.png")) == "café-\\xe9.png"
    assert safe_name("plain/é.png") == "plain/é.png"
    assert safe_name("\ud800x") == "\\ud800x"  # a stray surrogate from elsewhere: escaped too


def test_gate_bad_folder_and_bytes_name_to_json_and_log(tmp_path, digit, monkeypatch, gap_bundle,
                                                        gap_model):
    """The issue's run: a bad folder plus a non-UTF-8 name, gated and logged; no row lost."""
    import pyarrow.parquet as pq

    from verifier.runtime.gatekeeper import Gatekeeper

    gate = Gatekeeper.load(gap_bundle, model=gap_model)
    causes = _bad_folder(tmp_path, digit, monkeypatch)
    extra = os.fsencode(tmp_path) + b"/\xe9t\xe9.png"
    Image.fromarray(digit).save(extra)
    decisions = _in_thread(lambda: gate.gate([tmp_path / "in", extra], log=tmp_path / "log"))
    assert len(decisions) == 3 + len(causes) + 1
    assert sum(d.error is None for d in decisions) == 4
    lines = [json.loads(json.dumps(d.to_dict(), ensure_ascii=False)) for d in decisions]
    assert lines[-1]["input"].endswith("/\\xe9t\\xe9.png") and lines[-1]["error"] is None
    rows = pq.ParquetDataset(tmp_path / "log").read().to_pylist()
    assert sorted(r["input"] for r in rows) == sorted(d.input for d in decisions)


def test_nan_in_one_probe_map_is_one_error_record(gap_bundle, gap_model, mnist):
    """A probe returning NaN/inf for some images: those become error records, the others keep
    exactly the decisions they get without the damage."""
    from verifier.runtime.gatekeeper import Gatekeeper

    gate = Gatekeeper.load(gap_bundle, model=gap_model)
    x = mnist[0][3600:3608]
    clean = gate.gate(x)
    real_run = gate.probe.run

    def damaged(batch, classes=None):
        r = real_run(batch, classes)
        r.cam[1, 0, 0] = np.nan
        r.logits[3, 0] = np.inf
        r.early_stats[5] = np.nan
        return r

    gate.probe.run = damaged
    out = gate.gate(x)
    assert len(out) == 8
    for i in (1, 3, 5):
        assert out[i].error and "non-finite" in out[i].error and out[i].decision == "reject"
    for i in (0, 2, 4, 6, 7):
        assert out[i].error is None and out[i].decision == clean[i].decision
        assert out[i].p_value == pytest.approx(clean[i].p_value, abs=1e-12)


def test_progress_total_counts_folder_contents(tmp_path, digit, monkeypatch):
    import io
    import sys

    from verifier.runtime.gatekeeper import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())

    (tmp_path / "f" / "g").mkdir(parents=True)
    for p in ("f/1.png", "f/g/2.png", "f/g/3.png", "x.png"):
        Image.fromarray(digit).save(tmp_path / p)
    bar = _progress(True, [tmp_path / "f", tmp_path / "x.png"])
    assert bar.total == 4
    bar.close()


@pytest.mark.parametrize("mode,channels", [("L", 1), ("L", 3), ("RGB", 1), ("RGB", 3),
                                           ("I;16", 1), ("1", 1)])
def test_large_images_resized_strip_by_strip_match_the_plain_path(tmp_path, monkeypatch, mode,
                                                                  channels):
    """The low-memory path for big images (forced here on real 512 x 512 photos, in strips of
    a few rows) gives the numbers of decode_image + preprocess."""
    import skimage.data

    import verifier.data as vio
    import verifier.data.decode as vdecode  # the strip path's names are looked up there

    src = skimage.data.astronaut() if mode == "RGB" else skimage.data.camera()
    img = Image.fromarray(src.astype(np.uint16) * 257) if mode == "I;16" else \
        Image.fromarray(src).convert(mode)
    path = tmp_path / "big.png"
    img.crop((0, 0, 512, 384)).save(path)  # not square, so height and width cannot mix up
    spec = ModelSpec(classes=("a",), size=(60, 44), channels=channels, mean=(0.2,) * channels,
                     std=(0.5,) * channels, module=object())
    plain = vio.preprocess([decode_image(path)], spec)[0]
    monkeypatch.setattr(vdecode, "STREAM_MIN_PIXELS", 1)
    monkeypatch.setattr(vdecode, "_STRIP_BYTES", 512 * 4 * 3 * 7)  # 7-row strips: 55 of them
    calls = []
    real = vdecode._resize_strips
    monkeypatch.setattr(vdecode, "_resize_strips", lambda *a: calls.append(1) or real(*a))
    [rec] = load_images([path], spec, workers=1)
    assert calls, "the strip path was not taken"
    assert rec.ok and rec.pixels.shape == plain.shape == (channels, 60, 44)
    np.testing.assert_allclose(rec.pixels, plain, atol=2e-5, rtol=0)
