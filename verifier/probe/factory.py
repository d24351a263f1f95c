"""Opening the probe for a spec: the backend registry (torch for nn.Modules, onnxruntime
for .onnx files and TorchScript exported in memory). The contract in `base` knows no backend;
backends are imported here, lazily, so importing the contract never loads torch or onnxruntime."""
from __future__ import annotations

from verifier.probe.base import Probe, ProbeError
from verifier.spec import ModelSpec

__all__ = ["open_probe"]


def open_probe(spec: ModelSpec, device: str | None = None) -> Probe:
    """The backend probe for a spec: torch for nn.Modules, onnxruntime for .onnx
    files, and TorchScript files through an in-memory ONNX export."""
    if spec.task != "classification":
        raise ProbeError(f"the gate, reference store and audit take classifiers only for now; "
                         f"this spec is task = {spec.task!r}. Explain it with `verifier explain` "
                         f"(kwc, Prediction / Image Preserved; docs/segmentation.md)")
    backend = spec.backend
    if backend == "torch":
        from verifier.probe.torch_backend import TorchProbe
        return TorchProbe(spec, device=device)
    from verifier.probe.onnx_backend import OnnxProbe
    return OnnxProbe(spec, device=device)
