"""Build a bundle: reference store, garbage head and calibration for one model.

  verifier build --spec model.toml --data train/ --calibration held_out/ --out bundle/

DATA and CALIBRATION are folders laid out DIR/<class name>/<images> or CSV files
with a `path,label` header. Without --calibration, a stratified fraction of DATA
is held out (--calibration-fraction). Calibration images must not have been used
to train the model: they stand for the images the gate will see.

--methods gradcam,crm stores per-class reference maps of several attribution methods
(Grad-CAM always); the gate and audit score each with every measure (`crm_iou`, ...). A
method the model's backend cannot compute (e.g. saliency on an ONNX file) is refused.

--out must be a new or empty folder; an existing bundle is replaced only with
--overwrite, and no other folder is ever deleted. --sign-key signs the bundle so
gate/audit/drift/serve --verify-key and `verifier verify --key` can check who issued it.
--engine ray runs the reference and calibration passes on Ray workers (docs/engines.md);
the bundle is the one --engine local builds.
Exit code 0 built, 2 error.
"""
from __future__ import annotations

import argparse
import json
import sys

from verifier.cli.engine_args import add_engine_arguments, engine_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="model spec TOML (see DESIGN.md)")
    p.add_argument("--data", required=True, help="labelled reference images (folder or CSV)")
    p.add_argument("--calibration", help="labelled held-out calibration images (folder or CSV)")
    p.add_argument("--calibration-fraction", type=float, default=0.3,
                   help="share of --data held out for calibration when --calibration is absent (default 0.3)")
    p.add_argument("--garbage", help="folder of images the model must reject (added to synthetic garbage)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="target false-rejection rate on in-distribution images (default 0.05)")
    p.add_argument("--guarantee", choices=("marginal", "pac"), default="marginal",
                   help="marginal (default): P(reject an in-distribution input) <= alpha over the "
                        "calibration draw and the input; pac: with probability >= 1 - delta over the "
                        "calibration draw, the false-rejection rate itself is <= alpha (docs/gate.md)")
    p.add_argument("--delta", type=float, default=0.1,
                   help="pac only: allowed probability of an unlucky calibration draw (default 0.1)")
    p.add_argument("--methods", default="gradcam", metavar="M[,M...]",
                   help="attribution methods whose per-class reference maps the bundle keeps and "
                        "the gate scores, comma-separated (default gradcam; Grad-CAM is always "
                        "kept); see `verifier explain --help` for the registered methods")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="bundle directory to write: new or empty; an "
                   "existing bundle only with --overwrite; any other folder is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the bundle at --out (only a folder holding a bundle this tool wrote)")
    p.add_argument("--sign-key", metavar="KEY", help="sign the bundle: a file of at least 16 random "
                   "bytes (HMAC-SHA256) or a PEM Ed25519 private key (docs/bundle.md)")
    p.add_argument("--json", action="store_true", help="print the build figures as JSON")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from verifier.engines.jobs import build
    from verifier.spec import load_spec

    spec = load_spec(args.spec)
    bundle = build(spec, args.data, args.out, engine_options(args), calibration=args.calibration,
                          calibration_fraction=args.calibration_fraction, garbage=args.garbage,
                          alpha=args.alpha, batch_size=args.batch_size, seed=args.seed,
                          progress=True, guarantee=args.guarantee, delta=args.delta,
                          overwrite=args.overwrite, sign_key=args.sign_key,
                          methods=args.methods)
    figures = bundle.info["build"]
    if args.json:
        print(json.dumps({"bundle": str(args.out), "bundle_id": bundle.bundle_id,
                          "guarantee": bundle.guarantee, "delta": bundle.delta,
                          "methods": list(bundle.methods), "measures": list(bundle.measures),
                          **figures}))
    else:
        print(f"bundle {args.out} (id {bundle.bundle_id}): {figures['reference_images']} reference, "
              f"{figures['calibration_images']} calibration, {figures['garbage_images']} garbage images; "
              f"layers {bundle.info['target_layer']} / {bundle.info['early_layer']}; "
              f"methods {','.join(bundle.methods)}; "
              f"accuracy {figures['calibration_accuracy']:.3f} on calibration; alpha {bundle.alpha} "
              f"({bundle.guarantee}{f', delta {bundle.delta}' if bundle.guarantee == 'pac' else ''})",
              file=sys.stderr)
        if figures["unreadable"]:
            print(f"warning: {figures['unreadable']} unreadable image(s) skipped", file=sys.stderr)
    return 0
