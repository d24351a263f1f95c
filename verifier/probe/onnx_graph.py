"""Graph surgery for the ONNX backend: layer choice and tail extraction (extra outputs:
`verifier.probe.onnx_outputs`).

Reads an `onnx.ModelProto` once (`GraphInfo`), picks the Grad-CAM and early layers,
and cuts the tail after the target layer.
"""
# length: 438 lines, one concept: every question asked of one ONNX graph index (GraphInfo);
# the private walkers (_ancestors, _affine_step, ...) are shared by layer choice and tail cuts.
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from verifier.probe.base import ProbeError

__all__ = ["GraphInfo", "analyse", "auto_target", "auto_early", "resolve_layer",
           "features_tensor", "extract_tail", "gap_linear_tail",
           "spatial_candidates", "decoder_tensors"]

#: elementwise activations the early layer is advanced through (as torch's Conv->BN->act block)
EARLY_FOLLOWERS = frozenset({
    "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Gelu", "Mish", "ThresholdedRelu"})
#: ops that only read a tensor's shape: they carry no gradient
_SHAPE_ONLY = frozenset({"Shape", "Size"})
#: ops that only re-lay a per-sample vector out (row-major order kept)
_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"})


@dataclass
class GraphInfo:
    """What the backend needs to know about one model's graph.

    shapes: tensor name -> tuple of dims (int, or None when unknown), or absent when unknown.
    """

    model: onnx.ModelProto
    input_name: str
    logits_name: str
    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int | None, ...]]
    elem_types: dict[str, int]
    ancestors: set[str] = field(default_factory=set)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """The known shape of a tensor, or None."""
        return self.shapes.get(name)

    def is_spatial(self, name: str) -> bool:
        """Rank 4 with a known spatial extent h*w > 1."""
        s = self.shapes.get(name)
        return (s is not None and len(s) == 4 and s[2] is not None and s[3] is not None
                and s[2] * s[3] > 1)

    def relevant_consumers(self, name: str) -> list[onnx.NodeProto]:
        """Consumers that carry `name`'s values on towards the logits."""
        return [n for n in self.consumers.get(name, [])
                if n.op_type not in _SHAPE_ONLY and any(o in self.ancestors for o in n.output)]


def analyse(model: onnx.ModelProto) -> GraphInfo:
    """Index a model: producers, consumers, constants, inferred shapes, logits ancestors.

    Raises ProbeError for a graph with no input, no output or no nodes.
    """
    g = model.graph
    init_names = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if not inputs or not g.output or not g.node:
        raise ProbeError("not a valid ONNX classifier: the graph needs an input, an output and nodes")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, not a requirement; shapes then come from a dummy run
        inferred = model
    shapes: dict[str, tuple[int | None, ...]] = {}
    types: dict[str, int] = {}
    ig = inferred.graph
    for vi in list(ig.input) + list(ig.value_info) + list(ig.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in tt.shape.dim)
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for o in node.output:
            producer[o] = node
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
        if node.op_type == "Constant" and node.output:
            val = _constant_value(node)
            if val is not None:
                constants[node.output[0]] = val
    info = GraphInfo(model=model, input_name=inputs[0].name, logits_name=g.output[0].name,
                     nodes=list(g.node), producer=producer, consumers=consumers,
                     constants=constants, shapes=shapes, elem_types=types)
    info.ancestors = _ancestors(info, info.logits_name)
    return info


def spatial_candidates(info: GraphInfo) -> list[str]:
    """Every 4-D tensor with spatial extent on the path to the logits, in topological order."""
    return [o for n in info.nodes for o in n.output if o in info.ancestors and info.is_spatial(o)]


def auto_target(info: GraphInfo) -> str:
    """The last 4-D tensor (h*w > 1) in topological order on the path to the logits."""
    cands = spatial_candidates(info)
    if not cands:
        raise ProbeError("the model has no spatial layer (no 4-D tensor with height*width > 1 "
                         "on the path to the logits): Grad-CAM needs an image CNN")
    return cands[-1]


def auto_target_first(info: GraphInfo) -> str:
    """The first 4-D tensor (h*w > 1) on the path to the logits."""
    cands = spatial_candidates(info)
    if not cands:
        raise ProbeError("the model has no spatial layer (no 4-D tensor with height*width > 1 "
                         "on the path to the logits): Grad-CAM needs an image CNN")
    return cands[0]


def auto_early(info: GraphInfo) -> str:
    """The first Conv's output, advanced through directly following BatchNorm/activation nodes
    (the first spatial tensor when the model has no Conv)."""
    conv = next((n for n in info.nodes if n.op_type == "Conv" and n.output[0] in info.ancestors),
                None)
    if conv is None:  # as the torch backend: the first spatial tensor
        return auto_target_first(info)
    name = conv.output[0]
    while True:
        cons = info.relevant_consumers(name)
        if len(cons) != 1 or cons[0].op_type not in EARLY_FOLLOWERS or cons[0].input[0] != name:
            return name
        name = cons[0].output[0]


def conv_blocks(info: GraphInfo) -> list[str]:
    """Every Conv's output on the path to the logits, each advanced through directly
    following BatchNorm/activation nodes (as `auto_early`), in topological order."""
    out = []
    for conv in (n for n in info.nodes if n.op_type == "Conv" and n.output[0] in info.ancestors):
        name = conv.output[0]
        while True:
            cons = info.relevant_consumers(name)
            if len(cons) != 1 or cons[0].op_type not in EARLY_FOLLOWERS or cons[0].input[0] != name:
                break
            name = cons[0].output[0]
        if info.is_spatial(name) or len(info.shape(name) or ()) == 4:
            out.append(name)
    return list(dict.fromkeys(out))


def decoder_tensors(info: GraphInfo, requested: str = "auto") -> list[str]:
    """Tensor names of the post-bottleneck layers (as `probe.torch_backend.decoder_layers`):
    the outputs of Conv / ConvTranspose nodes after the last smallest 4-D tensor, advanced
    through directly following activations, the scoring head's output excluded."""
    if requested != "auto":
        return [resolve_layer(info, n.strip(), "decoder") for n in requested.split(",")
                if n.strip()]
    order = [o for n in info.nodes for o in n.output
             if o in info.ancestors and len(info.shape(o) or ()) == 4 and info.is_spatial(o)]
    if not order:
        raise ProbeError("the model has no 4-D spatial tensor on the path to its output")
    area = [info.shape(o)[2] * info.shape(o)[3] for o in order]  # type: ignore[index]
    neck = order[max(i for i, a in enumerate(area) if a == min(area))]
    after = set(order[order.index(neck) + 1:])
    out = []
    for node in info.nodes:
        if node.op_type in ("Conv", "ConvTranspose") and node.output[0] in after:
            name = node.output[0]
            while True:
                cons = info.relevant_consumers(name)
                if (len(cons) != 1 or cons[0].op_type not in EARLY_FOLLOWERS
                        or cons[0].input[0] != name):
                    break
                name = cons[0].output[0]
            if name != info.logits_name:
                out.append(name)
    if not out:
        raise ProbeError(f"no convolution runs after the bottleneck ({neck}); name the decoder "
                         f"layers in layers.target")
    return list(dict.fromkeys(out))


def resolve_layer(info: GraphInfo, name: str, role: str) -> str:
    """A tensor name for `name`: a tensor, a node (its first output), or a torch module path.

    A torch module path such as `features.8` matches the nodes the exporter scoped
    under it (`/features/features.8/Relu` for an nn.Module, `/features/8/Relu` for a
    ScriptModule); the last of them gives the tensor.
    Raises ProbeError listing the 4-D candidates when nothing matches or the tensor
    is not 4-D with spatial extent.
    """
    tensor = None
    if name in info.producer or name == info.input_name:
        tensor = name
    else:
        node = next((n for n in info.nodes if n.name == name), None)
        if node is None:
            scoped = [n for n in info.nodes if _in_scope(n.name, name)]
            node = scoped[-1] if scoped else None
        if node is not None:
            tensor = node.output[0]
    if tensor is None:
        raise ProbeError(f"{role} layer {name!r} is neither a tensor nor a node of the model; "
                         f"4-D candidates: {_describe_candidates(info)}")
    if not info.is_spatial(tensor):
        raise ProbeError(f"{role} layer {name!r} resolves to tensor {tensor!r} of shape "
                         f"{info.shape(tensor)}, not 4-D with spatial extent; "
                         f"4-D candidates: {_describe_candidates(info)}")
    if tensor not in info.ancestors:
        raise ProbeError(f"{role} layer {name!r} ({tensor!r}) does not lie on the path to the "
                         f"logits; 4-D candidates: {_describe_candidates(info)}")
    return tensor


def features_tensor(info: GraphInfo) -> str | None:
    """The data input of the last Gemm/MatMul on the path to the logits (penultimate
    features), or None when there is none (the caller then uses the target's spatial mean)."""
    for node in reversed(info.nodes):
        if node.op_type in ("Gemm", "MatMul") and node.output[0] in info.ancestors:
            data = [i for i in node.input[:2] if i not in info.constants]
            if data:
                return data[0]
    return None


def extract_tail(info: GraphInfo, target: str) -> tuple[onnx.ModelProto, list[str]]:
    """The subgraph from `target` to the logits, as a model with input `target` first.

    Tensors the tail reads that do not depend on `target` (skip connections from
    earlier layers) become further inputs; their names are returned so the caller
    can capture them in the main run and feed them to the tail.
    """
    downstream = _descendants(info, target)
    keep: list[onnx.NodeProto] = []
    kept: set[int] = set()
    side: list[str] = []
    inits: set[str] = set()
    init_names = {t.name for t in info.model.graph.initializer}
    stack = [info.logits_name]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or not t or t == target:
            continue
        seen.add(t)
        if t in init_names:
            inits.add(t)
            continue
        node = info.producer.get(t)
        if node is not None and (t in downstream or node.op_type == "Constant"):
            if id(node) not in kept:
                kept.add(id(node))
                keep.append(node)
                stack.extend(node.input)
            continue
        side.append(t)
    order = {id(n): i for i, n in enumerate(info.nodes)}
    keep.sort(key=lambda n: order[id(n)])
    g = info.model.graph
    inputs = [helper.make_tensor_value_info(target, info.elem_types.get(target, 1),
                                            _dyn_batch(info.shape(target)))]
    inputs += [helper.make_tensor_value_info(s, info.elem_types.get(s, 1), None) for s in side]
    graph = helper.make_graph(keep, "tail", inputs, [g.output[0]],
                              initializer=[t for t in g.initializer if t.name in inits])
    tail = helper.make_model(graph, opset_imports=info.model.opset_import,
                             ir_version=info.model.ir_version)
    tail.functions.extend(info.model.functions)
    return tail, side


def gap_linear_tail(info: GraphInfo, target: str) -> tuple[np.ndarray, bool] | None:
    """The Jacobian of an affine tail after global average pooling, if the tail has that form.

    Tail = [Relu] -> GlobalAveragePool | ReduceMean(axes 2,3) -> [Flatten/Reshape/Squeeze]
    -> Gemm/MatMul (+Add, further affine maps) -> logits. Returns (M, relu) with M of
    shape (K_out, C) such that logits = M @ pooled + const, and relu True when a Relu
    sits between the target and the pooling; None for any other tail.
    """
    cur = target
    relu = False
    node = _single_consumer(info, cur)
    if node is not None and node.op_type == "Relu":
        relu, cur = True, node.output[0]
        node = _single_consumer(info, cur)
    if node is None or not _is_spatial_mean(info, node):
        return None
    s = info.shape(target)
    if s is None or s[1] is None:
        return None
    jac = np.eye(int(s[1]), dtype=np.float64)
    cur = node.output[0]
    while cur != info.logits_name:
        node = _single_consumer(info, cur)
        if node is None:
            return None
        jac = _affine_step(info, node, cur, jac)
        if jac is None:
            return None
        cur = node.output[0]
    if info.relevant_consumers(cur):  # logits feeding further computation: not a plain tail
        return None
    return jac, relu


def _describe_candidates(info: GraphInfo) -> str:
    cands = spatial_candidates(info)
    if not cands:
        cands = [o for n in info.nodes for o in n.output if len(info.shape(o) or ()) == 4]
    if not cands:
        return "none (the model has no 4-D tensor)"
    return ", ".join(f"{c} {list(info.shape(c) or [])}" for c in cands)


def _in_scope(node_name: str, module_path: str) -> bool:
    scope = node_name.split("/")[1:-1]
    if module_path in scope:
        return True
    parts = module_path.split(".")
    return any(scope[i:i + len(parts)] == parts for i in range(len(scope) - len(parts) + 1))


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.asarray(list(helper.get_attribute_value(a)))
    return None


def _ancestors(info: GraphInfo, name: str) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        node = info.producer.get(t)
        if node is not None:
            stack.extend(node.input)
    return seen


def _descendants(info: GraphInfo, name: str) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for node in info.consumers.get(t, []):
            stack.extend(node.output)
    return seen


def _dyn_batch(shape: tuple[int | None, ...] | None) -> list[int | str | None] | None:
    if shape is None:
        return None
    return ["batch"] + [d for d in shape[1:]]


def _single_consumer(info: GraphInfo, name: str) -> onnx.NodeProto | None:
    cons = info.relevant_consumers(name)
    return cons[0] if len(cons) == 1 and list(cons[0].input).count(name) == 1 else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_spatial_mean(info: GraphInfo, node: onnx.NodeProto) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = info.constants.get(node.input[1])
    if axes is None:
        return False
    return sorted(int(a) % 4 for a in np.asarray(axes).ravel()) == [2, 3]


def _affine_step(info: GraphInfo, node: onnx.NodeProto, cur: str,
                 jac: np.ndarray) -> np.ndarray | None:
    """The Jacobian after `node` given the Jacobian `jac` (D_cur, C) of its input `cur`."""
    op = node.op_type
    if op in _RESHAPES:
        return jac if node.input[0] == cur else None
    others = [i for i in node.input if i and i != cur]
    if any(o not in info.constants for o in others):
        return None
    if op == "Gemm":
        if node.input[0] != cur or _attr(node, "transA", 0):
            return None
        w = info.constants[node.input[1]].astype(np.float64)
        w = w.T if _attr(node, "transB", 0) else w
        return float(_attr(node, "alpha", 1.0)) * (w.T @ jac)
    if op == "MatMul":
        if node.input[0] != cur:
            return None
        w = info.constants[node.input[1]].astype(np.float64)
        return w.T @ jac if w.ndim == 2 else None
    if op in ("Add", "Sub"):
        c = info.constants[others[0]]
        if c.ndim > 1 and c.shape[0] != 1:
            return None  # a per-sample constant is not a bias
        return -jac if (op == "Sub" and node.input[1] == cur) else jac
    if op in ("Mul", "Div"):
        if op == "Div" and node.input[0] != cur:
            return None
        c = np.asarray(info.constants[others[0]], dtype=np.float64).reshape(-1)
        if c.size not in (1, jac.shape[0]):
            return None
        c = 1.0 / c if op == "Div" else c
        return c[:, None] * jac if c.size > 1 else float(c[0]) * jac
    return None
