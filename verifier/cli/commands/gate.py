"""Accept or reject inputs with a bundle: one decision per input.

  verifier gate --bundle bundle/ scan1.png scans/ --json --log decisions/

Inputs are image files (PNG, JPEG, 8/16-bit, DICOM, .npy) or folders (searched
recursively). --json prints one JSON object per input per line; without it, a
table. An unreadable input gets an error record (a reject) and the rest go on.
Decisions are logged and printed (--json) batch by batch as they are decided, so a
run that is stopped keeps everything decided before the stop.
--out F.parquet writes every decision to one Parquet file in the decision log's schema
(batch scoring; written under a temporary name, then renamed); --manifest F adds the paths a
CSV or Parquet file lists in its `path` column. With --engine ray the batches run on Ray
workers and the file is the one --engine local writes (docs/engines.md); a job that cannot
finish names the inputs left without a decision and writes nothing.
Exit code 0 when every input was gated (accepted or rejected), 2 on a usage or
bundle error.
"""
from __future__ import annotations

import argparse
import json
import sys

from verifier.cli.engine_args import add_engine_arguments, engine_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory from 'verifier build'")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders")
    p.add_argument("--manifest", metavar="F", help="a CSV or Parquet file whose `path` column lists "
                   "images (relative to the file's folder)")
    p.add_argument("--out", metavar="F.parquet", help="write every decision to this Parquet file "
                   "(the decision log's schema) instead of printing them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out (only a decisions file this tool wrote)")
    p.add_argument("--json", action="store_true", help="one JSON object per input per line")
    p.add_argument("--log", metavar="DIR", help="append decisions to the Parquet decision log in DIR")
    p.add_argument("--spec", help="gate with another model file declared compatible ('verifier declare')")
    p.add_argument("--alpha", type=float, help="override the bundle's target false-rejection rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu or cuda (default: the model's)")
    p.add_argument("--verify-key", metavar="KEY", help="key file: refuse the bundle unless it is signed by this key (HMAC secret or Ed25519 public key; docs/bundle.md)")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.spec import load_spec

    if not args.inputs and not args.manifest:
        return _error("give INPUT files or folders, or --manifest F")
    if args.out or args.engine != "local" or args.manifest:
        if not args.out:
            return _error("--engine ray and --manifest write their decisions to --out F.parquet")
        return _to_file(args)
    gate = Gatekeeper.load(args.bundle, spec=load_spec(args.spec) if args.spec else None, alpha=args.alpha, device=args.device, batch_size=args.batch_size,
                           key=args.verify_key)
    if args.json:
        for batch in gate.iter_gate(args.inputs, log=args.log):
            for d in batch:
                print(json.dumps(d.to_dict()))
            sys.stdout.flush()
        return 0
    decisions = gate.gate(args.inputs, log=args.log, progress=True)
    if decisions:
        width = max([len(d.input) for d in decisions] + [5])
        print(f"{'input':<{width}}  decision  p_value  class  conf   reasons")
        for d in decisions:
            p = "-" if d.p_value is None else f"{d.p_value:.3f}"
            c = "-" if d.confidence is None else f"{d.confidence:.2f}"
            why = d.error if d.error else ",".join(d.reasons)
            print(f"{d.input:<{width}}  {d.decision:<8}  {p:>7}  {d.predicted_class or '-':>5}  {c:>4}   {why}")
        n_acc = sum(d.accepted for d in decisions)
        print(f"{n_acc} accepted, {len(decisions) - n_acc} rejected (alpha {gate.alpha})", file=sys.stderr)
    return 0


def _to_file(args: argparse.Namespace) -> int:
    from verifier.engines.jobs import gate_to_file
    from verifier.spec import load_spec

    summary = gate_to_file(args.bundle, args.inputs, args.out, engine_options(args),
                           manifest=args.manifest, spec=load_spec(args.spec) if args.spec else None,
                           alpha=args.alpha, batch_size=args.batch_size, device=args.device,
                           key=args.verify_key, log=args.log, overwrite=args.overwrite,
                           progress=True)
    figures = {"out": str(summary.out), "records": summary.records, "accepted": summary.accepted,
               "rejected": summary.records - summary.accepted, "errors": summary.errors,
               "engine": args.engine}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{summary.records} decisions to {summary.out}: {summary.accepted} accepted, "
              f"{summary.records - summary.accepted} rejected ({summary.errors} unreadable or "
              f"unusable)", file=sys.stderr)
    return 0


def _error(msg: str) -> int:
    print(f"verifier gate: error: {msg}", file=sys.stderr)
    return 2
