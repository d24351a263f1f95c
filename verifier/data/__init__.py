"""Input side of the gatekeeper: decode files and arrays, preprocess per spec, stream datasets.

This module re-exports the public names; the code lives in `verifier.data.pixels` (InputError,
limits, raw arrays), `verifier.data.decode` (file reads, Pillow, .npy), `verifier.data.dicom`,
`verifier.data.preprocess`, `verifier.data.folders` (labelled folders, CSV manifests, folder
walk) and `verifier.data.stream` (`load_images`, `iter_batches`). Patch internals there.

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

from verifier.data.decode import MAX_FILE_BYTES, decode_image
from verifier.data.folders import (IMAGE_SUFFIXES, DatasetError, labelled_dataset, manifest_paths,
                                   save_dataset)
from verifier.data.pixels import MAX_ASPECT, MAX_PIXELS, InputError, pixels_from_array, safe_name
from verifier.data.preprocess import preprocess
from verifier.data.stream import (EncodedImage, InputItem, LoadedImage, count_inputs, expand_inputs,
                                  iter_batches, load_images)

__all__ = [
    "IMAGE_SUFFIXES", "MAX_ASPECT", "MAX_FILE_BYTES", "MAX_PIXELS",
    "DatasetError", "EncodedImage", "InputError", "InputItem", "LoadedImage",
    "count_inputs", "decode_image", "expand_inputs", "iter_batches", "labelled_dataset",
    "load_images", "manifest_paths", "pixels_from_array", "preprocess", "safe_name",
    "save_dataset",
]
