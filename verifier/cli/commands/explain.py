"""Attribution maps for images: raw maps (.npy), overlay PNGs, per-class mean maps.

  verifier explain --spec model.toml --method gradcam,crm scans/ --out maps/
  verifier explain --spec model.toml --method crm --per-class labelled/ --out roi/
  verifier explain --spec model.toml --method gradcam,scorecam scans/ --out maps/ --faithfulness --json

Methods: gradcam, gradcam++, scorecam, cam, saliency, guided_backprop, sam, crm, and kwc
for segmentation models (comma-separated; docs/attribution.md, docs/segmentation.md). An ONNX or TorchScript model runs gradcam, scorecam, cam
and crm; the others need gradients onnxruntime does not give and are refused with that
list. Maps are raw (not normalised): CAM-family at the target layer's grid, gradient
methods at input resolution. --per-class takes one labelled folder (DIR/<class>/<images>)
or CSV and writes each class's mean map of the true class, per_class/<class>.<method>.npy
and .png (CRM's class-specific ROI maps). --faithfulness adds deletion and insertion AUCs
per image (lower deletion and higher insertion = more faithful). An unreadable input gets
an error record and the rest go on. Exit 0 when some image was explained, 2 when none
could be (or on a usage, spec or method error).

A segmentation spec ([model] task = "segmentation"; docs/segmentation.md) explains each
image's largest predicted non-background region (or --target's class region) with kwc (the
one gradient-free method, so the one a model file runs) over the decoder layers found
after the bottleneck (--layer names them, comma-separated); every record carries
prediction_preserved and image_preserved, and the summary a median table across methods.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="model spec TOML (see DESIGN.md)")
    p.add_argument("--method", required=True, help="method name(s), comma-separated")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders (with --per-class: one labelled folder or CSV)")
    p.add_argument("--out", required=True, help="folder for maps, overlays and explain.json")
    p.add_argument("--layer", default=None, help="target layer (default: the spec's, else auto; segmentation: decoder layers, comma-separated)")
    p.add_argument("--target", default=None,
                   help="class to explain, by name or index (default: the predicted class; "
                        "with --per-class: each image's true class)")
    p.add_argument("--per-class", action="store_true", help="write each class's mean map")
    p.add_argument("--faithfulness", action="store_true", help="deletion / insertion AUC per image")
    p.add_argument("--steps", type=int, default=16, help="faithfulness curve steps (default 16)")
    p.add_argument("--json", action="store_true", help="one JSON object per record per line")
    p.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    from verifier.attribution import METHODS, get_method
    from verifier.attribution.core import check_backend
    from verifier.attribution.outputs import OutputDir
    from verifier.data import iter_batches, labelled_dataset
    from verifier.spec import load_spec, model_fingerprint

    from verifier.attribution.core import check_task

    spec = load_spec(args.spec)
    methods = [get_method(m.strip()).name for m in args.method.split(",") if m.strip()]
    check_task(spec.task, methods)
    check_backend(spec, methods)
    if spec.task == "segmentation" and args.faithfulness:
        raise ValueError("--faithfulness is for classifiers; a segmentation spec reports "
                         "prediction_preserved / image_preserved in every record")
    target = _target(args.target, spec.classes)
    layer = args.layer or spec.target_layer
    if args.per_class:
        if len(args.inputs) != 1:
            raise ValueError("--per-class takes one labelled folder or CSV manifest")
        pairs = labelled_dataset(args.inputs[0], spec.classes)
        stream = iter_batches([p for p, _ in pairs], spec, args.batch_size,
                              labels=[lab for _, lab in pairs])
    else:
        stream = iter_batches(args.inputs, spec, args.batch_size)
    out = OutputDir(args.out)
    job = _Job(spec, methods, METHODS, out, args, layer)
    for records, xb in _progress(stream):
        job.batch(records, xb, target)
    job.finish({"spec": str(args.spec), "model": model_fingerprint(spec),
                "target": args.target, "per_class": args.per_class})
    return 0 if job.explained else 2


class _Job:
    """Accumulates one run's records, per-class sums and written files."""

    def __init__(self, spec, methods, registry, out, args, layer) -> None:
        self.spec, self.methods, self.registry, self.out, self.args = spec, methods, registry, out, args
        self.layer, self.resolved_layer = layer, None
        self.records: list[dict[str, Any]] = []
        self.explained = 0
        self.sums: dict[tuple[int, str], np.ndarray] = {}
        self.images: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self._predict = None

    def batch(self, records, xb: np.ndarray, target) -> None:
        from verifier.attribution import explain

        for r in records:
            if r.error is not None:
                self._emit({"input": r.source, "error": r.error})
        if len(xb) == 0:
            return
        ok = [r for r in records if r.error is None]
        tgt = np.array([r.label for r in ok]) if self.args.per_class and target is None else target
        e = explain(self.spec, xb, self.methods, target=tgt, layer=self.layer)
        self.resolved_layer = e.layer
        faith = self._faithfulness(xb, e) if self.args.faithfulness else {}
        kept = self._preserved(xb, e) if e.task == "segmentation" else {}
        gray = self._gray(xb)
        for i, r in enumerate(ok):
            self.explained += 1
            name = self.out.unique(r.source)
            c = int(e.targets[i])
            for m in self.methods:
                amap = e.maps[m][i]
                rec = {"input": r.source, "method": m, "class": self._cname(c), "class_index": c,
                       "probability": round(float(e.probabilities[i, c]), 6),
                       "map": self.out.write_npy(f"{name}.{m}.npy", amap),
                       "overlay": self.out.write_png(
                           f"{name}.{m}.png", _overlay(gray[i], amap, self.registry[m].signed)),
                       **_figures(amap)}
                if m in kept:
                    pp = float(kept[m].prediction_preserved[i])
                    rec["region_pixels"] = int(round(float(e.region[i].sum())))
                    rec["prediction_preserved"] = None if np.isnan(pp) else round(pp, 6)
                    rec["image_preserved"] = round(float(kept[m].image_preserved[i]), 6)
                if m in faith:
                    rec["deletion_auc"] = round(float(faith[m].deletion_auc[i]), 6)
                    rec["insertion_auc"] = round(float(faith[m].insertion_auc[i]), 6)
                self._emit(rec)
                if self.args.per_class:
                    key = (c, m)
                    self.sums[key] = self.sums.get(key, 0) + amap
            if self.args.per_class:
                self.counts[c] = self.counts.get(c, 0) + 1
                self.images[c] = self.images.get(c, 0) + gray[i]

    def finish(self, meta: dict[str, Any]) -> None:
        for (c, m), total in sorted(self.sums.items()):
            n = self.counts[c]
            mean = total / n
            stem = f"per_class/{_safe(self._cname(c))}"
            self._emit({"class": self._cname(c), "class_index": c, "method": m, "images": n,
                        "map": self.out.write_npy(f"{stem}.{m}.npy", mean),
                        "overlay": self.out.write_png(
                            f"{stem}.{m}.png",
                            _overlay(self.images[c] / n, mean, self.registry[m].signed)),
                        **_figures(mean)})
        if not self.args.json:
            _summary(self.records, self.methods)
        extra = {}
        if self.spec.task == "segmentation":
            from verifier.attribution.preserved import THRESHOLDS

            extra = {"task": "segmentation", "layers": (self.resolved_layer or "").split(","),
                     "preserved": {"thresholds": list(THRESHOLDS), "baseline": 0.0,
                                   "rule": "keep pixels where map / max(map) >= t, others set "
                                           "to the baseline; mean over t"}}
        self.out.write_manifest({**meta, "methods": self.methods, "layer": self.resolved_layer,
                                 **extra, "records": self.records})

    def _faithfulness(self, xb, e) -> dict[str, Any]:
        from verifier.attribution import deletion_insertion, predictor

        if self._predict is None:
            self._predict = predictor(self.spec, self.spec.channels, self.spec.size)
        return {m: deletion_insertion(self._predict, xb, e.maps[m], e.targets,
                                      steps=self.args.steps) for m in self.methods}

    def _preserved(self, xb, e) -> dict[str, Any]:
        from verifier.attribution import predictor, preserved

        if self._predict is None:
            self._predict = predictor(self.spec, self.spec.channels, self.spec.size)
        return {m: preserved(self._predict, xb, e.maps[m], e.targets, e.region)
                for m in self.methods}

    def _gray(self, xb: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.spec.mean)[None, :, None, None]
        std = np.asarray(self.spec.std)[None, :, None, None]
        return np.clip(xb * std + mean, 0, 1).mean(axis=1)

    def _cname(self, c: int) -> str:
        return self.spec.classes[c] if c < len(self.spec.classes) else str(c)

    def _emit(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.args.json:
            print(json.dumps(rec), flush=True)


def _figures(amap: np.ndarray) -> dict[str, Any]:
    """Per-map figures: shape, range, total, peak position, share of positive elements."""
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    return {"shape": list(amap.shape), "min": float(amap.min()), "max": float(amap.max()),
            "sum": float(amap.sum()), "peak": [int(peak[0]), int(peak[1])],
            "positive_fraction": round(float((amap > 0).mean()), 6)}


def _overlay(gray: np.ndarray, amap: np.ndarray, signed: bool) -> np.ndarray:
    from verifier.attribution.outputs import overlay_rgb

    return overlay_rgb(gray, amap, signed)


def _target(value: str | None, classes: tuple[str, ...]) -> int | None:
    if value is None:
        return None
    if value in classes:
        return classes.index(value)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--target {value!r} is neither a class name ({', '.join(classes)}) "
                         "nor an index") from None


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "class"


def _summary(records: list[dict[str, Any]], methods: list[str]) -> None:
    maps = [r for r in records if "probability" in r]
    errors = [r for r in records if "error" in r]
    width = max([len(r["input"]) for r in maps] + [5])
    print(f"{'input':<{width}}  {'method':<15} {'class':>6} {'prob':>5}  peak     del    ins")
    for r in maps:
        d = f"{r['deletion_auc']:.3f}" if "deletion_auc" in r else "-"
        s = f"{r['insertion_auc']:.3f}" if "insertion_auc" in r else "-"
        print(f"{r['input']:<{width}}  {r['method']:<15} {r['class']:>6} {r['probability']:.2f}  "
              f"{str(tuple(r['peak'])):<8} {d:>5}  {s:>5}")
    for m in methods:
        rows = [r for r in maps if r["method"] == m and "deletion_auc" in r]
        if rows:
            print(f"{m}: mean deletion AUC {np.mean([r['deletion_auc'] for r in rows]):.3f}, "
                  f"insertion AUC {np.mean([r['insertion_auc'] for r in rows]):.3f} over "
                  f"{len(rows)} images", file=sys.stderr)
    seg = [r for r in maps if "image_preserved" in r]
    if seg:
        print(f"{'method':<15} {'images':>6}  {'median PP':>9}  {'median IP':>9}   "
              f"(Prediction Preserved: higher is better; Image Preserved: lower is better)")
        for m in methods:
            rows = [r for r in seg if r["method"] == m]
            pp = [r["prediction_preserved"] for r in rows if r["prediction_preserved"] is not None]
            ip = [r["image_preserved"] for r in rows]
            if rows:
                print(f"{m:<15} {len(rows):>6}  {np.median(pp) if pp else float('nan'):>9.3f}  "
                      f"{np.median(ip):>9.3f}")
    for r in errors:
        print(f"error: {r['input']}: {r['error']}", file=sys.stderr)


def _progress(stream):
    from tqdm import tqdm

    return tqdm(stream, unit="batch", desc="explain", disable=not sys.stderr.isatty())
