"""The torch path of `attribute` for segmentation models: one batch, the decoder layers, a region.

`SegPass` resolves the post-bottleneck layers, the explained class and region of each image
(docs/segmentation.md), and computes once, lazily, what the methods need: the scores, every
decoder layer's activation, their gradients of the region score in one backward, and
batched re-evaluations with a decoder layer's kernels switched off.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import AttributionError
from verifier.attribution.torch_pass import hooked
from verifier.probe.base import ProbeError
from verifier.probe.torch_backend import decoder_layers
from verifier.spec import ModelSpec, SpecError, check_output_shape

__all__ = ["SegPass", "segment_targets", "region_score", "upsample", "per_layer_sum"]

#: resolved decoder layers per module and (request, C, H, W): the dry run costs a forward
_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class SegPass:
    """One batch through a segmentation nn.Module for the attribution methods.

    x: float32 (N, C, H, W); layers: "auto" (the post-bottleneck layers) or comma-separated
    module names; target: None (the largest predicted non-background class), an int, (N,)
    ints, or a user mask (H', W') / (N, H', W') at the output's resolution (docs/segmentation.md).
    """

    def __init__(self, module: nn.Module, x: np.ndarray | torch.Tensor, layers: str,
                 target: object, spec: ModelSpec | None = None) -> None:
        self.model, self.spec = module, spec
        params = list(module.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        self.x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x,
                                 dtype=dtype).to(self.device)  # float64 for a float64 model
        if self.x.ndim != 4 or self.x.shape[0] == 0:
            raise AttributionError(f"x must be a non-empty float32 (N, C, H, W) batch, got "
                                   f"shape {tuple(self.x.shape)}")
        self.layers = _resolve(self, layers)
        named = dict(module.named_modules())
        self.modules = [named[n] for n in self.layers]
        self.layer = ",".join(self.layers)  # the choice, as Explanation reports it
        self._target = target
        self._base: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._grads: list[torch.Tensor] | None = None
        self.targets: torch.Tensor | None = None
        self.region: torch.Tensor | None = None

    # ------------------------------------------------------------------ shared quantities
    def base(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(scores (N, K, H', W'), [decoder activation (N, k_l, h_l, w_l) per layer]), once;
        resolves the explained classes `targets` (N,) and regions `region` (N, H', W')."""
        if self._base is None:
            acts: list[torch.Tensor] = [torch.empty(0)] * len(self.modules)
            with hooked(*[(m, "forward", _grab(acts, i)) for i, m in enumerate(self.modules)]):
                with torch.no_grad():
                    scores = self.scores(self.model(self.x))
            self.targets, self.region = segment_targets(self._target, scores, self.spec)
            self._base = (scores, [a.detach() for a in acts])
        return self._base

    def gradients(self) -> list[torch.Tensor]:
        """d y / d A_l (N, k_l, h_l, w_l) for every decoder layer, y the region score, in one
        forward and one backward (the first layer's activation re-rooted as a leaf)."""
        if self._grads is None:
            self.base()
            box: list[torch.Tensor] = [torch.empty(0)] * len(self.modules)

            def first(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                box[0] = output.detach().requires_grad_(True)
                return box[0].clone()

            def later(i: int):
                def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                    box[i] = output
                    return output.clone()  # a later in-place op cannot touch the kept tensor
                return hook

            pairs = [(self.modules[0], "forward", first)]
            pairs += [(m, "forward", later(i)) for i, m in enumerate(self.modules) if i > 0]
            with hooked(*pairs), torch.enable_grad():
                y = self.region_score(self.scores(self.model(self.x)), torch.arange(len(self.x)))
                self._grads = list(torch.autograd.grad(y.sum(), box))
        return self._grads

    def region_score(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(R,) y = sum_ij region[ij] * scores[c, ij] for rows of images `rows` (R,)."""
        self.base()
        return region_score(scores, self.targets, self.region, rows)

    # ------------------------------------------------------------------ re-evaluation
    @torch.no_grad()
    def ablate(self, layer: int, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Region scores (R,) with decoder layer `layer`'s kernels scaled by `keep` (R, k_l):
        row r re-runs image rows[r] with channel k multiplied by keep[r, k] (0 switches a
        kernel off), so every later layer, skip connections included, sees that image."""
        self.base()
        out = []
        step = _rows(self.x[0].numel() * 4)  # decoder activations dwarf the input
        for lo in range(0, len(rows), step):
            k = keep[lo:lo + step].to(self.x.dtype)[:, :, None, None]
            scale = (lambda m, i, o, k=k: o * k)  # noqa: E731 - the scaled output replaces it
            with hooked((self.modules[layer], "forward", scale)):
                s = self.scores(self.model(self.x[rows[lo:lo + step]]))
            out.append(self.region_score(s, rows[lo:lo + step]))
        return torch.cat(out)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain scores (R, K, H', W') for a batch of (possibly masked) inputs, chunked."""
        step = _rows(x[0].numel() * 4)
        return torch.cat([self.scores(self.model(x[lo:lo + step]))
                          for lo in range(0, x.shape[0], step)])

    def scores(self, out: object) -> torch.Tensor:
        """The model output, checked to be (N, K, H', W') class scores."""
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else (type(out).__name__,)
        try:
            check_output_shape(self.spec, shape) if self.spec is not None else \
                check_output_shape(_SEG, shape)
        except SpecError as e:
            raise AttributionError(str(e)) from None
        return out  # type: ignore[return-value]

    def output_size(self) -> tuple[int, int]:
        """(H', W'): the grid of the scores, where segmentation maps live."""
        s = self.base()[0]
        return int(s.shape[2]), int(s.shape[3])


def segment_targets(target: object, scores: torch.Tensor,
                    spec: ModelSpec | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (N,) long, regions (N, H', W') float64) for a target (docs/segmentation.md).

    None: per image, the class covering most predicted pixels, the spec's background class
    excluded (class 0 for a bare module), its predicted region. An int or (N,) ints: that
    class's predicted region. A mask (H', W') or (N, H', W') (bool or weights): that region,
    explaining the class predicted most inside it (background excluded while another is).
    """
    n, k = int(scores.shape[0]), int(scores.shape[1])
    pred = scores.argmax(dim=1)  # (N, H', W')
    bg = spec.background_class if spec is not None else 0
    t = target if target is None or isinstance(target, torch.Tensor) else np.asarray(target)
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    if t is not None and t.ndim >= 2:
        mask = torch.as_tensor(np.array(np.broadcast_to(t, (n, *t.shape)) if t.ndim == 2 else t,
                                        dtype=np.float64), device=scores.device)
        if mask.shape != pred.shape:
            raise AttributionError(f"a mask target must be (H', W') or (N, H', W') at the output "
                                   f"grid {tuple(pred.shape[1:])}, got {t.shape}")
        return _largest(pred, k, bg, mask), mask
    if t is None:
        cls = _largest(pred, k, bg, torch.ones_like(pred, dtype=torch.float64))
    else:
        if t.ndim == 0:
            t = np.full(n, t)
        if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
            raise AttributionError(f"target must be None, an int, {n} ints or a mask, got {target!r}")
        if t.min() < 0 or t.max() >= k:
            raise AttributionError(f"target classes must lie in [0, {k}), got {t.tolist()[:8]}")
        cls = torch.as_tensor(t, dtype=torch.long, device=scores.device)
    region = (pred == cls[:, None, None]).double()
    return cls, region


def region_score(scores: torch.Tensor, targets: torch.Tensor, region: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    """(R,) float64 y_r = sum_ij region[rows[r], ij] * scores[r, targets[rows[r]], ij] for
    scores (R, K, H', W') of rows of the images `rows`."""
    c = targets[rows]
    picked = scores[torch.arange(len(rows), device=scores.device), c]  # (R, H', W')
    return (picked.double() * region[rows]).sum(dim=(1, 2))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H', W') float64, bilinear (align_corners=False); unchanged at size."""
    m = maps.double()
    if tuple(m.shape[1:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def per_layer_sum(p: SegPass, layer_map) -> np.ndarray:
    """(N, H', W') float64: sum over decoder layers l of upsample(layer_map(A_l, dy/dA_l)),
    `layer_map` giving (N, h_l, w_l) from activation and gradient (N, k_l, h_l, w_l)."""
    _, acts = p.base()
    total = None
    for a, g in zip(acts, p.gradients()):
        m = upsample(layer_map(a.double(), g.double()), p.output_size())
        total = m if total is None else total + m
    return total.cpu().numpy()


def _largest(pred: torch.Tensor, k: int, bg: int | None, weight: torch.Tensor) -> torch.Tensor:
    """(N,) the class with most (weighted) predicted pixels, `bg` only when nothing else is."""
    area = torch.zeros(pred.shape[0], k, dtype=torch.float64, device=pred.device)
    area.scatter_add_(1, pred.flatten(1), weight.flatten(1))
    if bg is not None:
        others = area.clone()
        others[:, bg] = -1.0
        return torch.where(others.max(dim=1).values > 0, others.argmax(dim=1), area.argmax(dim=1))
    return area.argmax(dim=1)


def _grab(box: list[torch.Tensor], i: int):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        box[i] = output.detach()
    return hook


def _resolve(p: SegPass, layers: str) -> list[str]:
    """The decoder layers of p.model for a request, cached per module and input shape; the
    model's output is checked to be (N, K, H', W') first, so a classifier is refused by shape."""
    chw = tuple(p.x.shape[1:])
    per_module = _LAYER_CACHE.setdefault(p.model, {})
    key = (layers, chw)
    if key not in per_module:
        if len(chw) != 3 or chw[0] not in (1, 3):
            raise AttributionError(f"x must be (N, 1 or 3, H, W), got (N, {chw})")
        from verifier.probe.torch_backend import probe_state_restored

        with probe_state_restored(p.model), torch.no_grad():
            p.scores(p.model(torch.zeros((1, *chw), dtype=p.x.dtype, device=p.device)))
        spec = ModelSpec(classes=("_",), size=chw[1:], channels=chw[0], module=p.model)
        try:
            per_module[key] = decoder_layers(p.model, spec, p.device, layers)
        except ProbeError as e:
            raise AttributionError(str(e)) from None
    return per_module[key]


#: stands in for a bare module's spec when checking its output is (N, K, H', W')
_SEG = ModelSpec(classes=("_",), size=(1, 1), module=nn.Identity(), task="segmentation")
