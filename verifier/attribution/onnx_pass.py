"""The onnxruntime path of `attribute`: target activation, tail sub-model, masked forwards.

`OnnxPass` reuses the ONNX backend's graph surgery (`verifier.probe.onnx_graph`): one
session returns the logits and the target activation (plus any tensors the tail reads
from earlier layers), a second runs the extracted tail, in float64 where onnxruntime has
float64 kernels for every tail op. No input gradients exist on this path.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import verifier.probe.onnx_backend as ob
import verifier.probe.onnx_graph as og
import verifier.probe.onnx_outputs as oo
from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import AttributionError, resolve_targets
from verifier.probe.base import ProbeError
from verifier.spec import ModelSpec

__all__ = ["OnnxPass"]



class OnnxPass:
    """One batch through an ONNX (or TorchScript, exported in memory) classifier.

    x: float32 (N, C, H, W); layer: tensor name, node name, torch module path or "auto"
    (the last 4-D tensor with h*w > 1 on the path to the logits). `bare`: the spec was
    made up for a model file given without one, so every output counts as a class.
    """

    def __init__(self, spec: ModelSpec, x: np.ndarray, layer: str, target: object,
                 needs: frozenset[str], bare: bool = False) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        if self.x.ndim != 4 or self.x.shape[0] == 0:
            raise AttributionError(f"x must be a non-empty float32 (N, C, H, W) batch, got "
                                   f"shape {self.x.shape}")
        self.spec = spec
        self._class_spec = None if bare else spec
        loaded = _load(spec, layer, "tail" in needs)
        self.info, self.layer, self._session = loaded.info, loaded.layer, loaded.session
        self._tail, self._side, self.tail_precision = loaded.tail, loaded.side, loaded.precision
        self._fetch, self._loaded = loaded.fetch, loaded
        self.input_name, self.logits_name = self.info.input_name, self.info.logits_name
        self.needs = needs
        self._target = target
        self.targets: np.ndarray | None = None
        self._base: tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None = None

    def base(self) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, K) float64, activation A (N, k, h, w) float64), computed once."""
        if self._base is None:
            got = self._session.run(self._fetch, {self.input_name: self.x})
            vals = dict(zip(self._fetch, got))
            logits = np.asarray(vals[self.logits_name], dtype=np.float64)
            if logits.ndim != 2:
                raise AttributionError(f"model output has shape {list(logits.shape)}; "
                                       "expected (N, K) logits")
            act = np.asarray(vals[self.layer], dtype=np.float64)
            self._base = (logits, act, [vals[s] for s in self._side])
            self.resolve_targets(logits)
        return self._base[0], self._base[1]

    def resolve_targets(self, logits: np.ndarray) -> np.ndarray:
        """(N,) int64: the requested classes, else the argmax over the real classes."""
        if self.targets is None:
            self.logits = logits
            self.targets = _targets(self._target, logits, self._class_spec)
        return self.targets

    def tail(self, acts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Logits (R, K) float64 of the tail fed `acts` (R, k, h, w); row r belongs to image
        rows[r] (whose earlier tensors, if the tail reads any, are fed beside it)."""
        if self._tail is None:
            raise AttributionError("internal: the tail was not requested by the method's needs")
        self.base()
        side = self._base[2]
        dtype = np.float64 if self.tail_precision == "float64" else np.float32
        n = self.x.shape[0]
        out = []
        step = _rows(acts[0].size)
        for lo in range(0, acts.shape[0], step):
            r = rows[lo:lo + step]
            feed = {self.layer: np.ascontiguousarray(acts[lo:lo + step], dtype=dtype)}
            for name, val in zip(self._side, side):
                val = np.asarray(val)
                val = val.astype(dtype) if val.dtype == np.float32 else val
                feed[name] = val[r] if val.ndim and val.shape[0] == n else val
            out.append(np.asarray(self._tail.run([self.logits_name], feed)[0], dtype=np.float64))
        return np.concatenate(out)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plain logits (R, K) float64 for a batch of (possibly masked) inputs, chunked."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = _rows(x[0].size)
        return np.concatenate([
            np.asarray(self._session.run([self.logits_name], {self.input_name: x[lo:lo + step]})[0],
                       dtype=np.float64) for lo in range(0, x.shape[0], step)])

    def gradcam(self) -> np.ndarray:
        """Grad-CAM (N, h, w) by the ONNX probe (exact GAP+linear tail, else finite differences)."""
        self.base()
        if self._loaded.probe is None:
            self._loaded.probe = ob.OnnxProbe(replace(self.spec, target_layer=self.layer,
                                                      early_layer=self.layer))
        return self._loaded.probe.run(self.x, classes=self.targets).cam.astype(np.float64)


@dataclass
class _Loaded:
    """Sessions for one model file, target layer and tail need (reused across batches)."""

    info: og.GraphInfo
    layer: str
    session: Any
    fetch: list[str]
    tail: Any = None
    side: list[str] = field(default_factory=list)
    precision: str = "float64"
    probe: Any = None


#: the few most recently loaded models: one explain run feeds many batches to the same file
_LOADED: OrderedDict[tuple, _Loaded] = OrderedDict()
_LOADED_MAX = 4


def _load(spec: ModelSpec, layer: str, with_tail: bool) -> _Loaded:
    """The sessions for `spec`'s file, cached on the file's identity (path, size, mtime)."""
    key = ob.file_key(spec, layer, with_tail)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    providers = ob._providers(None)
    try:
        model, info = ob.load_analysed(spec, providers)
        target = og.auto_target(info) if layer == "auto" else og.resolve_layer(info, layer,
                                                                                "target")
    except ProbeError as e:
        raise AttributionError(str(e)) from None
    loaded = _Loaded(info=info, layer=target, session=None, fetch=[])
    if with_tail:
        tail, loaded.side = og.extract_tail(info, target)
        loaded.tail, loaded.precision = ob._tail_session(tail, providers, "auto")
    loaded.fetch = list(dict.fromkeys([info.logits_name, target, *loaded.side]))
    loaded.session = ob._session(oo.with_outputs(model, loaded.fetch, info), providers, "model")
    _LOADED[key] = loaded
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return loaded


def _targets(target: object, logits: np.ndarray, spec: ModelSpec | None) -> np.ndarray:
    return resolve_targets(target, logits, spec)
