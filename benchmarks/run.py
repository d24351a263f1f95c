"""The benchmark suite: gate throughput against the bare forward pass and pytorch-grad-cam,
stage shares, fast vs exact Wasserstein, and reference-build peak memory.

Run: .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results/run.json]
     [--log DIR] [--device cpu|cuda|all] [--reps N]
Prints tables and writes one JSON file; docs/performance.md explains every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from verifier.runtime.gatekeeper import STAGES, Gatekeeper  # noqa: E402
from verifier.spec import ModelSpec  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "run.json"
BATCH = 32
CLASSES = tuple(f"c{i}" for i in range(10))


# ----------------------------------------------------------------------------- models and data

@dataclasses.dataclass
class Case:
    """One model to measure: its spec, raw (uint8) reference/calibration data and a raw batch."""

    name: str
    spec: ModelSpec
    ref: tuple[np.ndarray, np.ndarray]
    cal: tuple[np.ndarray, np.ndarray]
    raw: np.ndarray  # (BATCH, H, W[, C]) uint8, the batch every method sees
    note: str


def resnet_case(size: int, n_ref: int, n_cal: int, seed: int = 0) -> Case:
    """ResNet-18 shape, random init (eval mode), synthetic smooth RGB images of `size`."""
    from models import resnet18_shape

    model = resnet18_shape(len(CLASSES), seed=seed)
    spec = ModelSpec(classes=CLASSES, size=(size, size), channels=3, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), module=model)
    rng = np.random.default_rng(seed)
    imgs = _smooth_images(n_ref + n_cal + BATCH, size, rng)
    labels = rng.integers(0, len(CLASSES), n_ref + n_cal)
    return Case("resnet18_shape", spec, (imgs[:n_ref], labels[:n_ref]),
                (imgs[n_ref:n_ref + n_cal], labels[n_ref:]), imgs[n_ref + n_cal:],
                f"ResNet-18 shape (BasicBlocks [2,2,2,2]), 3x{size}x{size}, random init, eval mode; "
                f"bundle from {n_ref} reference + {n_cal} calibration synthetic images")


def mnist_case(n_ref: int, n_cal: int, seed: int = 0) -> Case:
    """verifier.examples.zoo.SmallCNN trained briefly (1 epoch, 2,000 real MNIST digits)."""
    from verifier.examples.datasets import load_mnist
    from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier

    x, y = load_mnist()
    model = train_classifier(SmallCNN(), x[:2000], y[:2000], epochs=1, seed=seed)
    spec = mnist_spec(model)
    a, b = 2000, 2000 + n_ref
    return Case("small_mnist_cnn", spec, (x[a:b], y[a:b]), (x[b:b + n_cal], y[b:b + n_cal]),
                np.ascontiguousarray(x[:BATCH]),
                f"verifier.examples.zoo.SmallCNN, 1x28x28, 1 epoch on 2,000 MNIST digits; "
                f"bundle from {n_ref} reference + {n_cal} calibration digits")


def _smooth_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size, 3) uint8 images: upsampled coarse noise plus a bright blob (not white noise,
    so the maps have structure)."""
    coarse = rng.uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)
    idx = (np.arange(size) * 8) // size
    img = coarse[:, idx][:, :, idx]
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1))
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
    return np.clip(255 * (0.6 * img + 0.4 * blob), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- throughput

def bench_case(case: Case, device: str, reps: int, work: Path, log_dir: Path) -> dict[str, Any]:
    """Images/s of every method on the same batch, interleaved, medians over `reps`."""
    from verifier.bundle.builder import build_bundle
    from verifier.data import load_images
    from verifier.probe.onnx_backend import export_onnx
    from verifier.probe.torch_backend import TorchProbe

    spec = case.spec
    model = spec.module.to(device)
    out: dict[str, Any] = {"model": case.name, "device": device, "batch": BATCH, "note": case.note}
    x = np.stack([r.pixels for r in load_images(case.raw, spec)])  # the gate's own preprocessing
    xt_cpu = torch.from_numpy(x)

    t0 = time.perf_counter()
    probe = TorchProbe(spec, device=device)
    bundle = build_bundle(spec, case.ref, work / f"{case.name}-{device}-torch", calibration=case.cal,
                          batch_size=BATCH, probe=probe)
    out["build_seconds_torch"] = time.perf_counter() - t0
    gate = Gatekeeper(bundle, probe)

    onnx_path = export_onnx(model, spec, work / f"{case.name}.onnx")
    onnx_spec = dataclasses.replace(spec, module=None, path=onnx_path)
    t0 = time.perf_counter()
    onnx_bundle = build_bundle(onnx_spec, case.ref, work / f"{case.name}-{device}-onnx",
                               calibration=case.cal, batch_size=BATCH)
    out["build_seconds_onnx"] = time.perf_counter() - t0
    onnx_gate = Gatekeeper.load(onnx_bundle.path, device=device)
    out["onnx_gradient_method"] = onnx_gate.probe.gradient_method
    session = _ort_session(onnx_path, device)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare_forward() -> None:
        with torch.inference_mode():
            model(xt_cpu.to(device)).cpu().numpy()

    methods: dict[str, Callable[[], Any]] = {
        "torch_forward": bare_forward,
        "gate_score_batch": lambda: gate.score_batch(x),
        "gate_raw": lambda: gate.gate(case.raw),
        "gate_raw_log": lambda: gate.gate(case.raw, log=log_dir / f"{case.name}-{device}"),
        "ort_forward": lambda: session.run(None, {session.get_inputs()[0].name: x}),
        "onnx_gate_score_batch": lambda: onnx_gate.score_batch(x),
        "onnx_gate_raw": lambda: onnx_gate.gate(case.raw),
    }
    gradcam, why = _gradcam(model, probe.target_layer)
    if gradcam is not None:
        methods["gradcam"] = lambda: gradcam(input_tensor=xt_cpu.to(device), targets=None)
    out["gradcam"] = why

    stage_calls: list[dict[str, float]] = []
    try:
        times = _interleaved(methods, reps, sync, stage_hook=(gate, "gate_raw_log", stage_calls))
    finally:
        if gradcam is not None:
            gradcam.activations_and_grads.release()
    out["seconds_per_batch"] = {k: statistics.median(v) for k, v in times.items()}
    out["images_per_second"] = {k: BATCH / s for k, s in out["seconds_per_batch"].items()}
    out["repetitions"] = {k: len(v) for k, v in times.items()}
    ips = out["images_per_second"]
    out["ratios"] = {
        "gate_score_batch / torch_forward": ips["gate_score_batch"] / ips["torch_forward"],
        "gate_raw / torch_forward": ips["gate_raw"] / ips["torch_forward"],
        "gate_raw_log / torch_forward": ips["gate_raw_log"] / ips["torch_forward"],
        "onnx_gate_score_batch / ort_forward": ips["onnx_gate_score_batch"] / ips["ort_forward"],
        "onnx_gate_raw / ort_forward": ips["onnx_gate_raw"] / ips["ort_forward"],
    }
    if "gradcam" in ips:
        out["ratios"]["gate_score_batch / gradcam"] = ips["gate_score_batch"] / ips["gradcam"]
        out["ratios"]["gate_raw / gradcam"] = ips["gate_raw"] / ips["gradcam"]
    out["stage_share"] = _stage_share(stage_calls)
    out["wasserstein_in_gate"] = _wasserstein_in_gate(gate, x, out["seconds_per_batch"]["torch_forward"])
    return out


def _interleaved(methods: dict[str, Callable[[], Any]], reps: int, sync: Callable[[], None],
                 stage_hook: tuple[Gatekeeper, str, list]) -> dict[str, list[float]]:
    """Seconds per call of each method: one warm-up each, then `reps` rounds that call every
    method once in turn (so background load hits all alike); a method faster than 50 ms is
    repeated inside its round and averaged."""
    gate, hooked, calls = stage_hook
    inner: dict[str, int] = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, min(50, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            before = dict(gate.timings)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            dt = (time.perf_counter() - t0) / inner[name]
            times[name].append(dt)
            if name == hooked:
                row = {s: (gate.timings[s] - before[s]) / inner[name] for s in STAGES}
                row["total"] = dt
                calls.append(row)
    return times


def _stage_share(calls: list[dict[str, float]]) -> dict[str, Any]:
    """Median seconds per batch of each stage of `Gatekeeper.gate(raw, log=...)` and its share;
    `other` is the wall time no stage covers (building the Decision records)."""
    med = {s: statistics.median(c[s] for c in calls) for s in (*STAGES, "total")}
    med["other"] = max(0.0, med["total"] - sum(med[s] for s in STAGES))
    return {"seconds_per_batch": med,
            "share": {s: med[s] / med["total"] for s in (*STAGES, "other")}}


def _wasserstein_in_gate(gate: Gatekeeper, x: np.ndarray, forward_s: float) -> dict[str, float]:
    """Time of the fast Wasserstein on this batch's (cam, early) maps next to one forward pass."""
    from verifier.scoring.measures import compare_maps

    res = gate.probe.run(x)
    cam, early = gate.comparator.canonical(res)
    refs = gate.bundle.store.cam_reference[res.cam_class]
    erefs = gate.bundle.store.early_reference[res.cam_class]
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        compare_maps(cam, refs, ["wasserstein"])
        compare_maps(early, erefs, ["wasserstein"])
        ts.append(time.perf_counter() - t0)
    s = statistics.median(ts)
    return {"seconds_per_batch": s, "fraction_of_forward": s / forward_s}


def _ort_session(path: Path, device: str) -> Any:
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def _gradcam(model: torch.nn.Module, layer: str) -> tuple[Any, str]:
    """pytorch-grad-cam's GradCAM on `layer`, or None and why not.

    grad-cam 1.5.7 imports torchvision at module level only for helpers GradCAM never calls;
    PyPI's torchvision cannot sit beside this torch build, so `tests/_gradcam_lib.py` puts a
    placeholder in its place when it cannot load; the Grad-CAM path itself (hooks, backward,
    weights, `scale_cam_image` via OpenCV) is the library's own."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _gradcam_lib import import_gradcam

    pytorch_grad_cam = import_gradcam()
    if pytorch_grad_cam is None:
        return None, "pytorch-grad-cam cannot be imported (pip install --no-deps grad-cam==1.5.7)"
    from pytorch_grad_cam import GradCAM

    shim = ("torchvision absent: placeholder module for its unused imports"
            if getattr(sys.modules.get("torchvision"), "__file__", None) is None else "torchvision present")
    target = dict(model.named_modules())[layer]
    version = getattr(pytorch_grad_cam, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("grad-cam")
    return GradCAM(model=model, target_layers=[target]), \
        f"pytorch-grad-cam {version} GradCAM on '{layer}', targets=None (argmax), {shim}"


# ----------------------------------------------------------------------------- Wasserstein

def bench_wasserstein(n_per_family: int) -> dict[str, Any]:
    """Exact (POT emd2) vs fast (sliced, default 32 directions) on benchmarks/wasserstein_error.py's
    realistic 16x16 map families, all pairs together."""
    from wasserstein_error import evaluate, map_families

    fams = map_families(n_per_family)
    m = np.concatenate([a for a, _ in fams.values()])
    r = np.concatenate([b for _, b in fams.values()])
    row = evaluate(m, r)
    return {"pairs": int(len(m)), "grid": [16, 16], "families": list(fams), **row,
            "speedup_fast_over_exact": row["ms_per_pair_exact"] / row["ms_per_pair_fast"]}


# ----------------------------------------------------------------------------- memory

def bench_memory(counts: list[int], real: bool, threads: int | None) -> dict[str, Any]:
    """Peak memory of reference builds, each count in a fresh interpreter (ru_maxrss is a
    process-lifetime peak)."""
    out: dict[str, Any] = {}
    kinds = ["streaming_resnet_shapes"] + (["real_mnist_build"] if real else [])
    for kind in kinds:
        out[kind] = {}
        for n in counts:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", kind, str(n)]
            if threads:
                cmd += ["--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                out[kind][str(n)] = {"error": res.stderr.strip().splitlines()[-1:]}
                continue
            out[kind][str(n)] = json.loads(res.stdout.strip().splitlines()[-1])
        rows = [v for v in out[kind].values() if "error" not in v]
        if len(rows) == len(counts) and len(rows) >= 2:
            for key in ("tracemalloc_peak_mb", "rss_peak_delta_mb"):
                if rows[0][key] > 0:
                    out[kind][f"{key} ratio {counts[-1]}/{counts[0]}"] = rows[-1][key] / rows[0][key]
    return out


def _memory_child(kind: str, n: int) -> dict[str, Any]:
    """Run one build of `n` images and report its peaks (printed as one JSON line)."""
    import gc
    import inspect

    from reference_maps.canonical import to_grid
    from reference_maps.store import ReferenceStore
    from verifier.bundle.builder import _PIXEL_SAMPLES, _Reservoir
    from verifier.bundle.builder import build_bundle as _build

    gc.collect()
    rss0 = _rss_mb()
    sampler = _PeakRSS()
    tracemalloc.start()
    t0 = time.perf_counter()
    if kind == "streaming_resnet_shapes":
        # What build_bundle keeps while streaming the reference images, fed with probe outputs
        # of the ResNet-18 shape: cam (b, 7, 7), early map (b, 112, 112), early stats (b, 64),
        # features (b, 512), raw pixels (b, 224, 224, 3) for the garbage generator.
        rng = np.random.default_rng(0)
        store = ReferenceStore(CLASSES, grid=(16, 16))
        head_samples = inspect.signature(_build).parameters["head_samples"].default
        feats, labels = _Reservoir(head_samples, rng), _Reservoir(head_samples, rng)
        pixels = _Reservoir(_PIXEL_SAMPLES, rng)
        cam = rng.gamma(2.0, 1.0, (BATCH, 7, 7)).astype(np.float32)
        early = rng.gamma(2.0, 1.0, (BATCH, 112, 112)).astype(np.float32)
        stats = rng.standard_normal((BATCH, 64)).astype(np.float32)
        f = rng.standard_normal((BATCH, 512)).astype(np.float32)
        px = rng.uniform(0, 1, (BATCH, 224, 224, 3)).astype(np.float32)
        for s in range(0, n, BATCH):
            b = min(BATCH, n - s)
            lab = rng.integers(0, len(CLASSES), b)
            store.update(lab, to_grid(cam[:b], (16, 16)), to_grid(early[:b], (16, 16)), stats[:b])
            keep = feats.offer(f[:b])
            labels.offer(lab, keep)
            pixels.offer(np.round(px[:b] * 255).astype(np.uint8))  # as build_bundle keeps them
        what = "ReferenceStore.update + build_bundle's feature/label/pixel reservoirs"
    else:
        # One real build_bundle of a SmallCNN over n MNIST-derived digits (the 5,000 real
        # digits, shifted by up to 2 pixels to reach n) read from a memory-mapped .npy, with a
        # fixed 300-image calibration set, so only the reference count changes.
        from verifier.bundle.builder import build_bundle
        from verifier.examples.datasets import load_mnist
        from verifier.examples.zoo import SmallCNN, mnist_spec

        x, y = load_mnist()
        torch.manual_seed(0)
        spec = mnist_spec(SmallCNN().eval())
        tracemalloc.stop()
        sampler.stop()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ref.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
            rng = np.random.default_rng(0)
            for s in range(0, n, 1000):
                k = min(1000, n - s)
                src = x[300 + (np.arange(s, s + k) % 4700)]
                dy, dx = rng.integers(-2, 3, 2)
                mm[s:s + k] = np.roll(src, (dy, dx), axis=(1, 2))
            mm.flush()
            labels = y[300 + (np.arange(n) % 4700)]
            del mm
            images = np.load(path, mmap_mode="r")
            gc.collect()
            rss0 = _rss_mb()
            sampler = _PeakRSS()
            tracemalloc.start()
            t0 = time.perf_counter()
            build_bundle(spec, (images, labels), Path(tmp) / "bundle", calibration=(x[:300], y[:300]))
        what = "build_bundle(SmallCNN) end to end: store, garbage head, calibration"
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"images": n, "what": what, "seconds": seconds, "tracemalloc_peak_mb": peak / 2**20,
            "rss_peak_delta_mb": sampler.stop() - rss0}


def _limit_threads(n: int) -> None:
    """n intra-op threads for torch and for the BLAS/OpenMP pools numpy and scikit-learn use."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


def _rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with contextlib.suppress(OSError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _PeakRSS:
    """Samples the current RSS every 2 ms on a thread; `.peak` is the highest seen (MiB)."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        return self.peak


# ----------------------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime

    return {"cpu": cpu, "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch']} "
          f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}, cuda: {m['cuda']}")
    for key, r in res["throughput"].items():
        print(f"\n== {key}: {r['note']}")
        print(f"   bundle build: torch {r['build_seconds_torch']:.1f} s, onnx "
              f"{r['build_seconds_onnx']:.1f} s ({r['onnx_gradient_method']}); gradcam: {r['gradcam']}")
        print(f"   {'method':28s} {'img/s':>10s} {'ms/batch':>10s}  reps")
        for k, ips in r["images_per_second"].items():
            print(f"   {k:28s} {ips:10.1f} {1e3 * r['seconds_per_batch'][k]:10.1f}  "
                  f"{r['repetitions'][k]}")
        for k, v in r["ratios"].items():
            print(f"   ratio {k:36s} {v:6.2f}")
        sh = r["stage_share"]
        print("   stages of gate(raw, log=...): " + ", ".join(
            f"{s} {100 * sh['share'][s]:.1f}%" for s in sh["share"]))
        w = r["wasserstein_in_gate"]
        print(f"   fast Wasserstein (cam + early, batch): {1e3 * w['seconds_per_batch']:.2f} ms "
              f"= {100 * w['fraction_of_forward']:.2f}% of one forward pass")
    w = res.get("wasserstein")
    if w:
        print(f"\n== Wasserstein, {w['pairs']} pairs of 16x16 maps: exact {w['ms_per_pair_exact']:.3f} "
              f"ms/pair, fast {w['ms_per_pair_fast']:.4f} ms/pair ({w['speedup_fast_over_exact']:.0f}x); "
              f"MAE {w['mean_abs_error']:.4f} (mean exact {w['mean_exact']:.4f}), "
              f"MRE {w['mean_rel_error']:.3f}, Spearman {w['spearman']:.3f}")
    for kind, rows in res.get("memory", {}).items():
        print(f"\n== memory: {kind}")
        for n, v in rows.items():
            if isinstance(v, dict) and "error" in v:
                print(f"   {n}: error {v['error']}")
            elif isinstance(v, dict):
                print(f"   {v['images']:>6d} images: tracemalloc peak {v['tracemalloc_peak_mb']:8.1f} MiB, "
                      f"RSS peak delta {v['rss_peak_delta_mb']:8.1f} MiB, {v['seconds']:.1f} s")
            else:
                print(f"   {n}: {v:.3f}")


def _write(path: Path, res: dict[str, Any]) -> None:
    """Write the results so far (a crash late in the run keeps the earlier sections)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 3 min): ResNet-18 shape at 64x64, 2 rounds, small builds")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--log", type=Path, default=None, help="folder for the log stage (default: temporary)")
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds per method")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for torch and numpy's BLAS (default: as installed); "
                         "1 gives steadier figures on a shared, oversubscribed machine")
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        _limit_threads(args.threads)
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return 0

    quick = args.quick
    reps = args.reps or (2 if quick else 5)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    t_start = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "quick": quick, "threads": args.threads, "batch": BATCH, "reps": reps,
                           "throughput": {}}
    cases = [resnet_case(64 if quick else 224, 60 if quick else 200, 40 if quick else 100),
             mnist_case(300 if quick else 2000, 100 if quick else 500)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log_dir = args.log if args.log is not None else work / "log"
        for case in cases:
            for device in devices:
                print(f"measuring {case.name} on {device} ...", flush=True)
                t_case = time.perf_counter()
                r = res["throughput"][f"{case.name}/{device}"] = bench_case(case, device, reps, work, log_dir)
                print(f"  builds {r['build_seconds_torch']:.0f} s + {r['build_seconds_onnx']:.0f} s, "
                      f"case {time.perf_counter() - t_case:.0f} s", flush=True)
                _write(args.out, res)
    print("measuring Wasserstein exact vs fast ...", flush=True)
    res["wasserstein"] = bench_wasserstein(40 if quick else 200)
    _write(args.out, res)
    print("measuring reference-build memory ...", flush=True)
    res["memory"] = bench_memory([2000, 20000], real=not quick, threads=args.threads)
    res["seconds"] = time.perf_counter() - t_start
    print_report(res)
    _write(args.out, res)
    print(f"\nwrote {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
