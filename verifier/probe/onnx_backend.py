"""The onnxruntime backend of the probe contract: logits, features, Grad-CAM, early maps.

`OnnxProbe` probes .onnx files (and TorchScript files through an in-memory ONNX
export) in one session run per batch; `export_onnx` writes a torch module to .onnx.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

import verifier.probe.onnx_graph as og
import verifier.probe.onnx_outputs as oo
from verifier.probe.base import ProbeError, ProbeResult, wants_block_stds
from verifier.probe.onnx_files import OPSET, export_onnx, file_key, load_model
from verifier.probe.onnx_precision import to_double
from verifier.spec import ModelSpec, model_fingerprint

__all__ = ["OnnxProbe", "export_onnx", "load_analysed", "file_key", "check_batch", "pick_classes",
           "GRADIENT_METHODS", "OPSET"]


#: values `OnnxProbe(gradient=...)` accepts; "auto" picks exact where the tail allows it
GRADIENT_METHODS = ("auto", "exact-gap-linear", "finite-difference")
#: finite-difference step relative to the RMS of each image's target activation, by the
#: precision the tail runs in (float64 where onnxruntime has float64 kernels for every tail op)
DEFAULT_REL_EPS = {"float64": 1e-6, "float32": 3e-3}
#: most float32 elements one finite-difference chunk feeds the tail (about 256 MiB)
_FD_CHUNK_ELEMENTS = 1 << 26


class OnnxProbe:
    """Probe an ONNX (or TorchScript) classifier with onnxruntime.

    `run(x)` takes preprocessed float32 (N, C, H, W) and returns a `ProbeResult`.
    `gradient` forces how d(logit)/d(target activation) is computed ("auto",
    "exact-gap-linear" or "finite-difference"); `rel_eps` is the finite-difference
    step relative to the RMS of each image's target activation (default by tail
    precision, `DEFAULT_REL_EPS`). The tail runs in float64 when onnxruntime has
    float64 kernels for all its ops; `tail_precision` forces "float64" or "float32".
    `threads`: intra-op threads of its sessions, idle ones sleeping instead of spinning
    (None: onnxruntime's default, a spinning thread per core).
    """

    target_layer: str
    early_layer: str
    gradient_method: str
    fingerprint: str
    input_name: str

    def __init__(self, spec: ModelSpec, device: str | None = None, gradient: str = "auto",
                 rel_eps: float | None = None, tail_precision: str = "auto",
                 threads: int | None = None) -> None:
        if gradient not in GRADIENT_METHODS:
            raise ValueError(f"gradient must be one of {GRADIENT_METHODS}, got {gradient!r}")
        if tail_precision not in ("auto", "float64", "float32"):
            raise ValueError("tail_precision must be 'auto', 'float64' or 'float32'")
        if spec.path is None:
            raise ProbeError("OnnxProbe needs a spec with a model file (.onnx or TorchScript)")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.spec = spec
        self.fingerprint = model_fingerprint(spec)
        self.providers = _providers(device)
        self.threads = threads
        model = load_model(spec)
        info = og.analyse(model)
        self.input_name = info.input_name
        self.logits_name = info.logits_name
        _check_input(info, spec)
        if not og.spatial_candidates(info):
            info = _shapes_from_dummy_run(info, spec, self.providers)
        self.target_layer = (og.auto_target(info) if spec.target_layer == "auto"
                             else og.resolve_layer(info, spec.target_layer, "target"))
        self.early_layer = (og.auto_early(info) if spec.early_layer == "auto"
                            else og.resolve_layer(info, spec.early_layer, "early"))
        self.features_name = og.features_tensor(info)
        self._target_auto = spec.target_layer == "auto"
        self._early_auto = spec.early_layer == "auto"
        _check_logits(info, spec)
        self._exact = og.gap_linear_tail(info, self.target_layer)
        if gradient == "exact-gap-linear" and self._exact is None:
            raise ProbeError(f"the tail after {self.target_layer!r} is not global average "
                             "pooling followed by affine layers: exact gradients unavailable")
        if gradient == "finite-difference" or self._exact is None:
            self._exact = None
            tail, self._side = og.extract_tail(info, self.target_layer)
            self._tail, self.tail_precision = _tail_session(tail, self.providers,
                                                            tail_precision, threads)
            self.gradient_method = "finite-difference"
        else:
            self._side, self._tail, self.tail_precision = [], None, "float64"
            self.gradient_method = "exact-gap-linear"
        self.rel_eps = float(rel_eps if rel_eps is not None
                             else DEFAULT_REL_EPS[self.tail_precision])
        #: output of every conv block (a Conv advanced through its BN/activation), in order
        self.block_layers = og.conv_blocks(info)
        # their channel means (and, for blocks narrow enough, variances: `wants_block_stds`),
        # computed inside the graph (N, C) instead of fetched whole
        self.block_stds = wants_block_stds([(info.shape(b) or (None, None))[1] for b in self.block_layers])
        averaged, block_means, block_vars = oo.with_channel_means(model, self.block_layers, info,
                                                                  variances=self.block_stds)
        wanted = [self.logits_name, self.features_name or self.target_layer,
                  self.target_layer, self.early_layer, *self._side, *block_means, *block_vars]
        self._fetch = list(dict.fromkeys(wanted))  # a tensor can play two roles
        self._slots = [self._fetch.index(w) for w in wanted]
        self._n_side = len(self._side)
        self._session = _session(oo.with_outputs(averaged, self._fetch, info), self.providers,
                                 "model", threads)
        self.target_shape = info.shape(self.target_layer)
        self.early_shape = info.shape(self.early_layer)

    def describe(self) -> str:
        """One paragraph saying which layers were chosen (and how) and which gradient applies."""
        how = {"exact-gap-linear": "exact (global average pooling + affine head: the class "
                                   "row of the head's weights, masked by the ReLU if any)",
               "finite-difference": f"central finite differences on the extracted tail "
                                    f"subgraph in {self.tail_precision} (step "
                                    f"{self.rel_eps:g} x activation RMS)"}
        return (f"ONNX probe of {self.spec.path.name} ({self.fingerprint[:19]}...) on "
                f"{self._session.get_providers()[0]}: Grad-CAM layer {self.target_layer!r} "
                f"{list(self.target_shape or [])} ({'auto' if self._target_auto else 'named'}), "
                f"early layer {self.early_layer!r} {list(self.early_shape or [])} "
                f"({'auto' if self._early_auto else 'named'}), features "
                f"{self.features_name or 'spatial mean of the Grad-CAM layer'!r}; "
                f"gradient method {self.gradient_method}: {how[self.gradient_method]}.")

    def run(self, x: np.ndarray, classes: np.ndarray | None = None) -> ProbeResult:
        """One batched pass over float32 (N, C, H, W); `classes` (N,) picks each CAM's class.

        By default each map explains the argmax over the spec's real classes (the
        garbage output excluded), as the torch backend does.
        """
        x = check_batch(x, self.spec)
        got = self._session.run(self._fetch, {self.input_name: x})
        outs = [got[i] for i in self._slots]
        logits, feats, act, early = (np.asarray(o, dtype=np.float32) for o in outs[:4])
        side = outs[4:4 + self._n_side]
        nb = len(self.block_layers)
        stats = [np.asarray(o, dtype=np.float32) for o in outs[4 + self._n_side:]]
        blocks = tuple(stats[:nb])
        stds = tuple(np.sqrt(np.maximum(v, 0.0)) for v in stats[nb:])  # variances, with `block_stds`
        n = x.shape[0]
        if logits.ndim != 2 or logits.shape[1] < self.spec.num_classes:
            hint = (" (per-pixel class scores: a segmentation model; set [model] task = "
                    "\"segmentation\")" if logits.ndim == 4 else "")
            raise ProbeError(f"model output has shape {list(logits.shape)}; expected "
                             f"(N, >= {self.spec.num_classes}) logits{hint}")
        cls = pick_classes(logits, classes, self.spec)
        if self._exact is not None:
            alpha = _exact_alpha(act, self._exact[0], self._exact[1], cls)
        else:
            alpha = self._fd_alpha(act, cls, side)
        cam = np.maximum(np.einsum("nk,nkhw->nhw", alpha, act.astype(np.float64)), 0.0)
        early_stats = early.mean(axis=(2, 3)).astype(np.float32)  # before |A| in place below
        # |A| in place: a fresh copy of a large early activation costs more than the mean
        # (the array is onnxruntime's own output, unless it is the target activation too)
        early_abs = np.abs(early, out=early if early is not act else None)
        return ProbeResult(
            logits=logits,
            features=(feats.reshape(n, -1) if self.features_name
                      else act.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)),
            cam=cam.astype(np.float32),
            cam_class=cls,
            early_stats=early_stats,
            early_map=early_abs.mean(axis=1).astype(np.float32),
            block_stats=blocks,
            block_stds=stds,
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass only: (N, K_out) float32 logits of preprocessed (N, C, H, W) images."""
        x = check_batch(x, self.spec)
        (out,) = self._session.run([self.logits_name], {self.input_name: x})
        return np.asarray(out, dtype=np.float32)

    def _fd_alpha(self, act: np.ndarray, cls: np.ndarray, side: list[Any]) -> np.ndarray:
        """Channel weights (N, C) by central differences along all-ones channel directions."""
        n, c, h, w = act.shape
        rms = np.sqrt(np.mean(np.square(act, dtype=np.float64), axis=(1, 2, 3)))
        dtype = np.float64 if self.tail_precision == "float64" else np.float32
        eps = (self.rel_eps * np.maximum(rms, 1e-6)).astype(dtype)
        rows = n * 2 * c  # row r: image r // 2c, channel r % c, sign + then -
        img = np.repeat(np.arange(n), 2 * c)
        chan = np.tile(np.arange(c), 2 * n)
        sign = np.tile(np.repeat(np.array([1.0, -1.0], dtype=dtype), c), n)
        act = act.astype(dtype)
        step = max(1, _FD_CHUNK_ELEMENTS // (c * h * w))
        y = np.empty(rows, dtype=np.float64)
        for lo in range(0, rows, step):
            sl = slice(lo, min(rows, lo + step))
            xi = act[img[sl]]
            xi[np.arange(xi.shape[0]), chan[sl]] += (sign[sl] * eps[img[sl]])[:, None, None]
            feed = {self.target_layer: xi}
            for name, val in zip(self._side, side):
                val = np.asarray(val)
                val = val.astype(dtype) if val.dtype == np.float32 else val
                feed[name] = val[img[sl]] if val.ndim and val.shape[0] == n else val
            out = np.asarray(self._tail.run([self.logits_name], feed)[0], dtype=np.float64)
            y[sl] = out[np.arange(out.shape[0]), cls[img[sl]]]
        y = y.reshape(n, 2, c)
        return (y[:, 0] - y[:, 1]) / (2.0 * eps.astype(np.float64)[:, None] * h * w)


def check_batch(x: Any, spec: ModelSpec) -> np.ndarray:
    """Preprocessed images as contiguous float32 (N, C, H, W) of the spec's geometry, N >= 1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = (spec.channels, *spec.size)
    if x.ndim != 4 or x.shape[1:] != want:
        raise ProbeError(f"input batch has shape {list(x.shape)}; expected (N, {want[0]}, "
                         f"{want[1]}, {want[2]}) preprocessed float32")
    if x.shape[0] == 0:
        raise ProbeError("input batch is empty")
    return x


def pick_classes(logits: np.ndarray, classes: np.ndarray | None, spec: ModelSpec) -> np.ndarray:
    """Requested classes, else the argmax over the real classes (garbage output excluded)."""
    if classes is None:
        real = logits[:, :spec.num_classes].copy()
        g = spec.garbage_class
        if g is not None and g < spec.num_classes:
            real[:, g] = -np.inf
        return real.argmax(axis=1).astype(np.int64)
    cls = np.asarray(classes, dtype=np.int64).reshape(-1)
    if cls.shape[0] != logits.shape[0] or cls.min() < 0 or cls.max() >= logits.shape[1]:
        raise ProbeError(f"classes must be {logits.shape[0]} indices in [0, "
                         f"{logits.shape[1]}), got {classes!r}")
    return cls


def _providers(device: str | None) -> list[str]:
    import onnxruntime as ort

    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" or (device is None and have_cuda):
        if not have_cuda:
            raise ProbeError("device 'cuda' asked but onnxruntime has no CUDAExecutionProvider "
                             "(install the [gpu] extra: onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device not in (None, "cpu"):
        raise ProbeError(f"unknown device {device!r} for the ONNX backend (use 'cpu' or 'cuda')")
    return ["CPUExecutionProvider"]


def load_analysed(spec: ModelSpec, providers: list[str]) -> tuple[onnx.ModelProto, og.GraphInfo]:
    """The spec's model (ONNX, or TorchScript exported in memory) and its graph index, with
    intermediate shapes filled by one zero batch when shape inference left them unknown."""
    model = load_model(spec)
    info = og.analyse(model)
    if not og.spatial_candidates(info):
        info = _shapes_from_dummy_run(info, spec, providers)
    return model, info


def _session(model: onnx.ModelProto, providers: list[str], what: str,
             threads: int | None = None) -> Any:
    """An inference session. `threads`: its intra-op threads, which then sleep between runs
    instead of spin-waiting (onnxruntime's default is one thread per core, spinning: right for
    back-to-back batches, but in a service each spinning thread burns a core the event loop
    needs between two probe passes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                    providers=providers)
    except Exception as e:
        raise ProbeError(f"onnxruntime cannot load the {what}: {e}") from None


def _tail_session(tail: onnx.ModelProto, providers: list[str], want: str,
                  threads: int | None = None) -> tuple[Any, str]:
    """The tail's session in float64 when every op has a float64 kernel, else float32."""
    if want != "float32":
        try:
            return _session(to_double(tail), providers, "tail subgraph", threads), "float64"
        except (ProbeError, ValueError) as e:
            if want == "float64":
                raise ProbeError(f"the tail cannot run in float64: {e}") from None
    return _session(tail, providers, "tail subgraph", threads), "float32"


def _check_input(info: og.GraphInfo, spec: ModelSpec) -> None:
    shape = info.shape(info.input_name)
    if shape is None:
        return
    if len(shape) != 4:
        raise ProbeError(f"model input {info.input_name!r} has rank {len(shape)} "
                         f"(shape {list(shape)}); an image classifier takes (N, C, H, W)")
    want = (spec.channels, *spec.size)
    for got, exp, what in zip(shape[1:], want, ("channels", "height", "width")):
        if got is not None and got != exp:
            raise ProbeError(f"model input {info.input_name!r} has {what} {got} but the spec "
                             f"says {exp} (model input shape {list(shape)})")


def _check_logits(info: og.GraphInfo, spec: ModelSpec) -> None:
    shape = info.shape(info.logits_name)
    if shape is None:
        return
    if len(shape) != 2:
        hint = (" (per-pixel class scores: a segmentation model; set [model] task = "
                "\"segmentation\")" if len(shape) == 4 else "")
        raise ProbeError(f"model output {info.logits_name!r} has shape {list(shape)}; "
                         f"expected (N, K) logits{hint}")
    if shape[1] is not None and shape[1] < spec.num_classes:
        raise ProbeError(f"model gives {shape[1]} logits but the spec lists "
                         f"{spec.num_classes} classes")
    if spec.garbage_class is not None and shape[1] is not None and spec.garbage_class >= shape[1]:
        raise ProbeError(f"garbage_class {spec.garbage_class} is outside the model's "
                         f"{shape[1]} outputs")


def _shapes_from_dummy_run(info: og.GraphInfo, spec: ModelSpec,
                           providers: list[str]) -> og.GraphInfo:
    """Fill unknown intermediate shapes by one zero batch with every float tensor as output."""
    names = [o for n in info.nodes for o in n.output
             if o and info.elem_types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
    sess = _session(oo.with_outputs(info.model, names, info), providers, "model")
    outs = sess.run(names, {info.input_name: np.zeros((1, spec.channels, *spec.size),
                                                      dtype=np.float32)})
    for name, val in zip(names, outs):
        shape = tuple(int(d) for d in np.shape(val))
        if shape:
            info.shapes[name] = (None, *shape[1:])
    return info


def _exact_alpha(act: np.ndarray, jac: np.ndarray, relu: bool, cls: np.ndarray) -> np.ndarray:
    """alpha (N, C) = mean over positions of d y_c / d A: row c of the head, / (h w), ReLU-masked."""
    n, c, h, w = act.shape
    rows = jac[cls]  # (N, C)
    if relu:
        frac = (act > 0).mean(axis=(2, 3), dtype=np.float64)
        return rows * frac / (h * w)
    return rows / (h * w)
