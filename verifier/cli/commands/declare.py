"""Declare another model file (e.g. the ONNX export of the bundle's model) compatible with a bundle.

  verifier declare --bundle bundle/ --spec model_onnx.toml --data held_out/

Both models run on the images in --data (plus synthetic garbage made from
them); the declaration is written into the bundle only if every image gets the same
predicted class, logits within 1e-4 x the logit scale, Grad-CAM cosine >= 0.999 and the same gate
decision. Then `verifier gate --bundle B --spec OTHER` accepts the other model.
Exit 0 declared, 2 refused or error (the message names the failing figure).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory built from a model file")
    p.add_argument("--spec", required=True, help="spec TOML of the other model file")
    p.add_argument("--data", required=True, nargs="+", metavar="INPUT",
                   help="in-distribution images to check parity on (files or folders)")
    p.add_argument("--label", help="name of the declaration (default: the other model's file name)")
    p.add_argument("--out", help="write the declared bundle here (a new or empty folder) instead of updating --bundle")
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")
    p.add_argument("--sign-key", metavar="KEY", help="sign the declared bundle with this key file "
                   "(required when the bundle is signed: declaring never strips a signature)")


def run(args: argparse.Namespace) -> int:
    from verifier.runtime.parity import declare_compatible
    from verifier.spec import load_spec

    other = load_spec(args.spec)
    record = declare_compatible(args.bundle, other, args.data, label=args.label, out=args.out,
                                key=args.verify_key, sign_key=args.sign_key)
    print(json.dumps(record, default=str))
    return 0
