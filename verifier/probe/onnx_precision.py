"""A float64 copy of an ONNX graph, for the tail the ONNX backend differentiates numerically
(float32 finite differences are too coarse for Grad-CAM's gradients)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["to_double"]


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64 where it computed in float32.

    Float initializers, Constant nodes, Cast/ConstantOfShape targets and graph
    input/output types are switched, and GlobalAveragePool (no float64 kernel in
    onnxruntime) becomes the equal ReduceMean over axes 2, 3; the caller must check
    onnxruntime has float64 kernels for every other op (session creation fails otherwise).
    """
    f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == f32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float64), t.name))
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 17)
    for i, node in enumerate(g.node):
        if node.op_type == "GlobalAveragePool":
            g.node[i].CopyFrom(_reduce_mean_23(node, g, opset))
            continue
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64),
                                                     a.t.name))
            elif node.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f64
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                raise ValueError("scalar float Constant attributes are not converted")
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == f32:
            vi.type.tensor_type.elem_type = f64
    del g.value_info[:]
    return out


def _reduce_mean_23(node: onnx.NodeProto, g: onnx.GraphProto, opset: int) -> onnx.NodeProto:
    """ReduceMean over axes (2, 3) with keepdims, replacing a GlobalAveragePool node."""
    if opset < 18:
        return helper.make_node("ReduceMean", [node.input[0]], list(node.output),
                                name=node.name, axes=[2, 3], keepdims=1)
    axes = node.name + "_axes_23"
    g.initializer.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), axes))
    return helper.make_node("ReduceMean", [node.input[0], axes], list(node.output),
                            name=node.name, keepdims=1)
