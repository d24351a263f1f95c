"""The `verifier` command line: `main` dispatches to one module per verb in `commands/`."""
from __future__ import annotations

from verifier.cli.main import main

__all__ = ["main"]
