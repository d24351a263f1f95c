"""Layering rule: `reference_maps` and `calibration` never import torch, onnxruntime or `verifier`.

Checked twice: by importing every submodule in a fresh interpreter, and by reading the source.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference_maps", "calibration")
FORBIDDEN = ("torch", "onnxruntime", "verifier")

_PROBE = """
import importlib, json, pkgutil, sys
names = []
for pkg in {packages!r}:
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        names.append(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
print(json.dumps({{"imported": names, "forbidden_loaded": bad}}))
"""


def test_fresh_import_loads_no_forbidden_module():
    code = _PROBE.format(packages=PACKAGES, forbidden=FORBIDDEN)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["forbidden_loaded"] == []
    expected = {f"{p}.{f.stem}" for p in PACKAGES for f in (ROOT / p).glob("*.py")
                if f.stem != "__init__"}
    assert expected <= set(result["imported"])  # every submodule was really imported
    assert {"reference_maps.store", "calibration.conformal"} <= set(result["imported"])


def _imports(path: Path) -> list[str]:
    """Top-level module names a file imports (absolute imports only; relative ones stay inside)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_source_has_no_forbidden_import(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(set(_imports(f)) & set(FORBIDDEN)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_source_check_would_catch_an_offender(tmp_path):
    """The AST check sees every import form it claims to (guards against a vacuous pass)."""
    f = tmp_path / "bad.py"
    f.write_text("import os\nimport torch.nn as nn\nfrom verifier.probe.base import Probe\n"
                 "def g():\n    import onnxruntime\n    importlib.import_module('torch')\n"
                 "from . import sibling\n")
    assert set(_imports(f)) == {"os", "torch", "verifier", "onnxruntime"}
