"""ONNX model files: export from torch, loading (TorchScript exported in memory), cache keys.

What every onnxruntime path (the probes and both attribution passes) reads a model file with.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import onnx

from verifier.probe.base import ProbeError
from verifier.spec import ModelSpec

__all__ = ["OPSET", "export_onnx", "export_bytes", "load_model", "file_key"]

#: ONNX opset used for exports
OPSET = 17


def export_onnx(module: Any, spec: ModelSpec, path: str | Path) -> Path:
    """Export a torch module (eval mode) to `path` as ONNX with a dynamic batch axis.

    The dummy input is (1, spec.channels, *spec.size); input `input`, output `logits`.
    The module's train/eval mode is restored afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = export_bytes(module, spec)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def export_bytes(module: Any, spec: ModelSpec) -> bytes:
    import torch

    was_training = bool(getattr(module, "training", False))
    try:
        params = list(module.parameters())
        dev = params[0].device if params else torch.device("cpu")
        dummy = torch.zeros(1, spec.channels, *spec.size, device=dev)
        module.eval()
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module, dummy, buf, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return buf.getvalue()
    finally:
        module.train(was_training)


def file_key(spec: ModelSpec, *extra: object) -> tuple:
    """A cache key for what is loaded from the spec's file: its identity (path, size, mtime),
    the input geometry and `extra` (the layers asked for, ...)."""
    assert spec.path is not None
    st = spec.path.stat()
    return (str(spec.path.resolve()), st.st_size, st.st_mtime_ns, spec.channels, spec.size,
            *extra)


def load_model(spec: ModelSpec) -> onnx.ModelProto:
    assert spec.path is not None
    if spec.backend == "torchscript":
        return _torchscript_to_onnx(spec)
    try:
        model = onnx.load(str(spec.path))
        # the in-memory checker refuses protos over 2 GB; the path form handles external data
        onnx.checker.check_model(model if model.ByteSize() < (1 << 31) - 1 else str(spec.path))
    except Exception as e:
        raise ProbeError(f"{spec.path}: not a valid ONNX model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    return model


def _torchscript_to_onnx(spec: ModelSpec) -> onnx.ModelProto:
    import torch

    try:
        module = torch.jit.load(str(spec.path), map_location="cpu")
    except Exception as e:
        raise ProbeError(f"{spec.path}: not a loadable TorchScript file ({e})") from None
    try:
        data = export_bytes(module, spec)
    except Exception as e:
        raise ProbeError(f"{spec.path}: TorchScript model could not be exported to ONNX "
                         f"for probing ({type(e).__name__}: {e})") from None
    return onnx.load_from_string(data)
