"""Opening the probe for a spec: the backend registry (torch for nn.Modules, onnxruntime
for .onnx files and TorchScript exported in memory). The contract in `base` knows no backend;
backends are imported here, lazily, so importing the contract never loads torch or onnxruntime."""
from __future__ import annotations

from verifier.probe.base import Probe, ProbeError
from verifier.spec import ModelSpec

__all__ = ["open_probe"]


def open_probe(spec: ModelSpec, device: str | None = None, threads: int | None = None) -> Probe:
    """The backend probe for a spec: torch for nn.Modules, onnxruntime for .onnx
    files, and TorchScript files through an in-memory ONNX export; a segmentation model
    gets the SegmentationProbe (nn.Module) or OnnxSegmentationProbe (file): image-level
    scores and the region's Grad-CAM summed over the decoder layers.
    `threads`: compute threads of the model's forward pass (onnxruntime: the session's
    intra-op threads, sleeping between runs; torch: `torch.set_num_threads`, which is
    process-wide); None keeps the backend's default."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    backend = spec.backend
    if threads is not None and backend == "torch":
        import torch

        torch.set_num_threads(threads)
    if spec.task == "segmentation":
        if backend == "torch":
            from verifier.probe.seg_backend import SegmentationProbe
            return SegmentationProbe(spec, device=device)
        from verifier.probe.onnx_seg_backend import OnnxSegmentationProbe
        return OnnxSegmentationProbe(spec, device=device, threads=threads)
    if backend == "torch":
        from verifier.probe.torch_backend import TorchProbe
        return TorchProbe(spec, device=device)
    from verifier.probe.onnx_backend import OnnxProbe
    return OnnxProbe(spec, device=device, threads=threads)
