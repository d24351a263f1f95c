"""HTTP gating service.

  verifier serve --bundle bundle/ --port 8080
  curl -s --data-binary @scan.png -H 'Content-Type: image/png' http://127.0.0.1:8080/gate

POST /gate with one image file as the body (PNG, JPEG, TIFF, BMP, DICOM, .npy;
the type from Content-Type or an X-Filename header) returns the decision as the
JSON object of `verifier gate --json`; GET /health returns the bundle id and alpha.
Binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory from 'verifier build'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log", metavar="DIR", help="append every decision to the Parquet decision log in DIR")
    p.add_argument("--spec", help="gate with another model file declared compatible ('verifier declare')")
    p.add_argument("--alpha", type=float, help="override the bundle's target false-rejection rate")
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")


def run(args: argparse.Namespace) -> int:
    from ..gate import Gatekeeper
    from ..spec import load_spec
    from ..serve import make_server

    gate = Gatekeeper.load(args.bundle, spec=load_spec(args.spec) if args.spec else None, alpha=args.alpha,
                           key=args.verify_key)
    server = make_server(gate, args.host, args.port, log=args.log)
    print(f"verifier serving bundle {gate.bundle.bundle_id} on http://{args.host}:{server.server_port} "
          f"(POST /gate, GET /health); Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
