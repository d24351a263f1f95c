"""Loading inputs for a spec: `load_images` and streaming `iter_batches`, which expand files,
folders and arrays to items and turn each into a `LoadedImage` (pixels or an error).
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verifier.data.decode import MAX_FILE_BYTES, _decode_bytes_for_spec, _read_bytes
from verifier.data.folders import _suffix_list, _walk_images
from verifier.data.pixels import MAX_PIXELS, InputError, _check_geometry, pixels_from_array, safe_name
from verifier.data.preprocess import preprocess, resize
from verifier.spec import ModelSpec


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (an HTTP upload), decoded like a file of that name:
    the same decoders, guards and error records, with no temporary file. `name` (the client's
    file name) names the input; its suffix, or `suffix` when given (e.g. from a Content-Type),
    picks the decoder where the bytes do not say."""

    name: str
    data: bytes
    suffix: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise TypeError(f"EncodedImage.data must be bytes, got {type(self.data).__name__}")


@dataclass(frozen=True)
class InputItem:
    """One input after folder expansion, before decoding: the name records carry (`source`),
    the file (`path`, None for an entry that is only an error), its label and, for an entry
    that cannot be used (a dangling link, an empty folder), the reason. `expand_inputs`
    yields them; `iter_batches` takes them back as inputs, so an engine can list inputs in
    one process and decode them in another with the same records."""

    source: str
    path: Path | None
    label: int | None = None
    error: str | None = None


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


def count_inputs(inputs: Sequence[str | Path | np.ndarray] | np.ndarray) -> int:
    """How many records `load_images` / `iter_batches` will yield for `inputs`.

    Folders are listed (names and file types only, no image is opened; suffix-less
    files are sniffed for the DICOM magic), so a progress bar can show a true total.
    """
    if isinstance(inputs, np.ndarray):
        return len(inputs) if inputs.ndim in (3, 4) else 0
    return sum(1 for _ in _expand(inputs, None))


def expand_inputs(inputs: Sequence[str | Path | InputItem],
                  labels: Sequence[int | None] | None = None) -> Iterator[InputItem]:
    """Files and folders (walked lazily, sorted) as the `InputItem`s `iter_batches` decodes,
    in the same order, one per record it would yield. In-memory inputs are refused: an item
    names a file another process can open."""
    for source, obj, label, error in _expand(inputs, labels):
        if obj is not None and not isinstance(obj, Path):
            raise TypeError(f"{source}: expand_inputs lists files; {type(obj).__name__} "
                            "inputs are decoded where they are")
        yield InputItem(source, obj, label, error)


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
        whole = _whole_chunk(inputs[start:start + batch_size], spec, max_pixels)
        for source, obj, label, _ in items[start:start + batch_size]:
            digest = "sha256:" + hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
            if whole is not None:  # every image of the chunk is valid: converted together below
                records.append(LoadedImage(source, None, digest, None, label))
                continue
            try:
                ok.append(pixels_from_array(obj, max_pixels=max_pixels, name=source))
                records.append(LoadedImage(source, None, digest, None, label))
            except InputError as e:
                records.append(LoadedImage(source, None, digest, str(e), label))
        if whole is not None:
            batch = whole
        else:
            batch = preprocess(ok, spec) if ok else np.empty((0, c, h, w), dtype=np.float32)
        good = (r for r in records if r.error is None)
        for r, px in zip(good, batch):
            r.pixels = px
        yield records, batch


def _whole_chunk(chunk: np.ndarray, spec: ModelSpec, max_pixels: int) -> np.ndarray | None:
    """A chunk (n, H, W[, 1|3]) of uint8 / uint16 pixels preprocessed in one go: bit for bit
    what `pixels_from_array` then `preprocess` give image by image (the same elementwise
    steps in the same order), with three fewer whole-batch copies (a 224 x 224 RGB batch of
    32: 19 MB each). None where the per-image path must judge or convert each image (other
    dtypes, alpha, RGB to gray, a refused size), which then runs as before."""
    x = chunk[..., 0] if chunk.ndim == 4 and chunk.shape[-1] == 1 else chunk
    if len(x) == 0 or x.dtype not in (np.uint8, np.uint16) or not (
            x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3 and spec.channels == 3)):
        return None
    try:
        _check_geometry(x.shape[1], x.shape[2], max_pixels, "array")
    except InputError:
        return None
    f = x.astype(np.float32)
    f /= np.float32(255.0 if x.dtype == np.uint8 else 65535.0)
    f = f[:, None] if x.ndim == 3 else f.transpose(0, 3, 1, 2)  # (n, 1|3, H, W), a view
    out = np.empty((len(x), spec.channels, *spec.size), dtype=np.float32)
    out[:] = resize(f, spec.size)  # the identity at the model's size; gray broadcasts to RGB
    out -= np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    out /= np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return out


_Item = tuple[str, "Path | np.ndarray | EncodedImage | None", "int | None", "str | None"]


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
    if isinstance(inputs, (str, os.PathLike, EncodedImage)):
        inputs = [inputs]  # one path given bare; never iterate a string's characters
    inputs = list(inputs)
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    for i, inp in enumerate(inputs):
        label = None if labels is None else labels[i]
        if isinstance(inp, InputItem):  # listed before (another process): as it was
            yield inp.source, inp.path, inp.label if labels is None else label, inp.error
            continue
        if isinstance(inp, np.ndarray):
            yield f"array[{i}]", inp, label, None
            continue
        if isinstance(inp, EncodedImage):
            yield safe_name(inp.name), inp, label, None
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
            if isinstance(obj, EncodedImage):
                data = _encoded_bytes(obj, source)
                path = Path("upload" + obj.suffix if obj.suffix else safe_name(obj.name) or "upload")
            else:
                data, path = _read_bytes(obj, source), obj
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            # a large Pillow image comes back already resized, strip by strip from its
            # 8/16-bit pixels, with no full-size float copy (0.8 GB each at 64 Mpx RGB)
            img, done = _decode_bytes_for_spec(data, path, max_pixels, source, spec)
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


def _encoded_bytes(img: EncodedImage, name: str) -> bytes:
    """The bytes of an in-memory upload under the same limits a file read has."""
    data = bytes(img.data)
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{name}: file is {len(data)} bytes, over the {MAX_FILE_BYTES}-byte limit")
    if not data:
        raise InputError(f"{name}: file is empty (0 bytes)")
    return data
