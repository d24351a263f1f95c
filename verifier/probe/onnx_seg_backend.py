"""A segmentation model FILE (ONNX, or TorchScript exported in memory) as the gate sees a model.

The same ProbeResult as `SegmentationProbe` gives for an nn.Module (docs/segmentation.md):
image-level scores (each class's predicted area) for logits, the explained class's region,
and the adapted Grad-CAM of that region's score summed over the decoder layers. onnxruntime
has no gradients, so each decoder layer's Grad-CAM weights come from central finite
differences on the tail after that layer: alpha_k = mean_ij dy/dA_kij is the derivative of
the region score y along the all-ones direction of channel k, divided by h*w, the same
directional derivative the classifier ONNX probe takes (one tail row per channel and sign,
batched; the tail in float64 where onnxruntime has float64 kernels for its ops).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import verifier.probe.onnx_backend as ob
import verifier.probe.onnx_graph as og
import verifier.probe.onnx_outputs as oo
from verifier.probe.base import ProbeError, ProbeResult
from verifier.probe.seg_backend import image_scores, output_mask
from verifier.spec import ModelSpec, SpecError, check_output_shape, model_fingerprint

__all__ = ["OnnxSegmentationProbe"]

#: most elements (tail input + output) one finite-difference chunk holds (about 64 MiB float32)
_FD_CHUNK_ELEMENTS = 1 << 24


class OnnxSegmentationProbe:
    """Probe for a segmentation model file (spec task "segmentation", backend onnx/torchscript).

    run(x) -> ProbeResult as `SegmentationProbe.run`: logits = `image_scores` (N, K), cam =
    adapted Grad-CAM (N, H', W') of the explained class's predicted region summed over the
    decoder layers, features = the last decoder layer's channel means, early map / stats and
    conv-block stats as the classifier probes compute them. `rel_eps`: the finite-difference
    step relative to each image's activation RMS (default by tail precision, as OnnxProbe);
    `threads`: intra-op threads of its sessions (None: onnxruntime's default).
    """

    def __init__(self, spec: ModelSpec, device: str | None = None, rel_eps: float | None = None,
                 tail_precision: str = "auto", threads: int | None = None) -> None:
        if spec.path is None:
            raise ProbeError("OnnxSegmentationProbe needs a spec with a model file "
                             "(.onnx or TorchScript)")
        self.spec = spec
        self.fingerprint = model_fingerprint(spec)
        providers = ob._providers(device)
        model, info = ob.load_analysed(spec, providers)
        ob._check_input(info, spec)
        shape = info.shape(info.logits_name)
        if shape is not None:
            _check_scores(spec, tuple(d if d is not None else 1 for d in shape))
        self.input_name, self.logits_name = info.input_name, info.logits_name
        self.decoder = og.decoder_tensors(info, spec.target_layer)
        self.target_layer = ",".join(self.decoder)
        self.early_layer = (og.auto_early(info) if spec.early_layer == "auto"
                            else og.resolve_layer(info, spec.early_layer, "early"))
        self.block_layers = og.conv_blocks(info)
        self._tails: list[tuple[Any, str, list[str]]] = []
        for name in self.decoder:
            tail, side = og.extract_tail(info, name)
            session, precision = ob._tail_session(tail, providers, tail_precision, threads)
            self._tails.append((session, precision, side))
        self.tail_precision = ",".join(dict.fromkeys(p for _, p, _ in self._tails))
        self.rel_eps = rel_eps
        sides = [s for _, _, side in self._tails for s in side]
        self._fetch = list(dict.fromkeys([self.logits_name, *self.decoder, self.early_layer,
                                          *self.block_layers, *sides]))
        self._session = ob._session(oo.with_outputs(model, self._fetch, info), providers, "model",
                                    threads)
        self.gradient_method = "finite-difference-decoder-sum"

    def describe(self) -> str:
        """Which layers were chosen and how the gradients are taken, for reports."""
        return (f"segmentation ONNX backend ({self.spec.path.name}): Grad-CAM of the explained "
                f"region summed over decoder layers {', '.join(self.decoder)}, weights by "
                f"central finite differences on each layer's tail in {self.tail_precision}; "
                f"early layer '{self.early_layer}'")

    def run(self, x: np.ndarray, classes: np.ndarray | None = None) -> ProbeResult:
        """One batched pass over preprocessed (N, C, H, W) float32 images; `classes` (N,)
        picks the class whose predicted region each map explains."""
        x = ob.check_batch(x, self.spec)
        got = dict(zip(self._fetch, self._session.run(self._fetch, {self.input_name: x})))
        scores = np.asarray(got[self.logits_name])
        _check_scores(self.spec, scores.shape)
        logits = image_scores(torch.from_numpy(scores), self.spec.background_class).numpy()
        cls = ob.pick_classes(logits, classes, self.spec)
        region = scores.argmax(axis=1) == cls[:, None, None]
        size = scores.shape[2:]
        cam = np.zeros((len(x), *size), dtype=np.float64)
        for name, (session, precision, side) in zip(self.decoder, self._tails):
            act = np.asarray(got[name])
            alpha = self._fd_alpha(session, precision, name, act, [got[s] for s in side], side,
                                   cls, region)
            m = np.maximum(np.einsum("nk,nkhw->nhw", alpha, act.astype(np.float64)), 0.0)
            if m.shape[1:] != size:
                m = F.interpolate(torch.from_numpy(m)[:, None], size=size, mode="bilinear",
                                  align_corners=False)[:, 0].numpy()
            cam += m
        early = np.asarray(got[self.early_layer], dtype=np.float32)
        return ProbeResult(
            logits=logits.astype(np.float32),
            features=np.asarray(got[self.decoder[-1]]).mean(axis=(2, 3), dtype=np.float64)
            .astype(np.float32),
            cam=cam.astype(np.float32),
            cam_class=cls,
            early_map=np.abs(early).mean(axis=1).astype(np.float32),
            early_stats=early.mean(axis=(2, 3)).astype(np.float32),
            block_stats=tuple(np.asarray(got[b]).mean(axis=(2, 3), dtype=np.float64)
                              .astype(np.float32) for b in self.block_layers))

    def features(self, x: np.ndarray) -> np.ndarray:
        """`run(x).features` (the last decoder layer's channel means) from one forward pass,
        without the finite differences of the attention map."""
        x = ob.check_batch(x, self.spec)
        (act,) = self._session.run([self.decoder[-1]], {self.input_name: x})
        return np.asarray(act).mean(axis=(2, 3), dtype=np.float64).astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass only: (N, K) float32 image-level scores (`image_scores`)."""
        x = ob.check_batch(x, self.spec)
        (scores,) = self._session.run([self.logits_name], {self.input_name: x})
        _check_scores(self.spec, np.shape(scores))
        return image_scores(torch.from_numpy(np.asarray(scores)),
                            self.spec.background_class).numpy().astype(np.float32)

    def kept_logits(self, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """`logits(x)` counting only the pixels where `keep` (N, H, W) bool at the input's
        resolution is True: what a segmenter says about the part of the image left in place."""
        x = ob.check_batch(x, self.spec)
        (scores,) = self._session.run([self.logits_name], {self.input_name: x})
        _check_scores(self.spec, np.shape(scores))
        scores = np.asarray(scores)
        return image_scores(torch.from_numpy(scores), self.spec.background_class,
                            output_mask(keep, scores.shape[2:])).numpy().astype(np.float32)

    def _fd_alpha(self, session: Any, precision: str, name: str, act: np.ndarray,
                  side_vals: list[Any], side: list[str], cls: np.ndarray,
                  region: np.ndarray) -> np.ndarray:
        """Channel weights (N, k) of one decoder layer: central differences of the region score
        along each channel's all-ones direction, divided by h*w (rows: image, sign, channel)."""
        n, c, h, w = act.shape
        dtype = np.float64 if precision == "float64" else np.float32
        rel = self.rel_eps if self.rel_eps is not None else ob.DEFAULT_REL_EPS[precision]
        rms = np.sqrt(np.mean(np.square(act, dtype=np.float64), axis=(1, 2, 3)))
        eps = (rel * np.maximum(rms, 1e-6)).astype(dtype)
        rows = n * 2 * c
        img = np.repeat(np.arange(n), 2 * c)
        chan = np.tile(np.arange(c), 2 * n)
        sign = np.tile(np.repeat(np.array([1.0, -1.0], dtype=dtype), c), n)
        act = act.astype(dtype)
        side_vals = [np.asarray(v).astype(dtype) if np.asarray(v).dtype == np.float32
                     else np.asarray(v) for v in side_vals]
        out_size = region[0].size * max(self.spec.num_classes, 1)
        step = max(1, _FD_CHUNK_ELEMENTS // (c * h * w + out_size))
        y = np.empty(rows, dtype=np.float64)
        for lo in range(0, rows, step):
            sl = slice(lo, min(rows, lo + step))
            i = img[sl]
            xi = act[i]
            xi[np.arange(len(i)), chan[sl]] += (sign[sl] * eps[i])[:, None, None]
            feed = {name: xi}
            for s, val in zip(side, side_vals):
                feed[s] = val[i] if val.ndim and val.shape[0] == n else val
            out = np.asarray(session.run([self.logits_name], feed)[0])
            picked = out[np.arange(len(i)), cls[i]]
            y[sl] = np.einsum("rhw,rhw->r", picked, region[i], dtype=np.float64)
        y = y.reshape(n, 2, c)
        return (y[:, 0] - y[:, 1]) / (2.0 * eps.astype(np.float64)[:, None] * h * w)


def _check_scores(spec: ModelSpec, shape: tuple) -> None:
    try:
        check_output_shape(spec, tuple(int(d) for d in shape))
    except SpecError as e:
        raise ProbeError(str(e)) from None
