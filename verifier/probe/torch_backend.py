"""PyTorch backend: one batched pass of an nn.Module yielding logits, features, Grad-CAM and early maps.

Grad-CAM back-propagates only through the layers after the target layer: the
target activation is re-rooted as a fresh leaf inside its forward hook and the
parameters are frozen, so autograd records nothing before it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from verifier.probe.base import ProbeError, ProbeResult, wants_block_stds
from verifier.spec import ModelSpec, model_fingerprint

__all__ = ["TorchProbe", "resolve_layers", "probe_state_restored", "decoder_layers"]

#: modules whose output is never negative, so |output| = output
_NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus)

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Mish, nn.PReLU, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


class TorchProbe:
    """Probe for an in-memory `torch.nn.Module` (the spec's `module`)."""

    gradient_method = "autograd-tail"

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        if spec.module is None or not isinstance(spec.module, nn.Module):
            raise ProbeError("TorchProbe needs a spec whose `module` is a torch.nn.Module")
        self.spec = spec
        self.model: nn.Module = spec.module
        params = list(self.model.parameters())
        default = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device) if device is not None else default
        if params and self.device != default:
            self.model.to(self.device)
        self.fingerprint = model_fingerprint(spec)
        layers = resolve_layers(self.model, spec, self.device)
        self.target_layer, self.early_layer, self.feature_layer = layers
        #: output of every conv block (a Conv2d advanced through its BN/activation), in order
        self.block_layers = conv_blocks(self.model, spec, self.device)
        #: their channel standard deviations too (only for blocks narrow enough: `wants_block_stds`)
        self.block_stds = wants_block_stds(_channels(self.model, spec, self.device, self.block_layers))
        self._modules = dict(self.model.named_modules())

    def describe(self) -> str:
        """Which layers the probe uses and how gradients are computed."""
        return (f"torch backend: Grad-CAM layer '{self.target_layer}', early layer "
                f"'{self.early_layer}', features from "
                f"'{self.feature_layer or 'spatial mean of the Grad-CAM layer'}', "
                f"gradients by autograd through the tail only")

    def run(self, x: np.ndarray | torch.Tensor, classes: np.ndarray | None = None) -> ProbeResult:
        """One batched pass over preprocessed (N, C, H, W) float32 images."""
        xt = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        if xt.ndim != 4 or xt.shape[1] != self.spec.channels:
            raise ProbeError(f"expected input (N, {self.spec.channels}, H, W), got {tuple(xt.shape)}")
        cap = _Capture(self.block_stds)
        with probe_state_restored(self.model):
            handles = [
                self._modules[self.target_layer].register_forward_hook(cap.target_hook),
                self._modules[self.early_layer].register_forward_hook(cap.early_hook),
            ]
            if self.feature_layer:
                handles.append(self._modules[self.feature_layer].register_forward_pre_hook(cap.feature_hook))
            handles += [self._modules[name].register_forward_hook(cap.block_hook(i))
                        for i, name in enumerate(self.block_layers)]
            try:
                with torch.enable_grad():
                    logits = self.model(xt)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ProbeError(_not_logits(self.spec, logits))
                cls = self._classes(logits, classes)
                if cap.target is None or cap.early_map is None:
                    raise ProbeError("the probed layers did not run in the forward pass")
                chosen = logits.gather(1, cls[:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, cap.target)
            finally:
                for h in handles:
                    h.remove()
        with torch.no_grad():
            act = cap.target.detach()
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * act).sum(dim=1))
            feats = cap.features if cap.features is not None else act.mean(dim=(2, 3))
            return ProbeResult(
                logits=logits.detach().float().cpu().numpy(),
                features=feats.float().cpu().numpy(),
                cam=cam.float().cpu().numpy(),
                cam_class=cls.cpu().numpy().astype(np.int64),
                early_map=cap.early_map.float().cpu().numpy(),
                early_stats=cap.early_stats.float().cpu().numpy(),
                block_stats=tuple(cap.blocks[i].float().cpu().numpy()
                                  for i in range(len(self.block_layers))),
                block_stds=tuple(cap.stds[i].float().cpu().numpy()
                                 for i in range(len(self.block_layers)) if self.block_stds),
            )

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Forward pass only: (N, K_out) float32 logits of preprocessed (N, C, H, W) images."""
        xt = torch.as_tensor(x, dtype=torch.float32).to(self.device, non_blocking=True)
        with probe_state_restored(self.model), torch.no_grad():
            out = self.model(xt)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ProbeError(_not_logits(self.spec, out))
        return out.float().cpu().numpy()

    def _classes(self, logits: torch.Tensor, classes: np.ndarray | None) -> torch.Tensor:
        if classes is not None:
            cls = torch.as_tensor(np.asarray(classes), dtype=torch.long, device=logits.device)
            if cls.shape != (logits.shape[0],):
                raise ProbeError(f"classes must have shape ({logits.shape[0]},)")
            return cls
        real = logits.detach()[:, : self.spec.num_classes]
        if self.spec.garbage_class is not None and self.spec.garbage_class < self.spec.num_classes:
            real = real.clone()
            real[:, self.spec.garbage_class] = -torch.inf
        return real.argmax(dim=1)


class _Capture:
    """Forward hooks' scratch space for one pass."""

    def __init__(self, stds: bool = False) -> None:
        self.with_stds = stds
        self.stds: dict[int, torch.Tensor] = {}
        self.target: torch.Tensor | None = None
        self.early_map: torch.Tensor | None = None
        self.early_stats: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.blocks: dict[int, torch.Tensor] = {}

    def block_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            out = output.detach()
            mean = out.mean(dim=(2, 3), keepdim=True)  # now: later ops may be in place
            self.blocks[i] = mean.flatten(1)
            if self.with_stds:  # two passes, as exact as the mean: the deviations' L2 norm / sqrt(h w)
                # (torch.std_mean took as long as a SmallCNN's whole forward pass)
                self.stds[i] = torch.linalg.vector_norm(out - mean, dim=(2, 3)) / math.sqrt(out.shape[2] * out.shape[3])
        return hook

    def target_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # Re-root the graph here: with frozen parameters nothing before this leaf is recorded.
        self.target = output.detach().requires_grad_(True)
        # A clone, so a later in-place op (ReLU(inplace=True)) cannot modify the leaf.
        return self.target.clone()

    def early_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Summarise now: a later in-place op could overwrite this storage.
        a = output.detach()
        self.early_map = _channel_mean_abs(a, nonnegative=isinstance(module, _NONNEGATIVE))
        self.early_stats = a.mean(dim=(2, 3))

    def feature_hook(self, module: nn.Module, inputs: tuple) -> None:
        self.features = inputs[0].detach().flatten(1)


def _not_logits(spec: ModelSpec, out: object) -> str:
    """Why an output is not (N, K) logits, naming the shape found."""
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    hint = (" (per-pixel class scores: a segmentation model; set [model] task = "
            "\"segmentation\")" if isinstance(out, torch.Tensor) and out.ndim == 4 else "")
    return f"the model must return a (N, K) logits tensor, got shape {shape}{hint}"


def _channel_mean_abs(a: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W) mean over channels of |a|, equal to `a.abs().mean(dim=1)`.

    Early activations are large (ResNet-18 stem: 32 x 64 x 112 x 112 floats): a whole-batch
    `abs()` temporary costs a fresh 100 MB allocation, whose page faults take several times
    longer than the arithmetic. Chunks of images through one reused scratch buffer (at most
    `_SCRATCH_ELEMENTS`) do the same operations (so the same values) in bounded memory, with
    a few kernel calls per batch rather than one per image; a ReLU-family output is already
    non-negative and needs no abs at all."""
    if a.ndim != 4 or a.shape[0] <= 1:
        return (a if nonnegative else a.abs()).mean(dim=1)
    out = torch.empty((a.shape[0], *a.shape[2:]), dtype=a.dtype, device=a.device)
    if nonnegative:
        return torch.mean(a, dim=1, out=out)
    step = max(1, _SCRATCH_ELEMENTS // a[0].numel())
    scratch = torch.empty((min(step, a.shape[0]), *a.shape[1:]), dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[0], step):
        chunk = a[i:i + step]
        buf = scratch[: chunk.shape[0]]
        torch.abs(chunk, out=buf)
        torch.mean(buf, dim=1, out=out[i:i + step])
    return out


_SCRATCH_ELEMENTS = 4 * 1024 * 1024  # 16 MB of float32: a few ResNet stem images per chunk


@contextlib.contextmanager
def probe_state_restored(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the pass; every flag restored afterwards, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


@dataclass
class _Call:
    name: str
    module: nn.Module
    in_id: int
    out_id: int
    shape: tuple[int, ...]
    keep: object = None  # holds the output alive during the dry run, so ids stay unique


def resolve_layers(model: nn.Module, spec: ModelSpec,
                   device: torch.device) -> tuple[str, str, str | None]:
    """(target, early, feature) module names, resolving "auto" by one dry run.

    target auto: the last module output in execution order that is 4-D with H*W > 1
    (the deepest module that produced it). early auto: the first Conv2d's output,
    advanced through directly following BatchNorm/activation modules. features: the
    input of the last nn.Linear (None when the model has none).
    """
    once = _dry_run(model, spec, device)
    spatial = [c for c in once if len(c.shape) == 4 and c.shape[2] * c.shape[3] > 1]
    if not spatial:
        raise ProbeError("the model has no layer with a 4-D spatial output; Grad-CAM needs a convolutional model")
    target = _pick(spec.target_layer, spatial, "layers.target", _auto_target)
    early = _pick(spec.early_layer, spatial, "layers.early", _auto_early)
    linears = [c.name for c in once if isinstance(c.module, nn.Linear)]
    return target, early, (linears[-1] if linears else None)


def conv_blocks(model: nn.Module, spec: ModelSpec, device: torch.device) -> list[str]:
    """Module names of every conv block's output in execution order: each Conv2d called once
    per pass, advanced through directly following BatchNorm/activation modules (as the
    early layer is); the depths whose channel means feed `feat_conv<i>_mahalanobis`."""
    spatial = [c for c in _dry_run(model, spec, device) if len(c.shape) == 4]
    out = [spatial[_advance(spatial, i)].name for i, c in enumerate(spatial)
           if isinstance(c.module, nn.Conv2d)]
    return list(dict.fromkeys(out))


def _channels(model: nn.Module, spec: ModelSpec, device: torch.device, names: list[str]) -> list[int]:
    """Channels of the named 4-D module outputs (from the dry run's shapes)."""
    shapes = {c.name: c.shape for c in _dry_run(model, spec, device) if len(c.shape) == 4}
    return [int(shapes[n][1]) for n in names]


def decoder_layers(model: nn.Module, spec: ModelSpec, device: torch.device,
                   requested: str = "auto") -> list[str]:
    """Module names of a segmentation model's post-bottleneck (decoder) layers, in execution order.

    auto: the bottleneck is the last 4-D module output of smallest h*w; every Conv2d /
    ConvTranspose2d called after it, advanced through directly following BatchNorm /
    activation modules (as conv blocks are), except the one producing the model's output
    (the scoring head). `requested`: comma-separated module names with 4-D outputs instead.
    """
    spatial = [c for c in _dry_run(model, spec, device) if len(c.shape) == 4]
    if not spatial:
        raise ProbeError("the model has no layer with a 4-D spatial output")
    if requested != "auto":
        names = [n.strip() for n in requested.split(",") if n.strip()]
        for n in names:
            _pick(n, spatial, "layers.target", None)
        return list(dict.fromkeys(names))
    area = [c.shape[2] * c.shape[3] for c in spatial]
    neck = max(i for i, a in enumerate(area) if a == min(area))
    last_out = spatial[-1].out_id
    out = []
    for i in range(neck + 1, len(spatial)):
        if isinstance(spatial[i].module, (nn.Conv2d, nn.ConvTranspose2d)):
            j = _advance(spatial, i)
            if spatial[j].out_id != last_out:
                out.append(spatial[j].name)
    if not out:
        raise ProbeError(f"no convolution runs after the bottleneck ({spatial[neck].name}, "
                         f"{list(spatial[neck].shape[1:])}); name the decoder layers in "
                         f"layers.target")
    return list(dict.fromkeys(out))


def _dry_run(model: nn.Module, spec: ModelSpec, device: torch.device) -> list[_Call]:
    """The module calls of one pass on a zero input built from the spec, in execution order,
    keeping modules called exactly once (a shared module has no single output to probe)."""
    calls: list[_Call] = []
    counts: dict[str, int] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        name = names[id(module)]
        counts[name] = counts.get(name, 0) + 1
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
        in_id = id(inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) else -1
        calls.append(_Call(name, module, in_id, id(output), shape, (inputs, output)))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros((1, spec.channels, *spec.size), device=device, dtype=dtype)
    try:
        with probe_state_restored(model), torch.no_grad():
            model(x)
    except Exception as e:
        raise ProbeError(f"the model cannot run on a {tuple(x.shape)} input built from the spec: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return [c for c in calls if counts[c.name] == 1]


def _advance(spatial: list[_Call], i: int) -> int:
    """From call i, step through directly following BatchNorm/activation calls on its output."""
    while i + 1 < len(spatial) and isinstance(spatial[i + 1].module, _ELEMENTWISE) \
            and spatial[i + 1].in_id == spatial[i].out_id:
        i += 1
    return i


def _auto_target(spatial: list[_Call]) -> str:
    last = spatial[-1].out_id
    return next(c.name for c in spatial if c.out_id == last)  # deepest producer finishes first


def _auto_early(spatial: list[_Call]) -> str:
    convs = [i for i, c in enumerate(spatial) if isinstance(c.module, nn.Conv2d)]
    if not convs:
        return spatial[0].name
    return spatial[_advance(spatial, convs[0])].name


def _pick(requested: str, spatial: list[_Call], key: str, auto) -> str:
    if requested == "auto":
        return auto(spatial)
    for c in spatial:
        if c.name == requested:
            return c.name
    listing = ", ".join(f"{c.name} {list(c.shape[1:])}" for c in spatial[:40])
    raise ProbeError(f"{key} = '{requested}' is not a module with a 4-D spatial output "
                     f"(called once per pass). Candidates: {listing}")
