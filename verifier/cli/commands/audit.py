"""verifier audit: check that a candidate model looks where the bundle's trusted reference looks.

  verifier audit --bundle bundle/ --spec candidate.toml --data site_images/ --report audit.html

DATA holds labelled images from the deployment site (DIR/<class name>/<images> or a CSV
`path,label`). --engine ray probes both models on every image on Ray workers; the checks
and the verdict are the local ones (docs/engines.md).
Exit code 0 PASS, 1 FAIL, 2 error. Checks and thresholds: docs/audit.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verifier.cli.engine_args import add_engine_arguments, engine_options

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory of the trusted reference model")
    p.add_argument("--spec", required=True, help="model spec TOML of the candidate model")
    p.add_argument("--data", help="labelled deployment-site images (folder DIR/<class>/ or CSV); required")
    p.add_argument("--ood", help="folder of out-of-distribution images both models should reject")
    p.add_argument("--roi", help="folder of expected-region masks: ROI/<class>.png, or one mask "
                                 "per image at the image's path relative to --data")
    p.add_argument("--report", type=Path, help="write the HTML report here")
    p.add_argument("--json", type=Path, help="write the JSON result here")
    p.add_argument("--accuracy-margin", type=float, default=0.02,
                   help="FAIL on accuracy only when the candidate is significantly worse (exact "
                        "McNemar, p < 0.05) by more than this (default 0.02 = 2 points)")
    p.add_argument("--evidence-images", type=int, default=400,
                   help="images of the region-swap test of where decisions come from (default 400)")
    p.add_argument("--grid", type=int, default=7,
                   help="the region-swap test splits each image into GRID x GRID cells (default 7)")
    p.add_argument("--swap-floor", type=float, default=None,
                   help="largest mean excess rise of the swapped-in class's probability over the "
                        "reference's that still passes (default 0.04; docs/audit.md)")
    p.add_argument("--pattern-floor", type=float, default=None,
                   help="when the images hold a label-coded pattern (a marker, border or burnt-in "
                        "label whose pixels the label fixes), FAIL if the candidate follows it "
                        "beyond the reference by more than this many nats (default 0.25)")
    p.add_argument("--attention-decides", action="store_true",
                   help="let the seven-measure Grad-CAM checks decide the verdict (only for "
                        "candidates of the reference's architecture; reported either way)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the attribution sanity checks (model randomisation, deletion)")
    p.add_argument("--quantile", type=float, default=None,
                   help="reference's own tail level behind the map thresholds (default: bundle alpha)")
    p.add_argument("--min-measures", type=int, default=4,
                   help="of the bundle's measures (the seven by default), how many must agree per "
                        "attention and early-map check (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not args.data:
        return _error("--data is required: a folder DIR/<class name>/<images> or a CSV "
                      "'path,label' of labelled images from the deployment site")
    from verifier.bundle.directory import Bundle
    from verifier.engines.jobs import audit
    from verifier.reports.audit import write_html
    from verifier.spec import load_spec

    try:
        bundle = Bundle.load(args.bundle, key=args.verify_key)
        candidate = load_spec(args.spec)
    except (ValueError, OSError) as e:
        return _error(str(e))
    from verifier.audit.run import PATTERN_FLOOR, SHIFT_FLOOR, AuditError

    try:
        result = audit(bundle, candidate, args.data, engine_options(args),
                       staging_beside=args.json or args.report, ood=args.ood, roi=args.roi,
                       quantile=args.quantile, min_measures=args.min_measures,
                       accuracy_margin=args.accuracy_margin, evidence_images=args.evidence_images,
                       grid=args.grid, shift_floor=SHIFT_FLOOR if args.swap_floor is None
                       else args.swap_floor, pattern_floor=PATTERN_FLOOR if args.pattern_floor
                       is None else args.pattern_floor, attention_decides=args.attention_decides,
                       sanity=not args.no_sanity, batch_size=args.batch_size)
    except (AuditError, ValueError) as e:
        return _error(str(e))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.report:
        write_html(result, args.report)
    print(f"audit: {result.verdict} ({result.n_images} images, {len(result.checks)} checks)")
    for reason in result.reasons:
        print(f"  - {reason}")
    for warning in result.warnings:
        print(f"  (reported, not deciding) {warning}")
    return EXIT_PASS if result.passed else EXIT_FAIL


def _error(msg: str) -> int:
    print(f"verifier audit: error: {msg}", file=sys.stderr)
    return EXIT_ERROR
