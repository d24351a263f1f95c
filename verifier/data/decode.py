"""Decoding one input file: bounded safe reads of regular files, then Pillow, .npy or DICOM by
its bytes; large Pillow images go straight to the spec's size strip by strip.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from verifier.data.dicom import _decode_dicom
from verifier.data.pixels import (MAX_PIXELS, InputError, _check_geometry, pixels_from_array,
                                  safe_name)
from verifier.data.preprocess import _LUMA, _band, resize_axis
from verifier.spec import ModelSpec

#: files larger than this are refused before being read
MAX_FILE_BYTES: int = 1 << 30
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NPY_MAGIC = b"\x93NUMPY"


def decode_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one file to float32 `(H, W)` gray or `(H, W, 3)` RGB in [0, 1].

    Raises `InputError` naming the file and the cause (see `verifier.data`'s docstring for
    formats and guards).
    """
    path = Path(os.fsdecode(path))
    data = _read_bytes(path)
    return _decode_bytes(data, path, max_pixels, safe_name(path))


def _read_bytes(path: Path, name: str | None = None) -> bytes:
    """The bytes of a regular file, at most `MAX_FILE_BYTES`; anything else is an InputError.

    Opened non-blocking, so a FIFO never waits for a writer, and checked with fstat on
    the open descriptor (a device such as /dev/zero is never read; a file swapped in
    after the first stat is caught).
    """
    name = name or safe_name(path)
    try:
        _require_regular(os.stat(path).st_mode, name)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
        with open(fd, "rb", buffering=0, closefd=True) as f:
            st = os.fstat(fd)
            _require_regular(st.st_mode, name)
            if st.st_size > MAX_FILE_BYTES:
                raise InputError(f"{name}: file is {st.st_size} bytes, over the "
                                 f"{MAX_FILE_BYTES}-byte limit")
            data = _read_at_most(f, st.st_size + 1)
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a folder, not an image file") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read file ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{name}: file grew past the {MAX_FILE_BYTES}-byte limit while read")
    if not data:
        raise InputError(f"{name}: file is empty (0 bytes)")
    return data


def _require_regular(mode: int, name: str) -> None:
    if stat.S_ISDIR(mode):
        raise InputError(f"{name}: is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{name}: is a {_file_kind(mode)}, not a regular file")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _read_at_most(f: Any, n: int) -> bytes:
    """Read up to min(n, MAX_FILE_BYTES + 1) bytes (a file that grows is cut, not followed)."""
    n = min(n, MAX_FILE_BYTES + 1)
    chunks, got = [], 0
    while got < n:
        b = f.read(min(n - got, 1 << 24))
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _decode_bytes(data: bytes, path: Path, max_pixels: int, name: str | None = None) -> np.ndarray:
    """Decode with the decoder the bytes (or the suffix) call for; whatever a third-party
    decoder raises on damaged bytes (TypeError, KeyError, RecursionError, ...) is this
    input's `InputError`, never another exception type."""
    name = name or safe_name(path)
    try:
        return _dispatch(data, path, max_pixels, name)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - found by fuzzing: Pillow/pydicom raise many types
        msg = " ".join(str(e).split())[:200]
        raise InputError(safe_name(f"{name}: corrupt or unsupported image data "
                                   f"({type(e).__name__}: {msg})")) from None


def _decode_bytes_for_spec(data: bytes, path: Path, max_pixels: int, name: str,
                           spec: ModelSpec) -> tuple[np.ndarray, bool]:
    """(pixels, True) preprocessed `(C, h, w)` for a large Pillow image in a plain mode,
    else (decoded image, False) as `_decode_bytes` gives it."""
    try:
        if _pillow_decodes(data, path):
            out = _pillow_to_spec(data, name, max_pixels, spec)
            if out is not None:
                return out, True
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - as in _decode_bytes
        msg = " ".join(str(e).split())[:200]
        raise InputError(safe_name(f"{name}: corrupt or unsupported image data "
                                   f"({type(e).__name__}: {msg})")) from None
    return _decode_bytes(data, path, max_pixels, name), False


def _pillow_decodes(data: bytes, path: Path) -> bool:
    """Whether `_dispatch` hands these bytes to Pillow (not .npy, not DICOM)."""
    suffix = path.suffix.lower()
    return not (data[:6] == _NPY_MAGIC or data[128:132] == b"DICM"
                or suffix in _DICOM_SUFFIXES or suffix == ".npy")


def _dispatch(data: bytes, path: Path, max_pixels: int, name: str) -> np.ndarray:
    suffix = path.suffix.lower()
    if data[:6] == _NPY_MAGIC:
        return _decode_npy(data, name, max_pixels)
    if data[128:132] == b"DICM" or suffix in _DICOM_SUFFIXES:
        return _decode_dicom(data, name, max_pixels)
    if suffix == ".npy":
        raise InputError(f"{name}: not a NumPy .npy file (bad magic bytes)")
    return _decode_pillow(data, name, max_pixels)


def _decode_npy(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which is refused
        raise InputError(f"{name}: unreadable .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{name}: truncated or corrupt .npy file ({e})") from None
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: .npy file holds no array")
    return pixels_from_array(a, max_pixels=max_pixels, name=name)


def _decode_pillow(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    from PIL import ImageOps

    with _open_pillow(data, name, max_pixels) as im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _pil_to_float(im, name)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{name}: truncated or corrupt image data ({e})") from None


#: images with at least this many pixels take the strip-wise path of `_pillow_to_spec`
STREAM_MIN_PIXELS: int = 1 << 22
#: float32 bytes per strip in that path (the strip height follows from the width)
_STRIP_BYTES: int = 1 << 24
_STREAM_MODES = frozenset({"L", "RGB", "I;16", "I;16B", "I;16L", "I;16N", "I", "1", "F"})


def _pillow_to_spec(data: bytes, name: str, max_pixels: int, spec: ModelSpec) -> np.ndarray | None:
    """A large image straight to float32 `(C, h, w)` for `spec`, or None for the plain path.

    Same numbers as `preprocess(decode_image(...))` up to float32 rounding: the two
    resize matrices are applied strip by strip (rows of the image, converted to float
    only a strip at a time), so peak memory is the decoded 8/16-bit image plus one strip.
    Palette / alpha / CMYK modes and EXIF-rotated files take the plain path.
    """
    with _open_pillow(data, name, max_pixels) as im:
        width, height = im.size
        if width * height < STREAM_MIN_PIXELS or im.mode not in _STREAM_MODES \
                or im.getexif().get(0x0112, 1) not in (None, 1):
            return None
        try:
            im.load()
            return _resize_strips(im, spec, name)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{name}: truncated or corrupt image data ({e})") from None


def _resize_strips(im: Any, spec: ModelSpec, name: str) -> np.ndarray:
    width, height = im.size
    (h, w), c = spec.size, spec.channels
    (starts, weights), cols = _band(height, h), _band(width, w)
    color = im.mode == "RGB"
    k = 3 if color and c == 3 else 1
    acc = np.zeros((k, h, w), dtype=np.float32)
    rows = max(1, _STRIP_BYTES // (width * (3 if color else 1) * 4))
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        x = _strip_to_float(np.asarray(im.crop((0, y0, width, y1))), im.mode, name)
        if color:  # (s, W, 3) -> (k, s, W): luma here, before resizing, as _to_channels does
            x = np.tensordot(x, _LUMA, axes=([2], [0]))[None] if c == 1 else np.moveaxis(x, -1, 0)
        else:
            x = x[None]
        x = resize_axis(np.ascontiguousarray(x, dtype=np.float32), cols, -1)  # (k, s, w)
        # each output row takes its inputs that lie in this strip, in the order of `resize`
        # (columns first, then rows): the same bits as the whole image at once, any threads
        for j in range(weights.shape[1]):
            r = starts + j
            sel = np.flatnonzero((r >= y0) & (r < y1))
            if len(sel):
                acc[:, sel, :] += weights[sel, j][:, None] * x[:, r[sel] - y0, :]
    out = np.empty((c, h, w), dtype=np.float32)
    out[:] = acc  # gray replicated to c channels after resizing, as in preprocess
    out -= np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return out


def _strip_to_float(a: np.ndarray, mode: str, name: str) -> np.ndarray:
    """One strip of raw pixels -> float32 in [0, 1] by the rules of `_pil_to_float`."""
    if mode in ("L", "RGB"):
        return a.astype(np.float32) / np.float32(255.0)
    if mode == "1":
        return a.astype(np.float32)
    if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise InputError(f"{name}: 32-bit integer pixels outside the 16-bit range "
                         f"[{a.min()}, {a.max()}]")
    if mode == "F":
        return pixels_from_array(a, max_pixels=a.size, name=name)
    return a.astype(np.float32) / np.float32(65535.0)  # I;16 variants and in-range I


def _open_pillow(data: bytes, name: str, max_pixels: int) -> Any:
    """Open (header only) with the geometry and page checks; the caller closes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error at
        # twice that) runs first; ours below refuses from the header, before decoding.
        # warnings.catch_warnings is not thread-safe, so Pillow's warning is left alone.
        im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a recognised image (PNG, JPEG, BMP, TIFF, DICOM "
                         "or .npy), or its header is corrupt") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: corrupt image header ({e})") from None
    try:
        w, h = im.size
        _check_geometry(h, w, max_pixels, name)
        if getattr(im, "n_frames", 1) > 1:
            raise InputError(f"{name}: multi-page image ({im.n_frames} frames); give one image per file")
    except BaseException:
        im.close()
        raise
    return im


def _pil_to_float(im: Any, name: str) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.float32) / np.float32(65535.0)
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"{name}: 32-bit integer pixels outside the 16-bit range "
                             f"[{a.min()}, {a.max()}]")
        return a.astype(np.float32) / np.float32(65535.0)
    if mode == "F":
        return pixels_from_array(np.asarray(im), name=name)
    if mode == "1":
        return np.asarray(im).astype(np.float32)
    if mode == "L":
        return np.asarray(im).astype(np.float32) / np.float32(255.0)
    if mode == "RGB":
        return np.asarray(im).astype(np.float32) / np.float32(255.0)
    if mode == "LA":
        return pixels_from_array(np.asarray(im), name=name)
    if mode in ("P", "PA", "RGBA", "RGBa", "La") or "A" in im.getbands():
        return pixels_from_array(np.asarray(im.convert("RGBA")), name=name)
    try:  # CMYK, YCbCr, LAB, HSV ...
        return np.asarray(im.convert("RGB")).astype(np.float32) / np.float32(255.0)
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: unsupported image mode {mode!r} ({e})") from None
