"""`attribute` and `attribute_many`: one verb for every registered method, on either backend.

The model is an nn.Module (torch path), a ModelSpec, or a path to a spec TOML / an .onnx
or TorchScript file (onnxruntime path; TorchScript is exported to ONNX in memory).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from verifier.attribution.registry import (METHODS, AttributionError, get_method, onnx_methods,
                                           segmentation_methods)
from verifier.spec import ModelSpec, load_spec

__all__ = ["attribute", "attribute_many", "explain", "Explanation", "predictor", "backend_of",
           "check_task"]


@dataclass
class Explanation:
    """Maps of several methods for one batch, with the classes they explain.

    maps: method -> float64 (N, h, w); targets: (N,) int64 explained class;
    probabilities: (N, K) softmax of the model's outputs (segmentation: the per-pixel
    softmax averaged over the explained region); layer: the resolved target layer
    (segmentation: the decoder layers, comma-separated); task: "classification" or
    "segmentation"; region: segmentation only, the explained region (N, H', W') float64.
    """

    maps: dict[str, np.ndarray]
    targets: np.ndarray
    probabilities: np.ndarray
    layer: str
    task: str = "classification"
    region: np.ndarray | None = None


def attribute(model: Any, x: np.ndarray, method: str, target: Any = None,
              layer: str = "auto") -> np.ndarray:
    """The raw attribution map of `method`, float64 (N, h, w).

    x: preprocessed float32 (N, C, H, W). target: None (the predicted real class), an int,
    or (N,) ints. layer: the target layer ("auto" = the last spatial conv output). Maps
    are not normalised; CAM-family maps are at the layer's grid, gradient maps at H x W.
    """
    return attribute_many(model, x, [method], target=target, layer=layer)[method]


def attribute_many(model: Any, x: np.ndarray, methods: Sequence[str], target: Any = None,
                   layer: str = "auto") -> dict[str, np.ndarray]:
    """Several methods over one pass: the shared quantities (logits, target activation,
    tail-only layer gradient) are computed once, for the union of the methods' needs."""
    return explain(model, x, methods, target=target, layer=layer).maps


def explain(model: Any, x: np.ndarray, methods: Sequence[str], target: Any = None,
            layer: str = "auto") -> Explanation:
    """`attribute_many` plus the explained classes, the output probabilities and the layer."""
    from scipy.special import softmax

    chosen = [get_method(m) for m in dict.fromkeys(methods)]
    if not chosen:
        raise AttributionError("no attribution method requested")
    needs = frozenset().union(*(m.needs for m in chosen))
    kind, obj, spec, bare = _resolve_model(model, x)
    task = _task(kind, obj, spec, x)
    check_task(task, [m.name for m in chosen])
    if task == "segmentation":
        return _explain_segmentation(kind, obj, spec, x, chosen, target, layer)
    if kind == "onnx":
        check_backend(spec, [m.name for m in chosen])
        from verifier.attribution.onnx_pass import OnnxPass

        p = OnnxPass(spec, np.asarray(x), layer, target, needs, bare=bare)
        maps = {m.name: np.asarray(m.onnx(p), dtype=np.float64) for m in chosen}
        return Explanation(maps, p.targets, softmax(p.logits, axis=1), p.layer)
    from verifier.attribution.torch_pass import TorchPass
    from verifier.probe.torch_backend import probe_state_restored

    with probe_state_restored(obj):
        p = TorchPass(obj, x, layer, target, needs, spec=spec)
        maps = {m.name: np.asarray(m.torch(p), dtype=np.float64) for m in chosen}
        return Explanation(maps, p.targets.cpu().numpy().astype(np.int64),
                           softmax(p.logits.double().cpu().numpy(), axis=1), p.layer)


def check_task(task: str, methods: Sequence[str]) -> None:
    """Raise AttributionError when a method cannot explain a model of this task."""
    if task == "segmentation":
        refused = [m for m in methods if get_method(m).segmentation is None]
        if refused:
            raise AttributionError(
                f"{', '.join(refused)} cannot explain a segmentation model (output (N, K, H, W)); "
                f"the methods that can: {', '.join(segmentation_methods())}")
    else:
        refused = [m for m in methods if not get_method(m).classification]
        if refused:
            raise AttributionError(
                f"{', '.join(refused)} explains segmentation models only; this model is a "
                f"classifier (output (N, K)). Set [model] task = \"segmentation\" for a model "
                f"that returns (N, K, H, W) class scores")


def _explain_segmentation(kind: str, obj: Any, spec: ModelSpec | None, x: np.ndarray,
                          chosen: list, target: Any, layer: str) -> Explanation:
    if kind == "onnx":
        assert spec is not None
        check_backend(spec, [m.name for m in chosen])
        from verifier.attribution.seg_onnx import OnnxSegPass

        q = OnnxSegPass(spec, np.asarray(x), layer, target)
        maps = {m.name: np.asarray(m.segmentation_onnx(q), dtype=np.float64) for m in chosen}
        return _seg_explanation(q, maps)
    from verifier.attribution.seg_pass import SegPass
    from verifier.probe.torch_backend import probe_state_restored

    with probe_state_restored(obj):
        p = SegPass(obj, x, layer, target, spec=spec)
        maps = {m.name: np.asarray(m.segmentation(p), dtype=np.float64) for m in chosen}
        return _seg_explanation(p, maps)


def _seg_explanation(p: Any, maps: dict[str, np.ndarray]) -> Explanation:
    """The Explanation of a segmentation pass: per-pixel softmax averaged over each region."""
    import torch

    scores, _ = p.base()
    probs = torch.softmax(scores.double(), dim=1)  # (N, K, H', W')
    area = p.region.sum(dim=(1, 2)).clamp_min(1e-12)
    mean = (probs * p.region[:, None]).sum(dim=(2, 3)) / area[:, None]
    return Explanation(maps, p.targets.cpu().numpy().astype(np.int64), mean.cpu().numpy(),
                       p.layer, "segmentation", p.region.cpu().numpy())


def _task(kind: str, obj: Any, spec: ModelSpec | None, x: np.ndarray) -> str:
    """The spec's task; for a bare nn.Module, read from the rank of its output on one image."""
    if spec is not None or kind == "onnx":
        return spec.task if spec is not None else "classification"
    import torch

    from verifier.probe.torch_backend import probe_state_restored

    params = list(obj.parameters())
    dev = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    xs = np.asarray(x)
    if xs.ndim != 4 or len(xs) == 0:
        raise AttributionError(f"x must be a non-empty float32 (N, C, H, W) batch, got shape "
                               f"{xs.shape}")
    with probe_state_restored(obj), torch.no_grad():
        out = obj(torch.as_tensor(xs[:1], dtype=dtype, device=dev))
    return "segmentation" if isinstance(out, torch.Tensor) and out.ndim == 4 else "classification"


def predictor(model: Any, channels: int, size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """A plain batched forward: float32 (R, C, H, W) -> float64 logits (R, K), in eval mode
    with the model's state restored after each call (for faithfulness curves)."""
    probe_x = np.zeros((1, channels, *size), dtype=np.float32)
    kind, obj, spec, bare = _resolve_model(model, probe_x)
    if kind == "onnx":
        from verifier.attribution.onnx_pass import OnnxPass

        p = OnnxPass(spec, probe_x, "auto", None, frozenset(), bare=bare)
        return p.forward
    import torch

    from verifier.probe.torch_backend import probe_state_restored

    dev = next(iter(obj.parameters()), torch.zeros(())).device

    def forward(xb: np.ndarray) -> np.ndarray:
        with probe_state_restored(obj), torch.no_grad():
            t = torch.as_tensor(np.asarray(xb, dtype=np.float32), device=dev)
            return torch.cat([obj(t[i:i + 256]) for i in range(0, len(t), 256)]).double().cpu().numpy()

    return forward


def check_backend(spec: ModelSpec, methods: Sequence[str]) -> None:
    """Raise AttributionError when a file-backed spec asks for methods ONNX cannot run."""
    if spec.module is not None:
        return
    if spec.task == "segmentation":
        refused = [m for m in methods if get_method(m).segmentation_onnx is None]
        if refused:
            runs = [m.name for m in METHODS.values() if m.segmentation_onnx is not None]
            raise AttributionError(
                f"{', '.join(refused)} cannot run on segmentation {spec.backend} file "
                f"{spec.path.name}: they need gradients onnxruntime does not give. It runs: "
                f"{', '.join(runs)}. Give the nn.Module for the others")
        return
    refused = [m for m in methods if get_method(m).onnx is None]
    if refused:
        raise AttributionError(
            f"{', '.join(refused)} cannot run on {spec.backend} file {spec.path.name}: "
            f"they need gradients onnxruntime does not give. The ONNX backend runs: "
            f"{', '.join(onnx_methods())}. Give the nn.Module for the others")


def backend_of(model: Any) -> str:
    """'torch' for an nn.Module (or a spec holding one), else 'onnx'."""
    if isinstance(model, ModelSpec):
        return "torch" if model.module is not None else "onnx"
    try:
        from torch import nn

        if isinstance(model, nn.Module):
            return "torch"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "onnx"


def _resolve_model(model: Any, x: np.ndarray) -> tuple[str, Any, ModelSpec | None, bool]:
    """(backend, module or None, spec or None, bare) for the accepted model forms."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix.lower() == ".toml":
            model = load_spec(path)
        else:
            xs = np.shape(x)
            if len(xs) != 4:
                raise AttributionError(f"x must be (N, C, H, W), got shape {xs}")
            spec = ModelSpec(classes=("_",), size=(int(xs[2]), int(xs[3])),
                             channels=int(xs[1]), path=path)
            return "onnx", None, spec, True
    if isinstance(model, ModelSpec):
        if model.module is not None:
            return "torch", model.module, model, False
        return "onnx", None, model, False  # .onnx, or TorchScript exported to ONNX
    if backend_of(model) == "torch":
        return "torch", model, None, False
    raise AttributionError(f"model must be an nn.Module, a ModelSpec or a path to a spec "
                           f"TOML / .onnx / TorchScript file, got {type(model).__name__}")
