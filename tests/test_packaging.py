"""Every runtime import of the package is declared in pyproject.toml (issue 10, finding 3).

Imports are read with `ast` from the source; each third-party module is mapped to the
distribution that installs it (importlib.metadata) and must be a declared dependency,
or an optional extra's dependency imported lazily with a clear message.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("verifier", "reference_maps", "calibration")
#: extras a plain install lacks: imported only inside functions, with an install hint
OPTIONAL = {"mlxtend": "demo", "cryptography": "sign", "ray": "ray"}
#: used only when already installed (colormaps beyond the built-in ones), imported lazily
WHEN_PRESENT = {"matplotlib"}


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """{top-level module: [(file, imported at module level?)]} of third-party imports."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text(encoding="utf-8"))
            top = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    name = m.split(".")[0]
                    if name in sys.stdlib_module_names or name in PACKAGES or name == "__future__":
                        continue
                    found.setdefault(name, []).append((str(f.relative_to(ROOT)), id(node) in top))
    return found


def test_every_runtime_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib
    required = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    dists = md.packages_distributions()
    missing = []
    for module, where in sorted(_imports().items()):
        providers = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if providers & required:
            continue
        extra = OPTIONAL.get(module)
        if module in WHEN_PRESENT:
            assert not any(top for _, top in where), f"{module} imported at module level: {where}"
            continue
        if extra and providers & extras.get(extra, set()):
            assert not any(top for _, top in where), f"{module} (extra {extra}) imported at module level: {where}"
            continue
        missing.append(f"{module} ({', '.join(sorted(providers))}) in {where[0][0]}")
    assert not missing, "undeclared runtime imports: " + "; ".join(missing)


def test_the_check_sees_real_imports():
    found = _imports()
    assert {"numpy", "torch", "onnx", "tomli_w", "duckdb", "cryptography"} <= set(found)
    assert all(not top for _, top in found["matplotlib"])  # the reports' own colormaps first
