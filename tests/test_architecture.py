"""The house rules of DESIGN.md ("Layout"), checked on the real import graph:

- the import-linter contracts in `.importlinter` hold (layers down the data flow; the
  framework-free libraries import neither torch, onnxruntime nor verifier);
- no import cycle anywhere in `verifier`, function-level imports included (grimp reads those
  too, so a cycle hidden behind an import inside a function is still found);
- no module over 400 lines without a `# length:` line near its top saying why.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    mods = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in mods:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if not (w == package or w.startswith(package + ".")):
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports (import-linter, the [dev] extra) is not installed"
    run = subprocess.run([exe, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "broken" not in run.stdout.lower().split("contracts:")[-1].replace("0 broken", "")


def test_no_import_cycles():
    graph = grimp.build_graph("verifier")
    # the graph is real: it sees the factory's lazy backend import (an import inside a function)
    assert "verifier.probe.torch_backend" in graph.find_modules_directly_imported_by(
        "verifier.probe.factory")
    assert len(graph.modules) > 60
    assert _cycles(graph, "verifier") == []


def test_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    assert _cycles(g, "p") == [["p.a", "p.b", "p.c"]]


def test_long_modules_say_why():
    long = []
    for path in sorted((ROOT / "verifier").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(x.startswith("# length:") for x in lines[:40]):
            long.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert long == [], "split these modules, or write why at the top with '# length: ...'"
