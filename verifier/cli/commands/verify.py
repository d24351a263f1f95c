"""Check a bundle's integrity (and, with --key, who issued it) without loading its model.

  verifier verify bundle/ --key issuer.pub.pem

Prints what was checked: the format version, the manifest digest (it covers every
field: alpha, combine, classes, higher_is_worse, the file checksums, compatibility
seals), each file's sha256, the signature, and the model file's fingerprint. Without
--key a signature is reported but not checked; an unsigned bundle is "consistent",
which anyone who edits it can also make it (docs/bundle.md). With --key the bundle
must be signed by that key.
Exit code 0 intact, 1 tampered (or unsigned / signed by another key when --key is
given), 2 error (not a bundle, unsupported version, unreadable key).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--key", metavar="KEY", help="key file to verify the signature with: the HMAC "
                   "secret, or an Ed25519 public (or private) PEM key")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON object")


def run(args: argparse.Namespace) -> int:
    from verifier.bundle.integrity import verify_bundle

    report = verify_bundle(args.bundle, key=args.key)
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1
