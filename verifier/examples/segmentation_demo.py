"""The demo's segmentation case: a small U-Net on canvases of real MNIST digits, explained and gated.

Trains (or reuses) `SmallUNet`, exports it to ONNX with a `task = "segmentation"` spec,
explains held-out canvases with KWC from the file and with the adapted Grad-CAM from the
module (Prediction / Image Preserved), builds a bundle and gates held-out canvases against
real photos (docs/segmentation.md).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["segmentation_case", "SEG_SPEC_TOML"]

SEG_SPEC_TOML = ('[model]\npath = "{path}"\ntask = "segmentation"\nbackground_class = 0\n'
                 'classes = ["background", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\n'
                 '[input]\nsize = [32, 48]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n')


def segmentation_case(out: Path, x: np.ndarray, y: np.ndarray, seed: int,
                      say: Callable[[str], None], n_explain: int = 32) -> dict[str, Any]:
    """Run the case under out/segmentation; returns the figures for the demo's reports.

    x, y: the demo's MNIST digits; 0-2999 train the U-Net and its reference, 3000-3599
    calibrate, 3600- build the held-out canvases.
    """
    from verifier.attribution import explain, predictor, preserved
    from verifier.bundle.builder import build_bundle
    from verifier.examples.datasets import digit_canvases, ood_images
    from verifier.examples.zoo import canvas_spec, preprocess_uint8
    from verifier.probe.onnx_backend import export_onnx
    from verifier.runtime.gatekeeper import Gatekeeper

    root = out / "segmentation"
    root.mkdir(parents=True, exist_ok=True)
    ti, tm = digit_canvases(x[:3000], y[:3000], 1500, seed=seed)
    model = _trained_unet(out / "cache", ti, tm, seed, say)
    spec = canvas_spec(model)
    export_onnx(model, spec, root / "unet.onnx")
    (root / "unet.toml").write_text(SEG_SPEC_TOML.format(path="unet.onnx"))
    hi, hm = digit_canvases(x[3600:], y[3600:], 200, seed=seed + 1)

    xs = preprocess_uint8(hi[:n_explain]).numpy()
    seg = predictor(model, 1, spec.size)
    from_file = explain(root / "unet.toml", xs, ["kwc"])
    from_module = explain(spec, xs, ["gradcam"])
    figures: dict[str, Any] = {"segmentation_layers": from_module.layer}
    for name, e in (("kwc", from_file), ("gradcam", from_module)):
        kept = preserved(seg, xs, e.maps[name], e.targets, e.region)
        figures[f"segmentation_{name}_pp"] = float(np.nanmedian(kept.prediction_preserved))
        figures[f"segmentation_{name}_ip"] = float(np.median(kept.image_preserved))

    ci, cm = digit_canvases(x[3000:3600], y[3000:3600], 400, seed=seed + 2)
    bundle = build_bundle(spec, (ti[:800], _dominant(tm[:800])), root / "bundle",
                          calibration=(ci, _dominant(cm)), seed=seed, overwrite=True)
    gate = Gatekeeper(bundle)
    canvases = gate.gate(hi)
    photos = gate.gate(ood_images("photos", 200, size=(32, 48), seed=seed))
    figures["segmentation_accepted_canvases"] = float(np.mean([d.accepted for d in canvases]))
    figures["segmentation_rejected_photos"] = float(np.mean([not d.accepted for d in photos]))
    (root / "segmentation.json").write_text(json.dumps(figures, indent=2))
    return figures


def format_lines(reports: dict[str, Any]) -> list[str]:
    """The demo table's segmentation lines (empty when the case did not run)."""
    if "segmentation_kwc_pp" not in reports:
        return []
    r = reports
    return [f"segmentation (U-Net, decoder layers {r['segmentation_layers']}): median Prediction "
            f"Preserved / Image Preserved kwc {r['segmentation_kwc_pp']:.2f} / "
            f"{r['segmentation_kwc_ip']:.2f}, adapted gradcam {r['segmentation_gradcam_pp']:.2f} / "
            f"{r['segmentation_gradcam_ip']:.2f}; gate accepts "
            f"{r['segmentation_accepted_canvases']:.0%} of held-out canvases, rejects "
            f"{r['segmentation_rejected_photos']:.0%} of photos"]


def _dominant(masks: np.ndarray) -> np.ndarray:
    """Each canvas's image-level label: the class of its largest true digit region."""
    area = np.stack([(masks == k).sum(axis=(1, 2)) for k in range(11)], axis=1)
    area[:, 0] = -1
    return area.argmax(axis=1)


def _trained_unet(cache: Path, images: np.ndarray, masks: np.ndarray, seed: int,
                  say: Callable[[str], None]) -> Any:
    """Train SmallUNet (10 epochs, one-cycle schedule, one thread), or load the weights an earlier run cached."""
    import torch

    from verifier.examples.zoo import SmallUNet, train_segmenter

    key = hashlib.sha256(images.tobytes() + masks.tobytes() + f"{seed}-10-onecycle".encode()).hexdigest()[:16]
    path = cache / f"smallunet-{key}.npz"
    torch.manual_seed(seed)
    model = SmallUNet()
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
        say(f"    reusing cached weights {path}")
        return model.eval()
    t = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this small a model trains fastest on one thread
    try:
        train_segmenter(model, images, masks, seed=seed)
    finally:
        torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    tmp.replace(path)
    say(f"    trained in {time.perf_counter() - t:.0f} s")
    return model
