"""DICOM decoding via pydicom: modality LUT, VOI LUT / window, photometry and decoder plugins,
to float32 `(H, W)` gray or `(H, W, 3)` RGB in [0, 1], or an `InputError` with the reason.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from verifier.data.pixels import InputError, _check_geometry


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
