"""Input side of the gatekeeper: decode files and arrays, preprocess per spec, stream datasets.

Every failure of one input becomes an `InputError` (or a `LoadedImage` with `error` set
when going through `load_images` / `iter_batches`); the other inputs of the call go on.

Decoding (`decode_image`) gives float32 `(H, W)` gray or `(H, W, 3)` RGB in [0, 1]:

- PNG / JPEG / BMP / TIFF via Pillow (only these formats are tried, so a renamed EPS
  never reaches Ghostscript). 8-bit and 16-bit gray (`I;16`, `I;16B`, and `I` whose
  values fit 16 bits) scale by 255 / 65535; bilevel `1` is 0/1; palette `P` is
  expanded through its palette; RGBA / LA are **composited onto black** (a
  transparent pixel is "no signal", the background of a radiograph); CMYK / YCbCr
  convert to RGB; 32-bit float `F` must already lie in [0, 1]. 16-bit RGB PNGs are
  reduced to 8 bits by Pillow. EXIF orientation is applied. Multi-page files are refused.
- DICOM via pydicom (sniffed by `DICM` at byte 128, or a `.dcm` / `.dicom` suffix):
  the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the
  first VOI LUT or window (Window Center/Width) when present, mapped to [0, 1] over
  the window's output range, else a min-max stretch; MONOCHROME1 is inverted so
  bright = dense everywhere. RGB, YBR_FULL(_422) (pydicom converts to RGB) and
  PALETTE COLOR with its LUT are accepted; other photometry, multi-frame data (which
  frame a gate should judge is not ours to guess), and a compressed transfer syntax
  whose decoder plugin is missing are refused with the reason.
- `.npy` files (loaded with `allow_pickle=False`) hold raw pixels, read like
  `pixels_from_array`.

Guards, all `InputError`: more than `max_pixels` pixels (default `MAX_PIXELS`, checked
from the header before any pixel is decoded), a file over `MAX_FILE_BYTES`, zero size,
empty / truncated / corrupt files, NaN or inf, and an aspect ratio beyond `MAX_ASPECT`.

Preprocessing (`preprocess`): resize to `spec.size` with Pillow's BILINEAR filter
(a triangle kernel widened by the reduction factor, so downsampling is antialiased:
every source pixel contributes), done as two matrix products per batch of equal-sized
images; gray -> RGB by replication, RGB -> gray by ITU-R BT.601 luma
(0.299 R + 0.587 G + 0.114 B); then `(x - mean) / std` per channel.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .spec import ModelSpec

__all__ = [
    "IMAGE_SUFFIXES", "MAX_ASPECT", "MAX_FILE_BYTES", "MAX_PIXELS",
    "DatasetError", "InputError", "LoadedImage",
    "count_inputs", "decode_image", "iter_batches", "labelled_dataset", "load_images",
    "pixels_from_array", "preprocess", "safe_name", "save_dataset",
]

#: file suffixes (lower case) that folder expansion and dataset listing pick up;
#: suffix-less files in a folder are picked up too when they carry the DICOM magic
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".npy"})
#: default decompression-bomb limit (pixels per image, read from the header)
MAX_PIXELS: int = 64_000_000
#: longest side / shortest side beyond which an input is refused as absurd
MAX_ASPECT: float = 32.0
#: files larger than this are refused before being read
MAX_FILE_BYTES: int = 1 << 30

_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NPY_MAGIC = b"\x93NUMPY"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class InputError(ValueError):
    """One input could not be used; the message names the input and the cause."""


class DatasetError(ValueError):
    """A labelled data folder or CSV manifest is malformed; the message says where."""


@dataclass
class LoadedImage:
    """One input after loading: preprocessed pixels, or the reason it failed.

    `pixels` is float32 `(C, H, W)` for the spec (None on error); `digest` is
    `"sha256:<hex>"` of the file's bytes, or of the raw array bytes for array inputs
    (None when the file could not be read at all).
    """

    source: str
    pixels: np.ndarray | None
    digest: str | None
    error: str | None
    label: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one file to float32 `(H, W)` gray or `(H, W, 3)` RGB in [0, 1].

    Raises `InputError` naming the file and the cause (see the module docstring for
    formats and guards).
    """
    path = Path(os.fsdecode(path))
    data = _read_bytes(path)
    return _decode_bytes(data, path, max_pixels, safe_name(path))


def safe_name(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path as valid, printable UTF-8 text for records, JSON and the log.

    File names on Linux are bytes; those that are not UTF-8 reach Python as lone
    surrogates (PEP 383), which JSON encoders and Arrow refuse. Each such byte is
    shown as a visible `\\xNN` escape instead (b"\\xff.png" -> "\\xff.png").
    """
    s = os.fsdecode(path)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes (a str from elsewhere)
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def count_inputs(inputs: Sequence[str | Path | np.ndarray] | np.ndarray) -> int:
    """How many records `load_images` / `iter_batches` will yield for `inputs`.

    Folders are listed (names and file types only, no image is opened; suffix-less
    files are sniffed for the DICOM magic), so a progress bar can show a true total.
    """
    if isinstance(inputs, np.ndarray):
        return len(inputs) if inputs.ndim in (3, 4) else 0
    return sum(1 for _ in _expand(inputs, None))


def pixels_from_array(a: np.ndarray, *, max_pixels: int = MAX_PIXELS,
                      name: str = "array") -> np.ndarray:
    """Raw pixels `(H, W)` / `(H, W, 1|2|3|4)` -> float32 `(H, W)` or `(H, W, 3)` in [0, 1].

    uint8 / 255, uint16 / 65535, bool as 0/1, float must already lie in [0, 1].
    2 and 4 channels are gray+alpha / RGBA, composited onto black. Other dtypes,
    NaN/inf, out-of-range floats and bad shapes raise `InputError`.
    """
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise InputError(f"{name}: expected pixels (H, W) or (H, W, 1|2|3|4), got shape {a.shape}")
    _check_geometry(a.shape[0], a.shape[1], max_pixels, name)
    if a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif a.dtype == np.uint8:
        x = a.astype(np.float32) / np.float32(255.0)
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / np.float32(65535.0)
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{name}: pixels contain NaN or infinity")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{name}: float pixels must lie in [0, 1], got range "
                             f"[{lo:.4g}, {hi:.4g}] (scale them first)")
    else:
        raise InputError(f"{name}: unsupported pixel dtype {a.dtype} "
                         "(give uint8, uint16, bool, or float in [0, 1])")
    if x.ndim == 3:
        if x.shape[-1] == 2:
            x = x[..., 0] * x[..., 1]
        elif x.shape[-1] == 4:
            x = x[..., :3] * x[..., 3:4]
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Decoded images `(H, W)` / `(H, W, 1|3)` float in [0, 1] -> float32 `(N, C, H, W)`.

    Resized to `spec.size` (Pillow-BILINEAR, antialiased when shrinking), converted
    to `spec.channels` (replicate gray, or BT.601 luma), then `(x - mean) / std`.
    Images of equal shape are resized together in one pair of matrix products.
    """
    h, w = spec.size
    c = spec.channels
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    chw = [_to_channels(np.asarray(img, dtype=np.float32), c, i) for i, img in enumerate(images)]
    for i, x in enumerate(chw):
        groups.setdefault(x.shape, []).append(i)
    for shape, idx in groups.items():
        batch = np.stack([chw[i] for i in idx])
        rh = _bilinear_matrix(shape[1], h)
        rw = _bilinear_matrix(shape[2], w)
        # einsum(optimize) picks the cheaper order of the two matmuls; gray images
        # are resized once and broadcast to 3 channels on assignment
        out[idx] = np.einsum("oh,nchw,pw->ncop", rh, batch, rw, optimize=True)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    out -= mean
    out /= std
    return out


def load_images(inputs: Sequence[str | Path | np.ndarray] | np.ndarray, spec: ModelSpec, *,
                workers: int = 2, labels: Sequence[int | None] | None = None,
                max_pixels: int = MAX_PIXELS) -> list[LoadedImage]:
    """Decode and preprocess inputs; one `LoadedImage` per image, in order.

    `inputs` is a sequence of files and folders (folders expand recursively to
    image files, sorted) - an element may also be one raw pixel array - or one
    array `(N, H, W)` / `(N, H, W, C)` of raw pixels (sources `"array[i]"`).
    `labels`, when given, align with `inputs` (a folder's files share its label).
    A failing input is a record with `error` set; the rest goes on. Decoding runs
    on a pool of `workers` threads (Pillow, pydicom and numpy release the GIL in
    their heavy parts).
    """
    items = list(_expand(inputs, labels))
    if workers <= 1 or len(items) <= 1:
        return [_load_one(it, spec, max_pixels) for it in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda it: _load_one(it, spec, max_pixels), items))


def iter_batches(inputs: Sequence[str | Path | np.ndarray] | np.ndarray, spec: ModelSpec,
                 batch_size: int = 64, *, workers: int = 2,
                 labels: Sequence[int | None] | None = None,
                 max_pixels: int = MAX_PIXELS,
                 ) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
    """Stream inputs in chunks: yields (records of the chunk, float32 `(n_ok, C, H, W)`).

    The array stacks the ok records' pixels in record order. Folders are walked
    lazily and at most two chunks are in memory (the next one decodes while the
    caller works on the current), so a 100k-file folder streams in constant memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(inputs, np.ndarray):
        yield from _array_batches(inputs, spec, batch_size, labels, max_pixels)
        return
    items = _expand(inputs, labels)
    c, (h, w) = spec.channels, spec.size
    if workers <= 1:  # inline: no thread pool to start and wake for a small call
        yield from _inline_batches(items, spec, batch_size, max_pixels)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit() -> list[Future[LoadedImage]]:
            chunk = []
            for it in items:
                chunk.append(pool.submit(_load_one, it, spec, max_pixels))
                if len(chunk) == batch_size:
                    break
            return chunk

        pending: list[Future[LoadedImage]] = []
        following: list[Future[LoadedImage]] = []
        try:
            pending = submit()
            while pending:
                following = submit()  # decode ahead while the caller uses this chunk
                records = [f.result() for f in pending]
                yield records, _stack(records, c, h, w)
                pending, following = following, []
        finally:
            # a consumer that stops early should not wait for a chunk it will never see
            for f in pending + following:
                f.cancel()


def _inline_batches(items: Iterable[Any], spec: ModelSpec, batch_size: int, max_pixels: int,
                    ) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
    """`iter_batches` decoding on the calling thread, chunk by chunk."""
    c, (h, w) = spec.channels, spec.size
    records: list[LoadedImage] = []
    for it in items:
        records.append(_load_one(it, spec, max_pixels))
        if len(records) == batch_size:
            yield records, _stack(records, c, h, w)
            records = []
    if records:
        yield records, _stack(records, c, h, w)


def _stack(records: list[LoadedImage], c: int, h: int, w: int) -> np.ndarray:
    ok = [r.pixels for r in records if r.pixels is not None]
    return np.stack(ok) if ok else np.empty((0, c, h, w), dtype=np.float32)


def _array_batches(inputs: np.ndarray, spec: ModelSpec, batch_size: int,
                   labels: Sequence[int | None] | None, max_pixels: int,
                   ) -> Iterator[tuple[list[LoadedImage], np.ndarray]]:
    """`iter_batches` for one in-memory array: pixels are already decoded, so each chunk
    is checked per image and preprocessed in one vectorised call, with no thread pool."""
    c, (h, w) = spec.channels, spec.size
    items = list(_expand(inputs, labels))  # validates the shape and the labels
    for start in range(0, len(items), batch_size):
        records: list[LoadedImage] = []
        ok: list[np.ndarray] = []
        for source, obj, label, _ in items[start:start + batch_size]:
            digest = "sha256:" + hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
            try:
                ok.append(pixels_from_array(obj, max_pixels=max_pixels, name=source))
                records.append(LoadedImage(source, None, digest, None, label))
            except InputError as e:
                records.append(LoadedImage(source, None, digest, str(e), label))
        batch = preprocess(ok, spec) if ok else np.empty((0, c, h, w), dtype=np.float32)
        good = (r for r in records if r.error is None)
        for r, px in zip(good, batch):
            r.pixels = px
        yield records, batch


def labelled_dataset(source: str | Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """List a labelled data set as (path, class index) pairs, sorted within each class.

    `source` is a folder `DIR/<class name>/<images>` (images found recursively; every
    class folder must name one of `classes`) or a CSV manifest with header
    `path,label` (paths relative to the CSV; label a class name or an index).
    Files are not opened here: an unreadable one fails later, as its own record.
    Raises `DatasetError` for an unknown class, a missing source, or no images.
    """
    source = Path(source)
    classes = [str(c) for c in classes]
    if not source.exists():
        raise DatasetError(f"data source not found: {source}")
    if source.is_file():
        return _dataset_from_csv(source, classes)
    return _dataset_from_folder(source, classes)


def save_dataset(images: np.ndarray, labels: Sequence[int] | np.ndarray,
                 classes: Sequence[str], folder: str | Path) -> list[Path]:
    """Write images as `folder/<class>/<i>.png` (i zero-padded, so names sort in order).

    `images` is uint8 or uint16 `(N, H, W)` (or `(N, H, W, 3)` uint8); labels index
    `classes`. Returns the written paths in input order.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim not in (3, 4) or images.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"images must be uint8/uint16 (N, H, W[, 3]), got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    from PIL import Image

    folder = Path(folder)
    width = max(5, len(str(max(len(images) - 1, 0))))
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        if not 0 <= int(lab) < len(classes):
            raise ValueError(f"label {int(lab)} of image {i} is not a class index (0..{len(classes) - 1})")
        d = folder / str(classes[int(lab)])
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:0{width}d}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- loading helpers

# one unit of work: (source name, path or array, label)
_Item = tuple[str, "Path | np.ndarray | None", "int | None", "str | None"]


def _expand(inputs: Any, labels: Sequence[int | None] | None) -> Iterator[_Item]:
    """Yield (source, path-or-array, label, error) lazily; folders walked in sorted order."""
    if isinstance(inputs, np.ndarray):
        if inputs.ndim not in (3, 4):
            raise InputError(f"an input array must be (N, H, W) or (N, H, W, C), got shape {inputs.shape}")
        if labels is not None and len(labels) != len(inputs):
            raise ValueError(f"{len(inputs)} images but {len(labels)} labels")
        for i in range(len(inputs)):
            yield f"array[{i}]", inputs[i], None if labels is None else labels[i], None
        return
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path given bare; never iterate a string's characters
    inputs = list(inputs)
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    for i, inp in enumerate(inputs):
        label = None if labels is None else labels[i]
        if isinstance(inp, np.ndarray):
            yield f"array[{i}]", inp, label, None
            continue
        path = Path(os.fsdecode(inp))
        name = safe_name(path)
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            is_dir = False  # reading it fails later with the reason, as this input's record
        if is_dir:
            found = False
            for f, error in _walk_images(path):
                found = True
                yield safe_name(f), f, label, error
            if not found:
                yield name, None, label, f"{name}: folder holds no image files ({_suffix_list()})"
        else:
            yield name, path, label, None


def _walk_images(folder: Path, _seen: set[tuple[int, int]] | None = None,
                 ) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for image files under `folder`, recursively, in sorted path order,
    and (path, reason) for each entry that cannot be used; hidden entries skipped.

    Lazy (one directory listing at a time). Links are followed, but each real folder
    is walked once (by device and inode), so a link loop ends as one record. A link
    loop, a dangling link, an unreadable folder or a special file (FIFO, device,
    socket) is a record of its own and the rest of the folder goes on; regular files
    without an image suffix (notes, CSVs) are not images and are passed over.
    """
    seen = set() if _seen is None else _seen
    name = safe_name(folder)
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            yield folder, f"{name}: link to a folder already walked (a link loop); not walked again"
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield folder, f"{name}: cannot list folder ({e.strerror or e})"
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        p = Path(e.path)
        try:
            mode = os.stat(p).st_mode  # follows links: a loop or a dangling one raises here
        except OSError as err:
            yield p, f"{safe_name(p)}: {_link_problem(err)}"
            continue
        if stat.S_ISDIR(mode):
            yield from _walk_images(p, seen)
        elif not stat.S_ISREG(mode):
            yield p, f"{safe_name(p)}: is a {_file_kind(mode)}, not a regular file"
        else:
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix == "" and _has_dicom_magic(p)):
                yield p, None


def _link_problem(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if err.errno == errno.ENOENT:
        return "dangling symbolic link (its target does not exist)"
    return f"cannot stat entry ({err.strerror or err})"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _load_one(item: _Item, spec: ModelSpec, max_pixels: int) -> LoadedImage:
    source, obj, label, error = item
    if error is not None:
        return LoadedImage(source, None, None, error, label)
    digest = None
    try:
        if isinstance(obj, np.ndarray):
            digest = "sha256:" + hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
            img = pixels_from_array(obj, max_pixels=max_pixels, name=source)
        else:
            assert obj is not None
            data = _read_bytes(obj, source)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            # a large Pillow image comes back already resized, strip by strip from its
            # 8/16-bit pixels, with no full-size float copy (0.8 GB each at 64 Mpx RGB)
            img, done = _decode_bytes_for_spec(data, obj, max_pixels, source, spec)
            del data
            if done:
                return LoadedImage(source, img, digest, None, label)
        # preprocessed here, one by one, so only spec-sized pixels outlive the worker:
        # a batch of full-resolution radiographs never sits in memory at once
        pixels = preprocess([img], spec)[0]
    except InputError as e:
        return LoadedImage(source, None, digest, safe_name(str(e)), label)
    except Exception as e:  # noqa: BLE001 - any decoder failure is this input's error, not the batch's
        return LoadedImage(source, None, digest, safe_name(f"{source}: {type(e).__name__}: {e}"),
                           label)
    return LoadedImage(source, pixels, digest, None, label)


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


def _has_dicom_magic(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb", buffering=0, closefd=True) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _suffix_list() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


# ---------------------------------------------------------------- decoders

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
    rh, rw = _bilinear_matrix(height, h), _bilinear_matrix(width, w)
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
        acc += rh[:, y0:y1] @ (x @ rw.T)  # (h, s) @ (k, s, w) -> (k, h, w)
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


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError(f"{name}: DICOM file has no pixel data (or is not DICOM)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometry = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError(f"{name}: DICOM image attributes missing or invalid ({e})") from None
    _check_geometry(rows, cols, max_pixels, name)
    if frames > 1:
        raise InputError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; "
                         "export the frame to be judged as its own file")
    if photometry not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                          "PALETTE COLOR"):
        raise InputError(f"{name}: unsupported DICOM photometric interpretation {photometry!r} "
                         "(supported: MONOCHROME1/2, RGB, YBR_FULL(_422), PALETTE COLOR)")
    if photometry == "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" not in ds:
        raise InputError(f"{name}: PALETTE COLOR DICOM without its colour lookup table")
    missing = _require_decoder(ds, name)
    try:
        arr = ds.pixel_array  # pydicom converts YBR_FULL(_422) to RGB here
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        msg = " ".join(str(e).split())
        hint = f"; plugins not installed: {'; '.join(missing)}" if missing else ""
        raise InputError(f"{name}: cannot decode DICOM pixel data ({msg}){hint}") from None
    if arr.shape[:2] != (rows, cols):
        raise InputError(f"{name}: decoded DICOM pixels have shape {arr.shape}, expected ({rows}, {cols})")
    try:
        if photometry in ("MONOCHROME1", "MONOCHROME2"):
            out = _dicom_gray(arr, ds)
            if photometry == "MONOCHROME1":
                out = 1.0 - out  # MONOCHROME1: low values are bright
        elif photometry == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            out = apply_color_lut(arr, ds).astype(np.float64) / (2.0 ** bits - 1.0)
        else:
            out = arr.astype(np.float64) / (2.0 ** int(ds.BitsStored) - 1.0)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT/window attributes
        raise InputError(f"{name}: cannot apply DICOM value transforms ({type(e).__name__}: {e})") from None
    if not np.isfinite(out).all():
        raise InputError(f"{name}: DICOM pixels contain NaN or infinity")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _require_decoder(ds: Any, name: str) -> list[str]:
    """Refuse a compressed transfer syntax no installed plugin can decode, naming the plugins.

    Returns the plugins that are missing though another one is available (a hint
    for when the available one then fails, e.g. Pillow on 12-bit JPEG).
    """
    try:
        from pydicom.pixels.decoders.base import get_decoder

        tsyntax = ds.file_meta.TransferSyntaxUID
    except AttributeError:
        return []  # no file meta: pydicom assumes a native syntax, and fails clearly if not
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise InputError(f"{name}: DICOM transfer syntax {tsyntax.name} ({tsyntax}) "
                         "has no pixel data decoder in pydicom") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise InputError(f"{name}: no decoder plugin installed for DICOM transfer syntax "
                         f"{tsyntax.name} ({tsyntax}); install one of: {needs}")
    return list(decoder.missing_dependencies)


def _dicom_gray(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT, then the first VOI LUT / window mapped to [0, 1], else min-max."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    x = apply_modality_lut(arr, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        return apply_voi_lut(x, ds, index=0, prefer_lut=True).astype(np.float64) / (2.0 ** bits - 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        y_min, y_max = _window_output_range(ds)
        y = apply_voi_lut(x, ds, index=0, prefer_lut=False).astype(np.float64)
        return (y - y_min) / (y_max - y_min)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)  # a constant slice carries no contrast to stretch
    return (x - lo) / (hi - lo)


def _window_output_range(ds: Any) -> tuple[float, float]:
    """The range pydicom's windowing maps onto (PS3.3 C.11.2.1.2), to undo it into [0, 1]."""
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1.0
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, 2.0 ** int(ds.BitsStored) - 1.0
    else:
        y_min, y_max = -(2.0 ** (int(ds.BitsStored) - 1)), 2.0 ** (int(ds.BitsStored) - 1) - 1.0
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def _check_geometry(h: int, w: int, max_pixels: int, name: str) -> None:
    if h <= 0 or w <= 0:
        raise InputError(f"{name}: image has zero size ({h} x {w})")
    if h * w > max_pixels:
        raise InputError(f"{name}: image is {h} x {w} = {h * w} pixels, over the "
                         f"{max_pixels}-pixel limit (decompression-bomb guard)")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise InputError(f"{name}: absurd aspect ratio {h} x {w} (more than {MAX_ASPECT:g}:1)")


# ---------------------------------------------------------------- preprocessing helpers

def _to_channels(x: np.ndarray, c: int, i: int) -> np.ndarray:
    """(H, W) / (H, W, 1|3) -> (1 or c, H, W) float32, before resizing (both steps are linear).

    RGB -> gray happens here (resizing 1 channel, not 3); gray stays one channel and
    is replicated after resizing, for the same reason.
    """
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3 and x.shape[-1] == 3:
        if c == 1:
            return np.tensordot(x, _LUMA, axes=([2], [0]))[None].astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))
    raise ValueError(f"image {i}: expected (H, W) or (H, W, 1|3), got shape {x.shape}")


@lru_cache(maxsize=64)
def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of Pillow's BILINEAR resample (Resample.c precompute_coeffs).

    A triangle kernel of support max(src/dst, 1): plain bilinear when enlarging,
    antialiased (every source pixel weighs in) when shrinking; rows sum to 1.
    """
    scale = src / dst
    fscale = max(scale, 1.0)
    support = fscale
    m = np.zeros((dst, src), dtype=np.float64)
    for o in range(dst):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), src)
        xs = np.arange(lo, hi)
        wts = np.maximum(0.0, 1.0 - np.abs((xs - center + 0.5) / fscale))
        total = wts.sum()
        if total > 0:
            m[o, lo:hi] = wts / total
    m.setflags(write=False)
    return m.astype(np.float32)


# ---------------------------------------------------------------- dataset helpers

def _dataset_from_folder(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    index = {c: i for i, c in enumerate(classes)}
    out: list[tuple[Path, int]] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [d.name for d in subdirs if d.name not in index]
    if unknown:
        raise DatasetError(f"{root}: folder(s) {unknown} are not classes of the model "
                           f"(known classes: {classes})")
    loose = [p.name for p in root.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DatasetError(f"{root}: image files must sit in a class folder "
                           f"DIR/<class>/, found {sorted(loose)[:5]} at the top level")
    for d in sorted(subdirs, key=lambda p: index[p.name]):
        out.extend((p, index[d.name]) for p, _ in _walk_images(d))
    if not out:
        raise DatasetError(f"{root}: no image files found in class folders "
                           f"(expected DIR/<class>/<images> with classes {classes}; "
                           f"image suffixes: {_suffix_list()})")
    return out


def _dataset_from_csv(manifest: Path, classes: list[str]) -> list[tuple[Path, int]]:
    index = {c: i for i, c in enumerate(classes)}
    out: list[tuple[Path, int]] = []
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in reader.fieldnames or []]
            if fields[:2] != ["path", "label"] and set(fields) != {"path", "label"}:
                raise DatasetError(f"{manifest}: a manifest needs the header 'path,label', got {fields}")
            reader.fieldnames = fields
            for lineno, row in enumerate(reader, start=2):
                out.append((_manifest_path(manifest, row, lineno),
                            _manifest_label(manifest, row, lineno, index, classes)))
    except UnicodeDecodeError:
        raise DatasetError(f"{manifest}: not a UTF-8 CSV manifest (expected a folder or a "
                           "CSV with header 'path,label')") from None
    if not out:
        raise DatasetError(f"{manifest}: manifest lists no images")
    return out


def _manifest_path(manifest: Path, row: dict[str, Any], lineno: int) -> Path:
    raw = (row.get("path") or "").strip()
    if not raw:
        raise DatasetError(f"{manifest}:{lineno}: empty path")
    p = Path(raw)
    return p if p.is_absolute() else manifest.parent / p


def _manifest_label(manifest: Path, row: dict[str, Any], lineno: int,
                    index: dict[str, int], classes: list[str]) -> int:
    raw = (row.get("label") or "").strip()
    if raw in index:
        return index[raw]
    if raw.lstrip("-").isdigit():
        k = int(raw)
        if 0 <= k < len(classes):
            return k
        raise DatasetError(f"{manifest}:{lineno}: label index {k} out of range 0..{len(classes) - 1}")
    raise DatasetError(f"{manifest}:{lineno}: unknown label {raw!r} (known classes: {classes})")
