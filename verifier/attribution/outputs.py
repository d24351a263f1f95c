"""Files `verifier explain` writes: raw maps (.npy), overlay PNGs and the explain.json manifest.

Every file goes to a temporary name and is renamed into place; a directory is written
only when it is new, empty, or holds a manifest this tool wrote.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from verifier.attribution.scorecam import _align_corners_matrix

__all__ = ["OutputDir", "overlay_rgb", "MANIFEST", "FORMAT", "FORMAT_VERSION"]

MANIFEST = "explain.json"
FORMAT = "verifier-explain"
FORMAT_VERSION = 1

# colour ramps (position, RGB): an inferno-like ramp for maps >= 0, blue-white-red for signed
_HEAT = np.array([[0.0, 0, 0, 4], [0.25, 87, 16, 110], [0.5, 188, 55, 84],
                  [0.75, 249, 142, 9], [1.0, 252, 255, 164]], dtype=np.float64)
_DIVERGING = np.array([[0.0, 33, 102, 172], [0.5, 247, 247, 247], [1.0, 178, 24, 43]],
                      dtype=np.float64)


class OutputDir:
    """The --out directory: refuses to write into a folder another tool filled."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            if not self.path.is_dir():
                raise ValueError(f"--out {self.path} exists and is not a directory")
            if any(self.path.iterdir()) and not _ours(self.path / MANIFEST):
                raise ValueError(f"--out {self.path} is not empty and was not written by "
                                 f"'verifier explain' (no {MANIFEST}); choose a new folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self._names: set[str] = set()

    def unique(self, source: str) -> str:
        """A file-name stem for an input, unique within this run."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem or "input")[:80] or "input"
        name, i = stem, 2
        while name in self._names:
            name, i = f"{stem}-{i}", i + 1
        self._names.add(name)
        return name

    def write_npy(self, name: str, array: np.ndarray) -> str:
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        return self._write(name, buf.getvalue())

    def write_png(self, name: str, rgb: np.ndarray) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
        return self._write(name, buf.getvalue())

    def write_manifest(self, content: dict[str, Any]) -> str:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **content,
                "files": sorted(self.files)}
        return self._write(MANIFEST, (json.dumps(body, indent=2) + "\n").encode("utf-8"),
                           listed=False)

    def _write(self, name: str, data: bytes, listed: bool = True) -> str:
        final = self.path / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(final)
        if listed:
            self.files.append(name)
        return name


def overlay_rgb(image: np.ndarray, amap: np.ndarray, signed: bool) -> np.ndarray:
    """(H, W, 3) uint8: the gray image (H, W) in [0, 1] under the map (h, w) upsampled to it.

    Unsigned maps use a heat ramp scaled to [0, max]; signed maps a blue-white-red ramp
    symmetric about 0; opacity follows |map| so low values leave the image visible.
    """
    hh, ww = image.shape
    m = np.asarray(amap, dtype=np.float64)
    if m.shape != (hh, ww):
        m = _align_corners_matrix(m.shape[0], hh) @ m @ _align_corners_matrix(m.shape[1], ww).T
    peak = float(np.abs(m).max())
    if signed:
        pos = 0.5 + 0.5 * m / peak if peak > 0 else np.full_like(m, 0.5)
        colour, alpha = _ramp(_DIVERGING, pos), np.abs(m) / peak if peak > 0 else 0 * m
    else:
        pos = np.clip(m / peak, 0, 1) if peak > 0 else np.zeros_like(m)
        colour, alpha = _ramp(_HEAT, pos), pos
    a = 0.65 * alpha[..., None]
    gray = np.clip(image, 0, 1)[..., None] * 255.0
    return np.clip((1 - a) * gray + a * colour, 0, 255).astype(np.uint8)


def _ramp(stops: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(pos, stops[:, 0], stops[:, k]) for k in (1, 2, 3)], axis=-1)


def _ours(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
