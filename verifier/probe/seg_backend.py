"""A segmentation nn.Module as the gate, reference store and audit see a model: one ProbeResult.

Image-level scores stand in for logits (each class's predicted area), the explained class is
the largest predicted non-background region, and the attention map is the adapted Grad-CAM
of that region's score summed over the decoder layers (docs/segmentation.md), so per-class
reference maps, the seven measures and the calibration apply unchanged.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from verifier.probe.base import ProbeError, ProbeResult
from verifier.probe.torch_backend import (_NONNEGATIVE, _channel_mean_abs, conv_blocks,
                                          decoder_layers, probe_state_restored, resolve_layers)
from verifier.spec import ModelSpec, SpecError, check_output_shape, model_fingerprint

__all__ = ["SegmentationProbe", "image_scores", "output_mask"]

class SegmentationProbe:
    """Probe for an in-memory segmentation `torch.nn.Module` (spec task "segmentation").

    run(x) -> ProbeResult with logits = `image_scores` (N, K), cam = adapted Grad-CAM (N, H', W')
    of the explained class's predicted region, features = the last decoder layer's channel
    means, early map / stats and conv-block stats as the classifier probe computes them.
    """

    gradient_method = "autograd-decoder-sum"

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        if spec.module is None or not isinstance(spec.module, nn.Module):
            raise ProbeError("the gate takes segmentation models as an nn.Module for now (its "
                             "attention map needs gradients); give ModelSpec(module=...)")
        self.spec, self.model = spec, spec.module
        params = list(self.model.parameters())
        default = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device) if device is not None else default
        if params and self.device != default:
            self.model.to(self.device)
        self.fingerprint = model_fingerprint(spec)
        self.decoder = decoder_layers(self.model, spec, self.device, spec.target_layer)
        self.target_layer = ",".join(self.decoder)
        plain = replace(spec, target_layer="auto")
        _, self.early_layer, _ = resolve_layers(self.model, plain, self.device)
        self.block_layers = conv_blocks(self.model, plain, self.device)
        self._modules = dict(self.model.named_modules())

    def describe(self) -> str:
        return (f"segmentation torch backend: Grad-CAM of the explained region summed over "
                f"decoder layers {', '.join(self.decoder)}; early layer '{self.early_layer}'")

    def run(self, x: np.ndarray | torch.Tensor, classes: np.ndarray | None = None) -> ProbeResult:
        """One batched pass over preprocessed (N, C, H, W) float32 images; `classes` (N,)
        picks the class whose predicted region each map explains."""
        xt = self._input(x)
        acts: list[torch.Tensor] = [torch.empty(0)] * len(self.decoder)
        box: dict[str, torch.Tensor] = {}

        def keep(i: int):
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                acts[i] = output.detach().requires_grad_(True) if i == 0 else output
                return acts[i].clone()
            return hook

        def early(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = output.detach()
            box["map"] = _channel_mean_abs(a, nonnegative=isinstance(module, _NONNEGATIVE))
            box["stats"] = a.mean(dim=(2, 3))

        def block(i: int):
            return lambda m, inp, out: box.__setitem__(f"b{i}", out.detach().mean(dim=(2, 3)))

        handles = [self._modules[n].register_forward_hook(keep(i)) for i, n in enumerate(self.decoder)]
        handles.append(self._modules[self.early_layer].register_forward_hook(early))
        handles += [self._modules[n].register_forward_hook(block(i))
                    for i, n in enumerate(self.block_layers)]
        with probe_state_restored(self.model):
            try:
                with torch.enable_grad():
                    scores = self._scores(self.model(xt))
                logits = image_scores(scores.detach(), self.spec.background_class)
                cls = self._classes(logits, classes)
                region = (scores.detach().argmax(dim=1) == cls[:, None, None]).to(scores.dtype)
                picked = scores[torch.arange(len(cls), device=scores.device), cls]
                grads = torch.autograd.grad((picked * region).sum(), acts)
            finally:
                for h in handles:
                    h.remove()
        with torch.no_grad():
            size = tuple(scores.shape[2:])
            cam = None
            for a, g in zip(acts, grads):
                m = (g.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(dim=1).clamp_min(0)
                m = m if tuple(m.shape[1:]) == size else F.interpolate(
                    m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                cam = m if cam is None else cam + m
            return ProbeResult(
                logits=logits.float().cpu().numpy(),
                features=acts[-1].detach().mean(dim=(2, 3)).float().cpu().numpy(),
                cam=cam.float().cpu().numpy(),
                cam_class=cls.cpu().numpy().astype(np.int64),
                early_map=box["map"].float().cpu().numpy(),
                early_stats=box["stats"].float().cpu().numpy(),
                block_stats=tuple(box[f"b{i}"].float().cpu().numpy()
                                  for i in range(len(self.block_layers))))

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Forward pass only: (N, K) float32 image-level scores (`image_scores`)."""
        xt = self._input(x)
        with probe_state_restored(self.model), torch.no_grad():
            scores = self._scores(self.model(xt))
        return image_scores(scores, self.spec.background_class).float().cpu().numpy()

    def kept_logits(self, x: np.ndarray | torch.Tensor, keep: np.ndarray) -> np.ndarray:
        """`logits(x)` counting only the pixels where `keep` (N, H, W) bool at the input's
        resolution is True: what a segmenter says about the part of the image left in place."""
        xt = self._input(x)
        with probe_state_restored(self.model), torch.no_grad():
            scores = self._scores(self.model(xt))
        mask = output_mask(keep, tuple(scores.shape[2:])).to(scores.device)
        return image_scores(scores, self.spec.background_class, mask).float().cpu().numpy()

    def _input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        xt = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        if xt.ndim != 4 or xt.shape[1] != self.spec.channels:
            raise ProbeError(f"expected input (N, {self.spec.channels}, H, W), got {tuple(xt.shape)}")
        return xt

    def _scores(self, out: object) -> torch.Tensor:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else (type(out).__name__,)
        try:
            check_output_shape(self.spec, shape)
        except SpecError as e:
            raise ProbeError(str(e)) from None
        return out  # type: ignore[return-value]

    def _classes(self, logits: torch.Tensor, classes: np.ndarray | None) -> torch.Tensor:
        if classes is None:
            return logits[:, : self.spec.num_classes].argmax(dim=1)
        cls = torch.as_tensor(np.asarray(classes), dtype=torch.long, device=logits.device)
        if cls.shape != (logits.shape[0],):
            raise ProbeError(f"classes must have shape ({logits.shape[0]},)")
        return cls


def image_scores(scores: torch.Tensor, background: int | None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K, H', W') class scores -> (N, K) float64 image-level scores: the log of each class's
    predicted area share, (n_k + 1) / (H' W' + K); the background's share is set to half the
    smallest possible, so it always ranks last. Their argmax is the class `attribute` explains
    by default (ties to the lower index, as there), except on an image where nothing but
    background is predicted: the gate then explains the first other class, whose region is
    empty, so its map is 0 and unlike every reference (the background has no reference).
    `keep`: (N, H', W') bool, count only those pixels (the shares are then of the kept area)."""
    n, k = scores.shape[:2]
    pred = scores.argmax(dim=1).flatten(1)
    weight = torch.ones_like(pred, dtype=torch.float64)
    if keep is not None:
        weight = keep.reshape(n, -1).to(device=scores.device, dtype=torch.float64)
    area = torch.zeros(n, k, dtype=torch.float64, device=scores.device)
    area.scatter_add_(1, pred, weight)
    share = (area + 1.0) / (weight.sum(dim=1, keepdim=True) + k)
    if background is not None:
        share[:, background] = 0.5 / (weight.sum(dim=1) + k)
    return share.log()


def output_mask(keep: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool at the input's resolution -> (N, H', W') at the output's (nearest pixel)."""
    keep = np.asarray(keep, dtype=bool)
    rows = (np.arange(size[0]) * keep.shape[1]) // size[0]
    cols = (np.arange(size[1]) * keep.shape[2]) // size[1]
    return torch.from_numpy(np.ascontiguousarray(keep[:, rows][:, :, cols]))
