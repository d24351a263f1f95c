"""verifier audit: check that a candidate model looks where the bundle's trusted reference looks.

  verifier audit --bundle bundle/ --spec candidate.toml --data site_images/ --report audit.html

DATA holds labelled images from the deployment site (DIR/<class name>/<images> or a CSV
`path,label`). Exit code 0 PASS, 1 FAIL, 2 error. Checks and thresholds: docs/audit.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    p.add_argument("--quantile", type=float, default=None,
                   help="reference's own tail level behind the map thresholds (default: bundle alpha)")
    p.add_argument("--min-measures", type=int, default=4,
                   help="of the seven measures, how many must agree (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")


def run(args: argparse.Namespace) -> int:
    if not args.data:
        return _error("--data is required: a folder DIR/<class name>/<images> or a CSV "
                      "'path,label' of labelled images from the deployment site")
    from ..audit import audit, write_html
    from ..bundle import Bundle
    from ..spec import load_spec

    try:
        bundle = Bundle.load(args.bundle, key=args.verify_key)
        candidate = load_spec(args.spec)
    except (ValueError, OSError) as e:
        return _error(str(e))
    result = audit(bundle, candidate, args.data, ood=args.ood, roi=args.roi,
                   quantile=args.quantile, min_measures=args.min_measures,
                   batch_size=args.batch_size)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if args.report:
        write_html(result, args.report)
    print(f"audit: {result.verdict} ({result.n_images} images, {len(result.checks)} checks)")
    for reason in result.reasons:
        print(f"  - {reason}")
    return EXIT_PASS if result.passed else EXIT_FAIL


def _error(msg: str) -> int:
    print(f"verifier audit: error: {msg}", file=sys.stderr)
    return EXIT_ERROR
