"""Labelled data on disk: class folders, CSV manifests and `save_dataset`, and the sorted folder
walk that yields image files plus one error record per unusable entry.
"""
from __future__ import annotations

import csv
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verifier.data.decode import _file_kind
from verifier.data.pixels import safe_name

#: file suffixes (lower case) that folder expansion and dataset listing pick up;
#: suffix-less files in a folder are picked up too when they carry the DICOM magic
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".npy"})


class DatasetError(ValueError):
    """A labelled data folder or CSV manifest is malformed; the message says where."""


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


def manifest_paths(manifest: str | Path, batch_rows: int = 65536) -> Iterator[Path]:
    """The image paths a manifest lists, streamed in order: a CSV with a `path` column
    (header row; other columns such as `label` are ignored) or a Parquet file with a string
    `path` column, read `batch_rows` rows at a time. Relative paths are relative to the
    manifest's folder. Raises `DatasetError` for a missing column or an empty path."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatasetError(f"manifest not found: {manifest}")
    if manifest.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(manifest)
        if "path" not in pf.schema_arrow.names:
            raise DatasetError(f"{manifest}: a Parquet manifest needs a 'path' column, "
                               f"got {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["path"]):
            for raw in batch.column(0).to_pylist():
                row += 1
                yield _manifest_path(manifest, {"path": raw or ""}, row)
        return
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            if "path" not in reader.fieldnames:
                raise DatasetError(f"{manifest}: a CSV manifest needs a 'path' column in its "
                                   f"header, got {reader.fieldnames}")
            for lineno, row_ in enumerate(reader, start=2):
                yield _manifest_path(manifest, row_, lineno)
    except UnicodeDecodeError:
        raise DatasetError(f"{manifest}: not a UTF-8 CSV manifest") from None


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
