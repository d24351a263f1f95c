"""Segmentation attribution: Prediction / Image Preserved per method, and images/s.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segmentation.py [--quick] [--threads 1] [--out F.json]

A SmallUNet trained (seed 0) on canvases of two real MNIST digits (digits 0-2999 of
`load_mnist`), evaluated on held-out canvases built from digits 3600-4999. For kwc and the
adapted gradcam, gradcam++ and saliency: the median Prediction Preserved (PP, higher is
better) and Image Preserved (IP, lower is better) over the held-out images, KWC's relative
difference to each adapted method beside the founding paper's reported direction (KWC: a
median 12-21% higher PP and 2-12% lower IP), PP at equal shares of the image kept (top
5/10/20/30% of each map's pixels: PP free of the PP/IP trade-off), and images/s of kwc, adapted Grad-CAM and the
bare forward on one batch (interleaved rounds, medians). Writes benchmarks/results/segmentation.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from verifier.attribution import explain, predictor, preserved
from verifier.examples.datasets import digit_canvases, load_mnist
from verifier.examples.zoo import SmallUNet, canvas_spec, preprocess_uint8, train_segmenter

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("kwc", "gradcam", "gradcam++", "saliency")
#: the founding paper's figures: KWC vs the adapted methods, median relative differences
PAPER = {"pp_higher_pct": [12.0, 21.0], "ip_lower_pct": [2.0, 12.0]}
#: equal shares of the image kept (top pixels of each map): PP without the PP/IP trade-off
FRACTIONS = (0.05, 0.1, 0.2, 0.3)


def quality(model: torch.nn.Module, images: np.ndarray, batch: int) -> dict[str, Any]:
    """Per-method PP / IP over the held-out canvases (batched)."""
    spec = canvas_spec(model)
    seg = predictor(model, 1, spec.size)
    pp: dict[str, list[float]] = {m: [] for m in METHODS}
    ip: dict[str, list[float]] = {m: [] for m in METHODS}
    at: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}  # PP at equal keep-fractions
    for lo in range(0, len(images), batch):
        x = preprocess_uint8(images[lo:lo + batch]).numpy()
        e = explain(spec, x, list(METHODS))
        for m in METHODS:
            r = preserved(seg, x, e.maps[m], e.targets, e.region)
            pp[m] += [float(v) for v in r.prediction_preserved if not np.isnan(v)]
            ip[m] += [float(v) for v in r.image_preserved]
            f = preserved(seg, x, e.maps[m], e.targets, e.region, fractions=FRACTIONS)
            at[m].append(f.prediction_curve)
    rows = {m: {"images": len(ip[m]), "median_pp": float(np.median(pp[m])),
                "median_ip": float(np.median(ip[m])), "mean_pp": float(np.mean(pp[m])),
                "mean_ip": float(np.mean(ip[m])),
                "median_pp_at_fraction": {str(f): float(np.nanmedian(c)) for f, c in
                                          zip(FRACTIONS, np.concatenate(at[m]).T)}}
            for m in METHODS}
    versus = {}
    for m in METHODS[1:]:
        a, b = rows["kwc"], rows[m]
        versus[m] = {"pp_higher_pct": 100.0 * (a["median_pp"] - b["median_pp"]) / b["median_pp"],
                     "ip_lower_pct": 100.0 * (b["median_ip"] - a["median_ip"]) / b["median_ip"],
                     # per image, paired: how often KWC keeps more of the prediction / less image
                     "pp_wins": float(np.mean(np.array(pp["kwc"]) > np.array(pp[m])))
                     if len(pp["kwc"]) == len(pp[m]) else None,
                     "ip_wins": float(np.mean(np.array(ip["kwc"]) < np.array(ip[m])))}
    return {"methods": rows, "kwc_versus": versus}


def speed(model: torch.nn.Module, x: np.ndarray, reps: int) -> dict[str, Any]:
    """images/s of the bare forward, adapted Grad-CAM and KWC on one batch (interleaved)."""
    spec = canvas_spec(model)
    xt = torch.as_tensor(x)

    def bare() -> None:
        with torch.inference_mode():
            model(xt)

    fns: dict[str, Callable[[], Any]] = {
        "forward": bare,
        "gradcam": lambda: explain(spec, x, ["gradcam"]),
        "kwc": lambda: explain(spec, x, ["kwc"]),
    }
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"seconds": s, "images_per_s": len(x) / s, "x_forward": s / med["forward"]}
            for k, s in med.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 held-out canvases, 2 speed rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared box)")
    ap.add_argument("--out", default=str(RESULTS / "segmentation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = load_mnist()
    train_i, train_m = digit_canvases(x[:3000], y[:3000], 1500, seed=0)
    held = 64 if args.quick else 300
    test_i, _ = digit_canvases(x[3600:5000], y[3600:5000], held, seed=1)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = train_segmenter(SmallUNet(), train_i, train_m, seed=0)
    train_s = time.perf_counter() - t0
    q = quality(model, test_i, batch=32)
    s = speed(model, preprocess_uint8(test_i[:32]).numpy(), reps=2 if args.quick else 5)
    with torch.no_grad():
        _, test_m = digit_canvases(x[3600:5000], y[3600:5000], held, seed=1)
        pred = model(preprocess_uint8(test_i)).argmax(1).numpy()
    fg = test_m > 0
    result = {"model": "SmallUNet width 8, 1500 canvases, 10 epochs one-cycle, seed 0",
              "train_seconds": train_s, "held_out_images": held,
              "pixel_accuracy": float((pred == test_m).mean()),
              "foreground_class_accuracy": float((pred[fg] == test_m[fg]).mean()),
              "threads": torch.get_num_threads(), "paper": PAPER, **q, "speed": s}
    reproduced = all(v["pp_higher_pct"] > 0 and v["ip_lower_pct"] > 0
                     for v in q["kwc_versus"].values())
    result["kwc_advantage_reproduced"] = reproduced
    _print(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print(r: dict[str, Any]) -> None:
    print(f"SmallUNet on digit canvases: pixel accuracy {r['pixel_accuracy']:.3f}, foreground "
          f"class accuracy {r['foreground_class_accuracy']:.3f}, {r['held_out_images']} held-out")
    print(f"{'method':<10} {'median PP':>9} {'median IP':>9}  {'KWC PP vs':>9} {'KWC IP vs':>9}  "
          f"{'paper: KWC PP':>13} {'paper: KWC IP':>13}")
    for m, row in r["methods"].items():
        v = r["kwc_versus"].get(m)
        pp = f"{v['pp_higher_pct']:+.1f}%" if v else "-"
        ip = f"{-v['ip_lower_pct']:+.1f}%" if v else "-"
        paper = ("+12..+21%", "-2..-12%") if v else ("", "")
        print(f"{m:<10} {row['median_pp']:>9.3f} {row['median_ip']:>9.3f}  {pp:>9} {ip:>9}  "
              f"{paper[0]:>13} {paper[1]:>13}")
    print("PP at an equal share of the image kept (top pixels of the map):")
    print(f"{'method':<10} " + " ".join(f"{'keep ' + f:>9}" for f in
                                         r["methods"]["kwc"]["median_pp_at_fraction"]))
    for m, row in r["methods"].items():
        print(f"{m:<10} " + " ".join(f"{v:>9.3f}" for v in row["median_pp_at_fraction"].values()))
    print("speed (batch 32):", ", ".join(f"{k} {v['images_per_s']:.1f} images/s "
                                          f"({v['x_forward']:.1f}x forward)"
                                          for k, v in r["speed"].items()))
    print("KWC's advantage (higher PP and lower IP than every adapted method) reproduced:",
          r["kwc_advantage_reproduced"])


if __name__ == "__main__":
    sys.exit(main())
