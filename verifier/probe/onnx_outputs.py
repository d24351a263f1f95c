"""Extra graph outputs for the ONNX probes: intermediate tensors, and per-channel block
statistics computed inside the graph (fetching whole activations costs more than the pass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
from onnx import helper

from verifier.probe.base import ProbeError

if TYPE_CHECKING:
    from verifier.probe.onnx_graph import GraphInfo

__all__ = ["with_outputs", "with_channel_means"]


def with_outputs(model: onnx.ModelProto, names: list[str],
                 info: GraphInfo | None = None) -> onnx.ModelProto:
    """A copy of `model` with `names` appended as graph outputs (arithmetic unchanged)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name in present:
            continue
        etype = info.elem_types.get(name, onnx.TensorProto.FLOAT) if info else onnx.TensorProto.FLOAT
        out.graph.output.append(helper.make_tensor_value_info(name, etype, None))
        present.add(name)
    return out


def with_channel_means(model: onnx.ModelProto, names: list[str], info: GraphInfo | None = None,
                       variances: bool = False) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of `model` that also outputs the per-channel spatial mean (N, C) of each (N, C, ...)
    tensor in `names` (GlobalAveragePool then Flatten, inside the graph: fetching the whole
    activations and averaging them outside cost a ResNet-18 a sixth of its forward pass) and,
    with `variances`, the per-channel spatial variance (N, C): the mean of the squared deviations
    from that mean (Sub, Mul, GlobalAveragePool, Flatten; two passes, as exact as the mean;
    GlobalLpPool, one op, took onnxruntime 8x longer). Returns the model, the means' output names
    and the variances' (empty without `variances`), in the order of `names`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    means, variances_out = [], []
    for i, name in enumerate(names):
        pooled, mean = f"{name}__verifier_pool{i}", f"{name}__verifier_channel_mean{i}"
        dev, sq = f"{name}__verifier_dev{i}", f"{name}__verifier_sq{i}"
        pooled_sq, var = f"{name}__verifier_pool_sq{i}", f"{name}__verifier_channel_var{i}"
        if {pooled, mean, dev, sq, pooled_sq, var} & taken:
            raise ProbeError(f"the model already has a tensor named like {mean!r}")
        out.graph.node.append(helper.make_node("GlobalAveragePool", [name], [pooled]))
        out.graph.node.append(helper.make_node("Flatten", [pooled], [mean], axis=1))
        etype = info.elem_types.get(name, onnx.TensorProto.FLOAT) if info else onnx.TensorProto.FLOAT
        out.graph.output.append(helper.make_tensor_value_info(mean, etype, None))
        means.append(mean)
        if variances:
            out.graph.node.append(helper.make_node("Sub", [name, pooled], [dev]))
            out.graph.node.append(helper.make_node("Mul", [dev, dev], [sq]))
            out.graph.node.append(helper.make_node("GlobalAveragePool", [sq], [pooled_sq]))
            out.graph.node.append(helper.make_node("Flatten", [pooled_sq], [var], axis=1))
            out.graph.output.append(helper.make_tensor_value_info(var, etype, None))
            variances_out.append(var)
    return out, means, variances_out
