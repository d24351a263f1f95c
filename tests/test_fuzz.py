"""Issue 10, fuzzing (hypothesis): image decoders, spec loader, manifest loader, log reader.

Each target gets damaged or generated input and must either return a valid result or raise
the project's own error type with a message; any other exception, or a hang, is a defect.
Every crash found is kept below as an explicit `@example`. Bounded: `max_examples` and a
per-example alarm keep the file near a minute on one core.
"""
from __future__ import annotations

import io
import json
import signal
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from reference_maps.artifact import ArtifactError, read_artifact, write_artifact
from verifier.data import InputError, decode_image
from verifier.runtime.decision import Decision
from verifier.runtime.log import DecisionLog, LogError
from verifier.spec import SpecError, load_spec

#: one seeded, database-free profile: the same examples on every run, no .hypothesis folder
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
#: an example running this long is a hang, not a slow decoder
HANG_SECONDS = 10


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail an example that runs longer than `seconds` (SIGALRM; main thread, POSIX)."""
    def fire(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    if not hasattr(signal, "setitimer"):
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- image decoders

def _seed_images() -> dict[str, bytes]:
    """Small valid files of every decoded format, built from real data (MNIST digits, a real
    CT slice), to be damaged by the fuzzer."""
    from verifier.examples.datasets import load_mnist

    digit = load_mnist()[0][7]
    out = {}
    for suffix, mode, fmt in ((".png", "L", "PNG"), (".jpg", "L", "JPEG"), (".bmp", "L", "BMP"),
                              (".tif", "L", "TIFF"), (".png16", "I;16", "PNG"),
                              (".jpgrgb", "RGB", "JPEG")):
        buf = io.BytesIO()
        img = Image.fromarray(digit).convert(mode) if mode != "I;16" else \
            Image.fromarray(digit.astype(np.uint16) * 257)
        img.save(buf, format=fmt)
        out[suffix] = buf.getvalue()
    out[".dcm"] = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    buf = io.BytesIO()
    np.save(buf, digit)
    out[".npy"] = buf.getvalue()
    return out


SEEDS = _seed_images()
_SUFFIX = {".png16": ".png", ".jpgrgb": ".jpg"}


def _poke(kind: str, pos: int, value: int) -> bytes:
    data = bytearray(SEEDS[kind])
    data[pos] = value
    return bytes(data)


#: crashes the fuzzer found, kept: Pillow raised TypeError("Missing dimensions") on a TIFF whose
#: strip tag was damaged (io now turns any decoder exception into InputError)
TIFF_MISSING_DIMENSIONS = (".tif", _poke(".tif", 118, 0xFF))
#: a BMP header claiming 468 Mpx: Pillow's own bomb error, refused before decoding
BMP_BOMB = (".bmp", _poke(".bmp", 20, 0xFF))


@st.composite
def damaged_image(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):  # a chunk spliced in (lengths, headers, garbage)
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=32))
    return _SUFFIX.get(kind, kind), bytes(data)


def _check_decoded(img: np.ndarray) -> None:
    assert img.dtype == np.float32 and img.ndim in (2, 3)
    assert img.ndim == 2 or img.shape[-1] == 3
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


def _decode(tmp_path: Path, suffix: str, data: bytes) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    with no_hang():
        try:
            img = decode_image(path, max_pixels=4_000_000)
        except InputError as e:
            assert str(path) in str(e)  # the message names the input
            return
    _check_decoded(img)


@FUZZ
@given(case=damaged_image())
@example(case=TIFF_MISSING_DIMENSIONS)
@example(case=BMP_BOMB)
@example(case=(".dcm", SEEDS[".dcm"][:200]))  # DICOM cut inside the meta header
def test_fuzz_decode_damaged_images(tmp_path, case):
    _decode(tmp_path, *case)


@settings(FUZZ, max_examples=100)
@given(suffix=st.sampled_from([".png", ".jpg", ".dcm", ".npy", ".tif", ""]),
       data=st.one_of(st.binary(max_size=512),
                      st.binary(max_size=256).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                      st.binary(max_size=256).map(lambda b: b"\x00" * 128 + b"DICM" + b),
                      st.binary(max_size=256).map(lambda b: b"\x93NUMPY" + b)))
def test_fuzz_decode_raw_bytes(tmp_path, suffix, data):
    _decode(tmp_path, suffix, data)


# ---------------------------------------------------------------- spec loader

_VALUES = st.recursive(
    st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
              st.text(max_size=12), st.just("auto")),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else
                                     "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string (BMP escapes)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


_TEMPLATE = {"model": {"path": "model.onnx", "classes": ["a", "b"], "garbage_class": 2},
             "input": {"size": [28, 28], "channels": 1, "mean": [0.5], "std": [0.25]},
             "layers": {"target": "auto", "early": "auto"}}


@st.composite
def spec_text(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))  # anything at all
    tables = json.loads(json.dumps(_TEMPLATE))
    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from(sorted(tables)))
        key = draw(st.sampled_from(sorted(tables[table]) + ["extra"]))
        if draw(st.integers(0, 5)) == 0:
            tables[table].pop(key, None)
        else:
            tables[table][key] = draw(_VALUES)
    return "\n".join(f"[{t}]\n" + "\n".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                             for k, v in kv.items()) for t, kv in tables.items())


@FUZZ
@given(text=spec_text())
@example(text='[model]\n"path" = 5\n"classes" = ["a", "b"]\n[input]\n"size" = [28, 28]\n')
@example(text='[model]\n"path" = []\n"classes" = ["a"]\n[input]\n"size" = [28, 28]\n')
@example(text='[model]\n"path" = "m.onnx"\n"classes" = ["a"]\n[input]\n"size" = [28, 28]\n'
              '"channels" = 1.5\n')
@example(text='[model]\n"path" = "m.onnx"\n"classes" = [{"x" = 1}]\n[input]\n"size" = [1e400, 2]\n')
@example(text='[model]\n"path" = "m.onnx"\n"classes" = ["a"]\n[input]\n"size" = [nan, 2]\n')
@example(text="\udcff")
def test_fuzz_spec_loader(tmp_path, text):
    (tmp_path / "model.onnx").write_bytes(b"not checked here")
    path = tmp_path / "spec.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        spec = load_spec(path)
    except SpecError as e:
        assert str(e)
        return
    assert spec.channels in (1, 3) and len(spec.size) == 2 and spec.classes


# ---------------------------------------------------------------- manifest loader

def _artifact(tmp_path: Path) -> Path:
    path = tmp_path / "art"
    if not path.exists():
        write_artifact(path, kind="reference_store", format_version=1,
                       arrays={"maps": {"cam": np.arange(12.0).reshape(3, 4)}},
                       manifest={"grid": 4})
    return path


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                               st.text(max_size=10)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=8), inner,
                                                             max_size=4)),
                     max_leaves=10)


@FUZZ
@given(edit=st.dictionaries(st.sampled_from(["kind", "format_version", "files", "arrays", "grid",
                                             "created"]), _JSON, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=64)))
@example(edit={}, raw=b"[" * 100_000)   # deeper than the JSON parser's recursion limit
@example(edit={"files": {"../x": "0"}}, raw=None)
@example(edit={"files": {"maps.npz": 5}}, raw=None)
@example(edit={"format_version": [1]}, raw=None)
def test_fuzz_manifest_loader(tmp_path, edit, raw):
    path = _artifact(tmp_path)
    mpath = path / "manifest.json"
    original = mpath.read_bytes()
    try:
        if raw is not None:
            mpath.write_bytes(raw)
        else:
            manifest = json.loads(original)
            manifest.update(edit)
            mpath.write_text(json.dumps(manifest))
        try:
            with no_hang():
                art = read_artifact(path, kind="reference_store", supported_versions=[1])
        except ArtifactError as e:
            assert str(e)
            return
        np.testing.assert_array_equal(art.arrays["maps"]["cam"], np.arange(12.0).reshape(3, 4))
    finally:
        mpath.write_bytes(original)


# ---------------------------------------------------------------- decision-log reader

def _part_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = DecisionLog(d)
        [p] = log.append([Decision(f"x{i}.png", "accept" if i % 2 else "reject", 0.5 - i / 100,
                                   "normal", 0.9, [] if i % 2 else ["attention"],
                                   {"iou": 0.1 * i}, {"iou": 0.5}) for i in range(20)],
                         bundle_id="b", alpha=0.05,
                         time=datetime(2024, 5, 1, 12, tzinfo=timezone.utc))
        return p.read_bytes()


PART = _part_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(PART) - 1), st.integers(0, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, len(PART))),
       foreign=st.booleans())
@example(flips=[], cut=len(PART) // 2, foreign=False)
@example(flips=[(len(PART) - 9, 0)], cut=None, foreign=False)  # footer length zeroed
def test_fuzz_log_reader(tmp_path, flips, cut, foreign):
    folder = tmp_path / "log" / "date=2024-05-01"
    folder.mkdir(parents=True, exist_ok=True)
    data = bytearray(PART)
    for pos, byte in flips:
        data[pos] = byte
    if cut is not None:
        data = data[:cut]
    part = folder / "part-fuzz.parquet"
    part.write_bytes(bytes(data))
    if foreign:
        (folder / "part-other.parquet").write_bytes(bytes(data[::-1]))
    log = DecisionLog(tmp_path / "log")
    with no_hang():
        try:
            table = log.read()
        except LogError as e:
            assert "part-" in str(e)  # names the file
            return
    assert isinstance(table, pa.Table)
    assert table.num_rows == 20 and table.column("input").to_pylist()[3] == "x3.png"


if sys.platform == "win32":  # SIGALRM is POSIX: there the per-example alarm does nothing
    pytestmark = pytest.mark.filterwarnings("ignore")
