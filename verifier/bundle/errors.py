"""The bundle's error type, shared by the directory format and its declarations."""
from __future__ import annotations

__all__ = ["BundleError"]


class BundleError(ValueError):
    """A bundle cannot be loaded or used as asked; the message says why."""
