"""What the conv blocks' channel standard deviations (issue 12, round 6) cost a probe pass.

A SmallCNN (the near-OOD benchmark's model shape; its three blocks have 112 channels, so the
probe computes them) probes 256 MNIST digits with and without them, interleaved, beside the bare
forward pass, in the same run, through the torch probe and the ONNX probe (the model exported
to a file); torch's `std_mean` (what was tried first) is timed on the same block outputs for
comparison. Prints a table and writes benchmarks/results/block_stds_cost.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_stds_cost.py [--threads 1] [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verifier.examples.datasets import load_mnist  # noqa: E402
from verifier.examples.zoo import SmallCNN, mnist_spec, preprocess_uint8  # noqa: E402
from verifier.probe.torch_backend import TorchProbe  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "block_stds_cost.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN(num_classes=6).eval()
    x = preprocess_uint8(load_mnist()[0][:256]).numpy()
    probe = TorchProbe(mnist_spec(model, classes=6))
    assert probe.block_stds, "a SmallCNN's blocks fit the joint Gaussian: the probe computes them"
    acts: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    for name in probe.block_layers:
        mods[name].register_forward_hook(lambda m, i, o, n=name: acts.__setitem__(n, o.detach()))

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def forward() -> None:
        with torch.no_grad():
            model(torch.from_numpy(x))

    def probe_with(flag: bool):
        def run() -> None:
            probe.block_stds = flag
            probe.run(x)
        return run

    import tempfile
    from dataclasses import replace

    import verifier.probe.onnx_backend as ob
    from verifier.probe.onnx_files import export_onnx

    onnx_probes = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = mnist_spec(model, classes=6)
        export_onnx(model, spec, Path(tmp) / "m.onnx")
        decide = ob.wants_block_stds
        for flag in (False, True):
            ob.wants_block_stds = lambda channels, flag=flag: flag  # the graph is built at construction
            onnx_probes[flag] = ob.OnnxProbe(replace(spec, path=Path(tmp) / "m.onnx", module=None),
                                             threads=args.threads)
        ob.wants_block_stds = decide
    forward()
    blocks = list(acts.values())
    times: dict[str, list[float]] = {"bare forward": [], "probe without stds": [], "probe with stds": [],
                                     "stds (norm of deviations)": [], "stds (torch.std_mean)": [],
                                     "ONNX probe without stds": [], "ONNX probe with stds": []}
    for _ in range(args.rounds):
        times["bare forward"].append(timed(forward))
        times["probe without stds"].append(timed(probe_with(False)))
        times["probe with stds"].append(timed(probe_with(True)))
        times["stds (norm of deviations)"].append(timed(lambda: [
            torch.linalg.vector_norm(a - a.mean(dim=(2, 3), keepdim=True), dim=(2, 3)) for a in blocks]))
        times["stds (torch.std_mean)"].append(timed(lambda: [
            torch.std_mean(a, dim=(2, 3), correction=0) for a in blocks]))
        times["ONNX probe without stds"].append(timed(lambda: onnx_probes[False].run(x)))
        times["ONNX probe with stds"].append(timed(lambda: onnx_probes[True].run(x)))
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"SmallCNN, 256 digits, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(f"{'':<28} {'ms':>8} {'vs the same probe without':>26}")
    for k, v in med.items():
        base = med["ONNX probe without stds" if k.startswith("ONNX") else "probe without stds"]
        print(f"{k:<28} {v:>8.1f} {100 * v / base:>25.0f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "images": len(x),
                                    "median_ms": med}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
