"""The probe contract: one batched pass of a model backend, and what it returns.

Backends (`verifier.probe.torch_backend`, `verifier.probe.onnx_backend`)
implement `Probe`; `open_probe(spec)` picks the one the spec needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from reference_maps.features import JOINT_MAX_DIM

__all__ = ["probe_features", "ProbeResult", "Probe", "ProbeError", "wants_block_stds"]


class ProbeError(RuntimeError):
    """The model cannot be probed as asked (bad layer name, non-image model, ...)."""


@dataclass
class ProbeResult:
    """What one batched pass yields for N images (all float32 numpy, on the CPU).

    logits:      (N, K_out) raw model outputs (K_out includes a garbage output if the model has one)
    features:    (N, D) penultimate features (input of the last linear layer)
    cam:         (N, h, w) Grad-CAM of `cam_class` at the target layer, ReLU applied, native resolution
    cam_class:   (N,) int64 class index each map explains (argmax of logits unless requested)
    early_map:   (N, h2, w2) early-layer activation aggregated over channels: mean of |A|
    early_stats: (N, C) per-channel spatial mean of the early-layer activation
    block_stats: per conv block in execution order, (N, C_b) per-channel spatial mean of the
                 block's output (the conv advanced through its BatchNorm/activation), from
                 the same pass; empty for a probe that does not expose them
    block_stds:  per conv block, (N, C_b) per-channel spatial standard deviation of the same
                 outputs; computed only where every block's means and standard deviations
                 fit the reference store's joint Gaussian (`wants_block_stds`), else empty
    """

    logits: np.ndarray
    features: np.ndarray
    cam: np.ndarray
    cam_class: np.ndarray
    early_map: np.ndarray
    early_stats: np.ndarray
    block_stats: tuple[np.ndarray, ...] = field(default=())
    block_stds: tuple[np.ndarray, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @staticmethod
    def concat(parts: list[ProbeResult]) -> ProbeResult:
        """Join per-batch results along the batch axis."""
        blocks = tuple(np.concatenate([p.block_stats[b] for p in parts], axis=0)
                       for b in range(min(len(p.block_stats) for p in parts)))
        stds = tuple(np.concatenate([p.block_stds[b] for p in parts], axis=0)
                     for b in range(min(len(p.block_stds) for p in parts)))
        return ProbeResult(*(np.concatenate([getattr(p, f) for p in parts], axis=0)
                             for f in ("logits", "features", "cam", "cam_class",
                                       "early_map", "early_stats")), block_stats=blocks, block_stds=stds)


class Probe(Protocol):
    """One backend bound to one model. `run` takes preprocessed (N, C, H, W) float32."""

    target_layer: str       # resolved layer/tensor name used for Grad-CAM
    early_layer: str        # resolved layer/tensor name used for early maps
    gradient_method: str    # how d(logit)/d(activation) is computed, for reports
    fingerprint: str        # sha256 of the model (file bytes or state dict)

    def run(self, x: np.ndarray, classes: np.ndarray | None = None) -> ProbeResult:
        """One batched pass; `classes` (N,) picks the class each Grad-CAM explains."""
        ...

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass only: (N, K_out) logits, no attribution (for counterfactual tests)."""
        ...


def wants_block_stds(channels: list[int | None]) -> bool:
    """Whether a probe computes its conv blocks' channel standard deviations: only where the
    reference store keeps them, that is with two or more blocks whose means and standard
    deviations fit its joint Gaussian (`JOINT_MAX_DIM` values; a block of unknown width counts
    as fitting). A ResNet-18's blocks do not fit, so it pays nothing for them."""
    return len(channels) >= 2 and 2 * sum(c or 0 for c in channels) <= JOINT_MAX_DIM


def probe_features(probe: Probe, x: np.ndarray) -> np.ndarray:
    """`probe.run(x).features` (the garbage head's input), by the probe's `features(x)` where
    it has one: a probe whose attention map costs many passes (a segmentation model file)
    skips it when only the features are wanted."""
    fast = getattr(probe, "features", None)
    return fast(x) if callable(fast) else probe.run(x).features
