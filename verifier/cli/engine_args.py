"""The `--engine local|ray [--address A] [--workers N] ...` options that build, gate and audit
share, and the `EngineOptions` they make."""
from __future__ import annotations

import argparse

from verifier.engines.options import ENGINES, EngineOptions

__all__ = ["add_engine_arguments", "engine_options"]


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (docs/engines.md)")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local (this process, the default) or ray (a Ray cluster; needs "
                        "pip install 'verifier[ray]'); the same result either way")
    g.add_argument("--address", help="ray: address of a running cluster (e.g. HOST:6379, or "
                                     "'auto'); default RAY_ADDRESS, else a local Ray instance")
    g.add_argument("--workers", type=int, default=2,
                   help="ray: worker actors, each loading the model once (default 2)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="ray: CPUs per worker (Ray num_cpus; also its torch threads; default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="ray: GPUs per worker (Ray num_gpus, e.g. 1 or 0.5; default 0)")
    g.add_argument("--retries", type=int, default=3,
                   help="ray: times a dead worker is restarted and its chunk redone (default 3)")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(name=args.engine, address=args.address, workers=args.workers,
                         cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                         retries=args.retries)
