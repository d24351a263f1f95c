"""Raw pixels and the guards every input passes: `InputError`, the pixel and aspect limits,
printable names for records, and `pixels_from_array` (raw arrays to float32 in [0, 1]).
"""
from __future__ import annotations

import os

import numpy as np

#: default decompression-bomb limit (pixels per image, read from the header)
MAX_PIXELS: int = 64_000_000
#: longest side / shortest side beyond which an input is refused as absurd
MAX_ASPECT: float = 32.0


class InputError(ValueError):
    """One input could not be used; the message names the input and the cause."""


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


def _check_geometry(h: int, w: int, max_pixels: int, name: str) -> None:
    if h <= 0 or w <= 0:
        raise InputError(f"{name}: image has zero size ({h} x {w})")
    if h * w > max_pixels:
        raise InputError(f"{name}: image is {h} x {w} = {h * w} pixels, over the "
                         f"{max_pixels}-pixel limit (decompression-bomb guard)")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise InputError(f"{name}: absurd aspect ratio {h} x {w} (more than {MAX_ASPECT:g}:1)")
