"""The onnxruntime path for segmentation models: KWC on an .onnx (or TorchScript) file.

The graph gets one input per decoder layer, a per-kernel scale multiplied into that layer's
output (`Mul`), so every kernel ablation of KWC is a plain batched run; the layers are found
as on the torch path (convolutions after the bottleneck, advanced through activations).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from verifier.attribution.chunks import rows_per_chunk as _rows
from verifier.attribution.registry import AttributionError
from verifier.probe import onnx_backend as ob
from verifier.probe import onnx_graph as og
from verifier.probe.base import ProbeError
from verifier.spec import ModelSpec, SpecError, check_output_shape

__all__ = ["OnnxSegPass"]

_SUFFIX = "__kwc_scale"
_LOADED: OrderedDict[tuple, tuple] = OrderedDict()


class OnnxSegPass:
    """SegPass's interface (base, region_score, ablate, forward, output_size) on onnxruntime;
    results are torch float64 tensors so the method code is shared with the torch path."""

    def __init__(self, spec: ModelSpec, x: np.ndarray, layers: str, target: object) -> None:
        self.spec = spec
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        if self.x.ndim != 4 or self.x.shape[0] == 0:
            raise AttributionError(f"x must be a non-empty float32 (N, C, H, W) batch, got "
                                   f"shape {self.x.shape}")
        self.session, self.input_name, self.output_name, self.layers, self.kernels = \
            _load(spec, layers)
        self.layer = ",".join(self.layers)
        self._target = target
        self._base: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.targets: torch.Tensor | None = None
        self.region: torch.Tensor | None = None

    def base(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(scores (N, K, H', W'), [decoder activation per layer]) as float64 tensors, once."""
        if self._base is None:
            from verifier.attribution.seg_pass import segment_targets

            got = self._run(self.x, None, None)
            scores = torch.as_tensor(got[0], dtype=torch.float64)
            self.targets, self.region = segment_targets(self._target, scores, self.spec)
            self._base = (scores, [torch.as_tensor(a, dtype=torch.float64) for a in got[1:]])
        return self._base

    def region_score(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(R,) y = sum_ij region[ij] * scores[c, ij] for rows of images `rows`."""
        from verifier.attribution.seg_pass import region_score

        self.base()
        return region_score(scores, self.targets, self.region, rows)

    def ablate(self, layer: int, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Region scores (R,) with decoder layer `layer`'s kernels scaled by keep (R, k_l)."""
        self.base()
        out = []
        r = rows.cpu().numpy()
        step = _rows(self.x[0].size * 4)
        for lo in range(0, len(r), step):
            got = self._run(self.x[r[lo:lo + step]], layer, keep[lo:lo + step].cpu().numpy())
            s = torch.as_tensor(got[0], dtype=torch.float64)
            out.append(self.region_score(s, rows[lo:lo + step]))
        return torch.cat(out)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plain scores (R, K, H', W') float64 for a batch of inputs, chunked."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = _rows(x[0].size * 4)
        return np.concatenate([np.asarray(self._run(x[lo:lo + step], None, None)[0], np.float64)
                               for lo in range(0, len(x), step)])

    def output_size(self) -> tuple[int, int]:
        s = self.base()[0]
        return int(s.shape[2]), int(s.shape[3])

    def _run(self, x: np.ndarray, layer: int | None, keep: np.ndarray | None) -> list[np.ndarray]:
        feed: dict[str, Any] = {self.input_name: x}
        for i, (name, k) in enumerate(zip(self.layers, self.kernels)):
            scale = np.ones((len(x), k, 1, 1), dtype=np.float32)
            if i == layer:
                scale = np.asarray(keep, dtype=np.float32)[:, :, None, None]
            feed[name + _SUFFIX] = scale
        got = self.session.run([self.output_name, *self.layers], feed)
        try:
            check_output_shape(self.spec, tuple(np.shape(got[0])))
        except SpecError as e:
            raise AttributionError(str(e)) from None
        return got


def _load(spec: ModelSpec, layers: str) -> tuple:
    key = ob.file_key(spec, layers)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    providers = ob._providers(None)
    try:
        model, info = ob.load_analysed(spec, providers)
        shape = info.shape(info.logits_name)
        if shape is not None:
            try:
                check_output_shape(spec, tuple(d if d is not None else 1 for d in shape))
            except SpecError as e:
                raise AttributionError(str(e)) from None
        names = og.decoder_tensors(info, layers)
        kernels = [int(info.shape(n)[1]) for n in names]  # type: ignore[index]
        session = ob._session(_with_scales(model, names, kernels), providers, "model")
    except ProbeError as e:
        raise AttributionError(str(e)) from None
    _LOADED[key] = (session, info.input_name, info.logits_name, names, kernels)
    while len(_LOADED) > 4:
        _LOADED.popitem(last=False)
    return _LOADED[key]


def _with_scales(model: onnx.ModelProto, names: list[str], kernels: list[int]) -> onnx.ModelProto:
    """A copy of `model` where each tensor in `names` is multiplied by a new input
    `<name>__kwc_scale` (batch, k, 1, 1) before anything reads it, and is an output."""
    m = copy.deepcopy(model)
    g = m.graph
    for name, k in zip(names, kernels):
        raw = name + "__kwc_raw"
        for node in g.node:
            node.output[:] = [raw if o == name else o for o in node.output]
        g.node.append(helper.make_node("Mul", [raw, name + _SUFFIX], [name],
                                       name=f"kwc_scale/{name}"))
        g.input.append(helper.make_tensor_value_info(name + _SUFFIX, TensorProto.FLOAT,
                                                     ["batch", k, 1, 1]))
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    _topological(g)
    return m


def _topological(g: onnx.GraphProto) -> None:
    """Re-order the nodes so every node follows the producers of its inputs."""
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ProbeError("cannot order the graph after adding the kernel scales")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
