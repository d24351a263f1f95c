"""The bundle: one directory holding spec, reference store, garbage head and calibration.
`directory` (load, save, checks), `builder` (making one), `declarations` (sealed
compatibility declarations), `integrity` (`verifier verify`), `signing`."""
from __future__ import annotations

from verifier.bundle.directory import Bundle, check_bundle_out
from verifier.bundle.errors import BundleError

__all__ = ["Bundle", "BundleError", "check_bundle_out"]
