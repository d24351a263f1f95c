"""The torch path of `attribute`: one model, one batch, the target layer, and what methods need.

`TorchPass` computes each quantity once, lazily (logits + target activation, with the
tail-only layer gradient when a method needs it), keeps every hook handle and removes it
in a `finally`; `attribute` wraps it in `probe_state_restored` (eval mode, frozen
parameters, both restored afterwards).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import AttributionError, resolve_targets
from verifier.probe.base import ProbeError
from verifier.probe.torch_backend import resolve_layers
from verifier.spec import ModelSpec, SpecError, check_output_shape

__all__ = ["TorchPass", "hooked"]

#: resolved layer names per module and (layer, C, H, W): the dry run costs a forward pass
_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def hooked(*pairs: tuple[nn.Module, str, object]) -> Iterator[None]:
    """Register (module, "forward" | "forward_pre", hook) pairs; every handle removed on exit."""
    handles = []
    try:
        for module, kind, fn in pairs:
            reg = module.register_forward_hook if kind == "forward" else module.register_forward_pre_hook
            handles.append(reg(fn))
        yield
    finally:
        for h in handles:
            h.remove()


class TorchPass:
    """One batch through an nn.Module for the attribution methods.

    x: float32 (N, C, H, W); layer: module name or "auto" (the last module output that
    is 4-D with h*w > 1, as the probe resolves it); target: None, an int or (N,) ints.
    """

    def __init__(self, module: nn.Module, x: np.ndarray | torch.Tensor, layer: str,
                 target: object, needs: frozenset[str], spec: ModelSpec | None = None) -> None:
        self.model = module
        self.spec = spec
        params = list(module.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x,
                                 dtype=torch.float32).to(self.device)
        if self.x.ndim != 4 or self.x.shape[0] == 0:
            raise AttributionError(f"x must be a non-empty float32 (N, C, H, W) batch, got "
                                   f"shape {tuple(self.x.shape)}")
        self.needs = needs
        self.layer, self.linear, self.layer_module = layer, None, None
        if needs & {"layer_activation", "layer_gradient", "tail", "head_weights"}:
            self.layer, self.linear = _resolve(module, layer, tuple(self.x.shape[1:]), self.device)
            self.layer_module = dict(module.named_modules())[self.layer]
        self._target = target
        self._base: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.targets: torch.Tensor | None = None
        #: (input, output) of the last nn.Linear in the base pass, when head_weights is needed
        self.head_io: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    # ------------------------------------------------------------------ shared quantities
    def base(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits (N, K), activation A (N, k, h, w), dy_c/dA or None), computed once.

        The gradient runs through the tail only: A is re-rooted as a fresh leaf in the
        hook (parameters are frozen), so autograd records nothing before the layer.
        """
        if self._base is None:
            want_grad = "layer_gradient" in self.needs
            box: dict[str, torch.Tensor] = {}

            def grab(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                box["a"] = output.detach().requires_grad_(want_grad)
                return box["a"].clone()  # a later in-place op cannot touch the leaf

            hooks = [(self.layer_module, "forward", grab)]
            if "head_weights" in self.needs and self.linear is not None:
                lin = dict(self.model.named_modules())[self.linear]
                hooks += [(lin, "forward_pre", lambda m, i: box.__setitem__("lin_in", i[0].detach())),
                          (lin, "forward", lambda m, i, o: box.__setitem__("lin_out", o.detach()))]
            with hooked(*hooks):
                with torch.set_grad_enabled(want_grad):
                    logits = self._logits(self.model(self.x))
            self.head_io = (box.get("lin_in"), box.get("lin_out"))
            tgt = self.resolve_targets(logits)
            grad = None
            if want_grad:
                (grad,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), box["a"])
            self._base = (logits.detach(), box["a"].detach(), grad)
        return self._base

    def resolve_targets(self, logits: torch.Tensor) -> torch.Tensor:
        """(N,) long class indices: the requested ones, else the argmax over real classes."""
        if self.targets is None:
            self.logits = logits.detach()
            self.targets = _targets(self._target, self.logits, self.spec)
        return self.targets

    # ------------------------------------------------------------------ re-evaluation
    @torch.no_grad()
    def tail(self, acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (R, K) with the target activation replaced by `acts` (R, k, h, w).

        Row r re-runs image rows[r] with its activation swapped in, so layers after the
        target that read earlier tensors (skip connections) see that image's own values.
        Chunked to bounded memory.
        """
        out = []
        step = _rows(acts[0].numel() + self.x[0].numel())
        for lo in range(0, acts.shape[0], step):
            chunk = acts[lo:lo + step]
            swap = (lambda m, i, o, c=chunk: c)  # noqa: E731 - the chunk replaces the output
            with hooked((self.layer_module, "forward", swap)):
                out.append(self._logits(self.model(self.x[rows[lo:lo + step]])))
        return torch.cat(out)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain logits (R, K) for a batch of (possibly masked) inputs, chunked."""
        step = _rows(x[0].numel())
        return torch.cat([self._logits(self.model(x[lo:lo + step]))
                          for lo in range(0, x.shape[0], step)])

    def _logits(self, out: object) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else (type(out).__name__,)
            try:
                check_output_shape(self.spec if self.spec is not None and self.spec.task ==
                                   "classification" else None, shape)
            except SpecError as e:
                raise AttributionError(str(e)) from None
            raise AttributionError(f"the model must return a (N, K) logits tensor, got {shape}")
        return out


def _resolve(module: nn.Module, layer: str, chw: tuple[int, ...],
             device: torch.device) -> tuple[str, str | None]:
    """(target layer, last linear) names, by the probe's dry run; cached per module."""
    per_module = _LAYER_CACHE.setdefault(module, {})
    key = (layer, chw)
    if key not in per_module:
        if len(chw) != 3 or chw[0] not in (1, 3):
            raise AttributionError(f"x must be (N, 1 or 3, H, W), got (N, {chw})")
        spec = ModelSpec(classes=("_",), size=chw[1:], channels=chw[0], module=module,
                         target_layer=layer)
        try:
            target, _, linear = resolve_layers(module, spec, device)
        except ProbeError as e:
            raise AttributionError(str(e)) from None
        per_module[key] = (target, linear)
    return per_module[key]


def _targets(target: object, logits: torch.Tensor, spec: ModelSpec | None) -> torch.Tensor:
    t = resolve_targets(target, logits.detach().float().cpu().numpy(), spec)
    return torch.as_tensor(t, dtype=torch.long, device=logits.device)
