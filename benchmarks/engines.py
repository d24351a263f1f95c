"""Benchmark of the engines: `verifier gate --out` throughput, local vs Ray with 1 and 2 workers,
and the driver's peak memory as the number of images grows.

Run: .venv/bin/python benchmarks/engines.py [--images 4000] [--large 16000] [--threads 1]
Prints a table and writes benchmarks/results/engines.json.

Each configuration runs in a fresh interpreter (its peak RSS is the driver's alone: Ray workers
are other processes). images/s counts the job itself (listing, scoring, writing the file); the
Ray instance is started before the clock and its start-up is reported apart. The model is the
small MNIST CNN (one epoch on 1,500 real digits, exported to ONNX), the images real MNIST digits
written as PNG files (cycled for the larger folder).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLASSES = [str(i) for i in range(10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=4000, help="images gated per configuration")
    ap.add_argument("--large", type=int, default=16000,
                    help="a larger folder for the driver-memory check (Ray, 2 workers, and local)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engines.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        _prepare(root, a.images, a.large, a.threads)
        print(f"prepared model, bundle and {a.images} + {a.large} PNG files in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs = []
        for engine, workers, folder, n in (("local", 0, "small", a.images),
                                           ("ray", 1, "small", a.images),
                                           ("ray", 2, "small", a.images),
                                           ("local", 0, "large", a.large),
                                           ("ray", 2, "large", a.large)):
            r = _run(root, engine, workers, root / folder, n, a.threads, a.batch_size)
            runs.append(r)
            print(f"  {engine:5} workers={workers} images={n}: {r['images_per_s']:.0f} img/s, "
                  f"driver peak {r['driver_peak_mib']:.0f} MiB", file=sys.stderr)
    result = {"machine": {"python": platform.python_version(), "cpus": mp.cpu_count(),
                          "platform": platform.platform(), "threads": a.threads},
              "model": "SmallCNN (MNIST, ONNX backend)", "batch_size": a.batch_size, "runs": runs}
    _table(runs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {a.out}")


def _prepare(root: Path, n_small: int, n_large: int, threads: int) -> None:
    import numpy as np
    import torch

    from conftest import write_onnx_model
    from verifier.bundle.builder import build_bundle
    from verifier.data import save_dataset
    from verifier.examples.datasets import load_mnist
    from verifier.examples.zoo import SmallCNN, train_classifier
    from verifier.spec import load_spec

    torch.set_num_threads(threads)
    x, y = load_mnist()
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(head="gap"), x[:1500], y[:1500], epochs=1, seed=0)
    spec = write_onnx_model(root, model)
    build_bundle(load_spec(spec), (x[:1500], y[:1500]), root / "bundle",
                 calibration=(x[1500:2100], y[1500:2100]), seed=0)
    pool_x, pool_y = x[2100:], y[2100:]
    for name, n in (("small", n_small), ("large", n_large)):
        idx = np.arange(n) % len(pool_x)
        save_dataset(pool_x[idx], pool_y[idx], CLASSES, root / name)


_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from verifier.engines.jobs import gate_to_file
from verifier.engines.options import EngineOptions
engine, workers = {engine!r}, {workers}
start = 0.0
if engine == "ray":
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=max(workers, 1), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    start = time.perf_counter() - t
opts = EngineOptions(name=engine, workers=max(workers, 1), cpus_per_worker={threads})
t = time.perf_counter()
s = gate_to_file({bundle!r}, [{folder!r}], {out!r}, opts, batch_size={batch})
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"records": s.records, "wall_s": wall, "start_s": start, "peak": peak}}))
"""


def _run(root: Path, engine: str, workers: int, folder: Path, n: int, threads: int,
         batch: int) -> dict:
    out = root / f"d-{engine}-{workers}-{folder.name}.parquet"
    code = _CHILD.format(root=str(ROOT), threads=threads, engine=engine, workers=workers,
                         bundle=str(root / "bundle"), folder=str(folder), out=str(out), batch=batch)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=False)
    if run.returncode != 0:
        raise SystemExit(f"{engine} workers={workers} failed:\n{run.stderr[-3000:]}")
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["records"] == n, (got, n)
    out.unlink()
    return {"engine": engine, "workers": workers, "images": n, "wall_s": round(got["wall_s"], 2),
            "images_per_s": round(n / got["wall_s"], 1), "ray_start_s": round(got["start_s"], 2),
            "driver_peak_mib": round(got["peak"], 1)}


def _table(runs: list[dict]) -> None:
    print(f"\n{'engine':8}{'workers':>8}{'images':>8}{'wall s':>9}{'img/s':>9}{'ray start s':>13}"
          f"{'driver peak MiB':>17}")
    for r in runs:
        print(f"{r['engine']:8}{r['workers'] or '-':>8}{r['images']:>8}{r['wall_s']:>9.1f}"
              f"{r['images_per_s']:>9.0f}{r['ray_start_s']:>13.1f}{r['driver_peak_mib']:>17.0f}")


if __name__ == "__main__":
    main()
