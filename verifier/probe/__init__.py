"""The probe: one batched pass of a model backend (logits, features at several depths, the
activations attribution needs). `base` is the contract, `factory.open_probe` picks a backend,
`torch_backend` / `onnx_backend` (+ `onnx_graph`) implement it."""
from __future__ import annotations

from verifier.probe.base import Probe, ProbeError, ProbeResult
from verifier.probe.factory import open_probe

__all__ = ["Probe", "ProbeError", "ProbeResult", "open_probe"]
