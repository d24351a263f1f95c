"""The `verifier` command line: one sub-command per module in `verifier.cli.commands`.

Exit codes: 0 success / PASS / no alert, 1 FAIL / alert, 2 error (bad input,
bad bundle, bad spec). Errors print one clear line on stderr, not a traceback
(set VERIFIER_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "COMMANDS"]

#: sub-command -> (module under verifier.cli.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the main job on bundled real data: build a bundle, gate a mixed stream, audit, report"),
    "build": ("build", "build a bundle: reference store + garbage head + calibration"),
    "gate": ("gate", "accept or reject inputs (files or folders) with a bundle"),
    "audit": ("audit", "audit a candidate model against a bundle's trusted reference (exit 0 PASS, 1 FAIL)"),
    "drift": ("drift", "drift report over a day of logged decisions (exit 0 no alert, 1 alert)"),
    "serve": ("serve", "HTTP gating service"),
    "explain": ("explain", "attribution maps (.npy + overlay PNG), per-class mean maps, faithfulness"),
    "declare": ("declare", "declare another model file (e.g. an ONNX export) compatible with a bundle, after a parity check"),
    "verify": ("verify", "check a bundle's checksums, manifest digest and signature (exit 0 intact, 1 tampered)"),
}

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from verifier import __version__

    parser = argparse.ArgumentParser(
        prog="verifier",
        description="Verification gatekeeper for medical-image classifiers: Grad-CAM and "
                    "early-feature checks against a trusted per-class reference, calibrated "
                    "input gating, model audits and drift reports.",
        epilog="Run 'verifier COMMAND --help' for a command's options. "
               "Exit codes: 0 ok/PASS/no alert, 1 FAIL/alert, 2 error.",
    )
    parser.add_argument("--version", action="version", version=f"verifier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(f"verifier.cli.commands.{module}")
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("verifier: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # one clear line for users; the traceback on request
        if os.environ.get("VERIFIER_DEBUG"):
            raise
        print(f"verifier {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
