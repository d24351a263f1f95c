"""How the gate turns many scores into one decision: measured power of each rule.

Builds a bundle for a small CNN on real MNIST, then, for the same held-out digits and
real OOD images, compares: the fused score conformalised on its own split ("fusion",
the default), Bonferroni over the 16 per-score p-values, and twice their mean. Prints
a table and writes benchmarks/results/combine_power.json.

    .venv/bin/python benchmarks/combine_power.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration.combine import MERGERS
from verifier.bundle.builder import build_bundle
from verifier.bundle.directory import Bundle
from verifier.data import preprocess
from verifier.examples.datasets import OOD_SOURCES, load_mnist, ood_images
from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier
from verifier.runtime.gatekeeper import Gatekeeper

ALPHA = 0.05


def main() -> int:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    x, y = load_mnist()
    model = train_classifier(SmallCNN(head="gap"), x[:3000], y[:3000], epochs=4, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        build_bundle(mnist_spec(model), (x[:3000], y[:3000]), Path(tmp) / "b",
                     calibration=(x[3000:3600], y[3000:3600]), alpha=ALPHA)
        gate = Gatekeeper(Bundle.load(Path(tmp) / "b", model=model))
    spec = gate.bundle.spec
    sets = {"digits": x[3600:]} | {s: ood_images(s, 300, seed=11) for s in OOD_SOURCES}
    p: dict[str, dict[str, np.ndarray]] = {}
    for name, imgs in sets.items():
        batch = gate.score_batch(preprocess(list(imgs.astype(np.float32) / 255.0), spec))
        stacked = np.column_stack([batch.p_values[n] for n in gate.bundle.score_names])
        p[name] = {"fusion": batch.p_value} | {m: f(stacked) for m, f in MERGERS.items()}
    rules = list(p["digits"])
    rows = {}
    for rule in rules:
        ind = p["digits"][rule]
        row = {"false_rejection": float(np.mean(ind <= ALPHA))}
        for s in OOD_SOURCES:
            out = p[s][rule]
            row[f"{s}_rejection"] = float(np.mean(out <= ALPHA))
            row[f"{s}_auroc"] = _auroc(ind, out)
        rows[rule] = row
    header = f"{'rule':<12} {'FRR':>6} " + " ".join(f"{s + ' rej/AUROC':>21}" for s in OOD_SOURCES)
    print(header)
    for rule, row in rows.items():
        cells = " ".join(f"{row[s + '_rejection']:>10.3f} / {row[s + '_auroc']:.3f}" for s in OOD_SOURCES)
        print(f"{rule:<12} {row['false_rejection']:>6.3f} {cells}")
    out = Path(__file__).parent / "results" / "combine_power.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"alpha": ALPHA, "n_digits": len(sets["digits"]), "n_ood_per_source": 300,
                               "rules": rows, "seconds": time.perf_counter() - t0}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _auroc(p_in: np.ndarray, p_out: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(p_in, p_out).statistic / (len(p_in) * len(p_out)))


if __name__ == "__main__":
    sys.exit(main())
