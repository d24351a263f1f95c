"""Images/s of every attribution method vs a bare forward and vs the libraries' implementations.

  .venv/bin/python benchmarks/attribution.py [--quick] [--threads 1] [--out F.json]

Same batch, same run, interleaved rounds (one call of each per round, medians), on the small
MNIST CNN (batch 32, 1 x 28 x 28) and the ResNet-18-shaped classifier (batch 4, 3 x 64 x 64:
Score-CAM's 512 masked forwards per image make 224 x 224 minutes per call on a CPU).
References: pytorch-grad-cam's GradCAM, GradCAMPlusPlus, ScoreCAM (whole call: its min-max
scaling and resize included) and GuidedBackpropReLUModel; captum's Saliency; naive loops for
SAM and CRM (per image / per position). Writes benchmarks/results/attribution.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's per-image progress bars

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gradcam_lib import import_gradcam  # noqa: E402
from models import resnet18_shape  # noqa: E402

from verifier.attribution import METHODS, attribute  # noqa: E402
from verifier.examples.zoo import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cases(quick: bool) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    small = SmallCNN(head="gap").eval()
    res = resnet18_shape().eval()
    return [
        {"name": "SmallCNN gap (1x28x28)", "model": small, "layer": "features.8",
         "x": rng.standard_normal((32, 1, 28, 28)).astype(np.float32)},
        {"name": "ResNet-18 shape (3x64x64)", "model": res, "layer": "layer4",
         "x": rng.standard_normal((4, 3, 64, 64)).astype(np.float32)},
    ]


def references(model: torch.nn.Module, layer: str, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Library / naive implementations of the same methods, keyed by our method name."""
    refs: dict[str, Callable[[], Any]] = {}
    lib = import_gradcam()
    target = dict(model.named_modules())[layer]
    if lib is not None:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, GuidedBackpropReLUModel, ScoreCAM

        objs = {"gradcam": GradCAM(model, [target]), "gradcam++": GradCAMPlusPlus(model, [target]),
                "scorecam": ScoreCAM(model, [target])}
        objs["scorecam"].batch_size = 256
        for k, o in objs.items():
            refs[k] = (lambda o=o: o(input_tensor=x, targets=None))
        # it swaps the model's ReLU modules for new ones after each call: give it a copy, so the
        # hooks of the other methods stay on modules that still run
        gbp = GuidedBackpropReLUModel(copy.deepcopy(model), device=x.device)
        refs["guided_backprop"] = lambda: [gbp(x[i:i + 1]) for i in range(len(x))]  # one image per call
    from captum.attr import Saliency

    sal = Saliency(model)
    refs["saliency"] = lambda: sal.attribute(x.clone(), target=0, abs=True)
    refs["sam"] = lambda: _naive_sam(model, target, x)
    refs["crm"] = lambda: _naive_crm(model, target, x)
    return refs


def _naive_sam(model, layer_module, x):
    out = []
    for i in range(len(x)):
        box = {}
        h = layer_module.register_forward_hook(lambda m, a, o: box.__setitem__("a", o))
        try:
            xi = x[i:i + 1].clone().requires_grad_(True)
            y = model(xi)
        finally:
            h.remove()
        c = int(y.argmax())
        (g,) = torch.autograd.grad(y[0, c], box["a"], retain_graph=True)
        level = torch.relu((g.mean((2, 3), keepdim=True) * box["a"]).sum(1)).sum()
        out.append(torch.autograd.grad(level, xi)[0])
    return out


@torch.no_grad()
def _naive_crm(model, layer_module, x):
    out = []
    for i in range(len(x)):
        box = {}
        h = layer_module.register_forward_hook(lambda m, a, o: box.__setitem__("a", o.clone()))
        try:
            s = torch.softmax(model(x[i:i + 1]), 1)[0]
        finally:
            h.remove()
        a = box["a"]
        for r in range(a.shape[2]):
            for q in range(a.shape[3]):
                z = a.clone()
                z[0, :, r, q] = 0
                h = layer_module.register_forward_hook(lambda m, inp, o, z=z: z)
                try:
                    out.append(torch.softmax(model(x[i:i + 1]), 1)[0] - s)
                finally:
                    h.remove()
    return out


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per call: one warm-up each, then `reps` rounds calling each once."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(case: dict[str, Any], reps: int) -> dict[str, Any]:
    model, x = case["model"], case["x"]
    xt = torch.as_tensor(x)
    n = len(x)

    def bare():
        with torch.inference_mode():
            model(xt)

    fns: dict[str, Callable[[], Any]] = {"forward": bare}
    classifier_methods = [m for m in METHODS if METHODS[m].classification]
    for m in classifier_methods:
        fns[m] = (lambda m=m: attribute(model, x, m, layer=case["layer"]))
    refs = references(model, case["layer"], xt)
    fns.update({f"ref:{k}": v for k, v in refs.items()})
    secs = interleaved(fns, reps)
    rows = []
    for m in classifier_methods:
        ref = secs.get(f"ref:{m}")
        rows.append({"method": m, "seconds": secs[m], "images_per_s": n / secs[m],
                     "x_forward": secs[m] / secs["forward"],
                     "reference_images_per_s": n / ref if ref else None,
                     "speedup_vs_reference": ref / secs[m] if ref else None})
    return {"case": case["name"], "batch": n, "forward_images_per_s": n / secs["forward"],
            "rows": rows}


REFERENCE_NAMES = {"gradcam": "pytorch-grad-cam GradCAM", "gradcam++": "pytorch-grad-cam GradCAMPlusPlus",
                   "scorecam": "pytorch-grad-cam ScoreCAM (batch_size 256)",
                   "guided_backprop": "pytorch-grad-cam GuidedBackpropReLUModel (one image a call)",
                   "saliency": "captum Saliency", "sam": "naive per-image full backward",
                   "crm": "naive per-image, per-position loop", "cam": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two rounds instead of five")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "attribution.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 2 if args.quick else 5
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": reps,
           "references": REFERENCE_NAMES, "cases": [bench(c, reps) for c in cases(args.quick)]}
    for c in res["cases"]:
        print(f"\n{c['case']}, batch {c['batch']}: bare forward {c['forward_images_per_s']:.0f} img/s")
        print(f"{'method':<16}{'img/s':>10}{'x forward':>11}{'ref img/s':>11}{'speed-up':>10}  reference")
        for r in c["rows"]:
            ref = f"{r['reference_images_per_s']:.1f}" if r["reference_images_per_s"] else "-"
            sp = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
            print(f"{r['method']:<16}{r['images_per_s']:>10.1f}{r['x_forward']:>10.1f}x{ref:>11}"
                  f"{sp:>10}  {REFERENCE_NAMES[r['method']] or '-'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
