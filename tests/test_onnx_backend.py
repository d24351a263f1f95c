"""Tests of the ONNX backend against PyTorch autograd on small CNNs trained on real MNIST.

Reference Grad-CAM is computed here the naive way: full backward from an input
that requires grad, gradient read at a forward-hooked layer.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from verifier.examples.datasets import load_mnist, ood_images
from verifier.examples.zoo import SmallCNN, mnist_spec, preprocess_uint8, train_classifier
from verifier.probe.base import ProbeError
from verifier.probe.factory import open_probe
from verifier.probe.onnx_backend import OnnxProbe, export_onnx
from verifier.spec import ModelSpec, model_fingerprint

torch.set_num_threads(2)

TARGET = "/features/features.8/Relu_output_0"
EARLY = "/features/features.2/Relu_output_0"


def file_spec(path: Path, classes: int = 10, channels: int = 1, size=(28, 28), **kw) -> ModelSpec:
    return ModelSpec(classes=tuple(str(i) for i in range(classes)), size=size, channels=channels,
                     mean=(0.1307,) * channels, std=(0.3081,) * channels, path=path, **kw)


def torch_reference(model: nn.Module, x: torch.Tensor, target: str, early: str,
                    classes: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Logits, features, Grad-CAM and early maps by hooks and a full backward pass."""
    mods = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = [mods[target].register_forward_hook(lambda m, i, o: acts.__setitem__("t", o)),
               mods[early].register_forward_hook(lambda m, i, o: acts.__setitem__("e", o))]
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    handles.append(last_linear.register_forward_hook(
        lambda m, i, o: acts.__setitem__("f", i[0])))
    try:
        xr = x.clone().requires_grad_(True)
        logits = model(xr)
    finally:
        for h in handles:
            h.remove()
    cls = logits.argmax(1) if classes is None else classes
    grad, = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), acts["t"])
    alpha = grad.mean(dim=(2, 3))
    cam = torch.relu((alpha[:, :, None, None] * acts["t"]).sum(1))
    e = acts["e"].detach()
    return {"logits": logits.detach().numpy(), "features": acts["f"].detach().numpy(),
            "cam": cam.detach().numpy(), "cls": cls.numpy(),
            "early_map": e.abs().mean(1).numpy(), "early_stats": e.mean((2, 3)).numpy()}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image cosine of (N, ...) maps; two all-zero maps agree (1.0)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-300))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """48 real held-out MNIST digits and 24 real photo crops, preprocessed (72, 1, 28, 28)."""
    x, _ = load_mnist()
    return preprocess_uint8(np.concatenate([x[4000:4048], ood_images("photos", 24)]))


@pytest.fixture(scope="module")
def models(tmp_path_factory, gap_model, fc_model) -> dict[str, tuple[nn.Module, Path]]:
    """The session's SmallCNNs (conftest: gap and fc heads trained on 3,000 real digits,
    which exclude the digits of `batch`) and their ONNX exports."""
    out = tmp_path_factory.mktemp("onnx")
    return {head: (m, export_onnx(m, mnist_spec(m), out / f"{head}.onnx"))
            for head, m in (("gap", gap_model), ("fc", fc_model))}


def assert_matches(res, ref, cam_cos: float = 0.999) -> None:
    np.testing.assert_allclose(res.logits, ref["logits"], atol=1e-4)
    np.testing.assert_allclose(res.features, ref["features"], atol=1e-4)
    np.testing.assert_array_equal(res.cam_class, ref["cls"])
    np.testing.assert_allclose(res.early_map, ref["early_map"], atol=1e-4)
    np.testing.assert_allclose(res.early_stats, ref["early_stats"], atol=1e-4)
    cos = cosine(res.cam, ref["cam"])
    assert cos.min() >= cam_cos, f"worst Grad-CAM cosine {cos.min():.6f}"
    assert res.cam.dtype == np.float32 and res.cam.shape == ref["cam"].shape


@pytest.mark.parametrize("head,method", [("gap", "exact-gap-linear"), ("fc", "finite-difference")])
def test_matches_torch_autograd(models, batch, head, method):
    model, path = models[head]
    probe = OnnxProbe(file_spec(path))
    assert probe.gradient_method == method
    assert (probe.target_layer, probe.early_layer) == (TARGET, EARLY)
    ref = torch_reference(model, batch, "features.8", "features.2")
    res = probe.run(batch.numpy())
    assert_matches(res, ref)
    assert res.cam.shape == (len(batch), 7, 7) and res.early_map.shape == (len(batch), 28, 28)
    assert res.early_stats.shape == (len(batch), 16)
    assert res.cam.max() > 0  # real maps, not all zero


@pytest.mark.parametrize("head", ["gap", "fc"])
@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_forced_finite_differences_agree(models, batch, head, precision):
    """The tail runs in float64 (GlobalAveragePool rewritten to ReduceMean) unless forced."""
    model, path = models[head]
    probe = OnnxProbe(file_spec(path), gradient="finite-difference", tail_precision=precision)
    want = "float64" if precision == "auto" else "float32"
    assert probe.gradient_method == "finite-difference" and probe.tail_precision == want
    assert_matches(probe.run(batch.numpy()), torch_reference(model, batch, "features.8", "features.2"))


def test_requested_classes_are_explained(models, batch):
    model, path = models["fc"]
    cls = torch.from_numpy(np.arange(len(batch)) % 10)
    res = OnnxProbe(file_spec(path)).run(batch.numpy(), classes=cls.numpy())
    assert_matches(res, torch_reference(model, batch, "features.8", "features.2", classes=cls))


def test_exact_method_masks_a_relu_between_target_and_pool(models, batch):
    """Target = conv output before the last ReLU: the exact weights need the ReLU mask."""
    model, path = models["gap"]
    probe = OnnxProbe(file_spec(path, target_layer="/features/features.7/Conv"))
    assert probe.target_layer == "/features/features.7/Conv_output_0"
    assert probe.gradient_method == "exact-gap-linear"
    assert_matches(probe.run(batch.numpy()), torch_reference(model, batch, "features.7", "features.2"))


def test_mid_network_target_has_a_float32_tail(models, batch):
    """A target before MaxPool and Conv: the tail has no float64 Conv kernel, so float32 FD."""
    model, path = models["fc"]
    probe = OnnxProbe(file_spec(path, target_layer="features.5", early_layer="features.0"))
    assert probe.target_layer == "/features/features.5/Relu_output_0"
    assert probe.early_layer == "/features/features.0/Conv_output_0"
    assert probe.tail_precision == "float32"
    res = probe.run(batch.numpy())
    # the exporter folds BatchNorm into the Conv: the ONNX Conv output is torch's BN output
    ref = torch_reference(model, batch, "features.5", "features.1")
    assert_matches(res, ref, cam_cos=0.995)


def test_layer_names_tensor_node_and_module_path_agree(models):
    _, path = models["gap"]
    names = [TARGET, "/features/features.8/Relu", "features.8"]
    assert {OnnxProbe(file_spec(path, target_layer=n)).target_layer for n in names} == {TARGET}


def test_wrong_layer_name_lists_candidates(models):
    _, path = models["gap"]
    with pytest.raises(ProbeError) as e:
        OnnxProbe(file_spec(path, target_layer="layer4"))
    assert "layer4" in str(e.value) and TARGET in str(e.value) and "[None, 64, 7, 7]" in str(e.value)
    with pytest.raises(ProbeError, match="not 4-D"):
        OnnxProbe(file_spec(path, early_layer="/head/head.1/Flatten_output_0"))


class Residual(nn.Module):
    """conv stem -> [conv, ReLU] + skip -> ReLU -> GAP -> linear; `relu_skip` puts a ReLU on the skip."""

    def __init__(self, relu_skip: bool) -> None:
        super().__init__()
        last = nn.ReLU() if relu_skip else nn.Conv2d(8, 8, 1)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), last)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.relu(self.body(s) + s))


@pytest.mark.parametrize("relu_skip", [False, True])
def test_skip_connection_feeds_the_tail_as_side_input(tmp_path, batch, relu_skip):
    """Target inside a residual block: the skip branch is captured and fed to the tail.

    With a ReLU on the skip, ReLU(body + skip) sits exactly on its kink wherever both
    are 0; central differences then give slope 1/2 where autograd uses 0 (a documented
    limit), so that case is held to a looser bound.
    """
    x, y = load_mnist()
    model = train_classifier(Residual(relu_skip), x[:600], y[:600], epochs=1)
    path = export_onnx(model, mnist_spec(model), tmp_path / "res.onnx")
    probe = OnnxProbe(file_spec(path, target_layer="body.1", early_layer="stem.1"))
    assert probe.gradient_method == "finite-difference" and probe._side
    assert probe.tail_precision == "float64"
    ref = torch_reference(model, batch, "body.1", "stem.1")
    assert_matches(probe.run(batch.numpy()), ref, cam_cos=0.99 if relu_skip else 0.999)


def test_torchscript_file_is_probed_through_onnx(models, batch, tmp_path):
    model, onnx_path = models["fc"]
    pt = tmp_path / "traced.pt"
    torch.jit.trace(model, batch[:2]).save(str(pt))
    probe = open_probe(file_spec(pt))
    assert isinstance(probe, OnnxProbe)
    assert probe.fingerprint == "sha256:" + hashlib.sha256(pt.read_bytes()).hexdigest()
    # a ScriptModule exports with one scope per attribute: /features/8/Relu
    assert (probe.target_layer, probe.early_layer) == ("/features/8/Relu_output_0",
                                                       "/features/2/Relu_output_0")
    assert OnnxProbe(file_spec(pt, target_layer="features.8")).target_layer == probe.target_layer
    assert_matches(probe.run(batch.numpy()), torch_reference(model, batch, "features.8", "features.2"))
    onnx_res = OnnxProbe(file_spec(onnx_path)).run(batch.numpy())
    np.testing.assert_allclose(probe.run(batch.numpy()).cam, onnx_res.cam, atol=1e-5)


def test_fingerprint_is_the_file_hash_and_describe_tells_the_choice(models):
    _, path = models["fc"]
    spec = file_spec(path)
    probe = OnnxProbe(spec)
    assert probe.fingerprint == model_fingerprint(spec)
    assert probe.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert probe.input_name == "input"
    text = probe.describe()
    assert TARGET in text and EARLY in text and "(auto)" in text and "finite-difference" in text


def test_batches_concatenate_like_one_pass(models, batch):
    _, path = models["gap"]
    probe = OnnxProbe(file_spec(path))
    whole = probe.run(batch.numpy())
    for _ in range(3):  # repeated calls give identical results (no state carried over)
        parts = [probe.run(batch[i:i + 20].numpy()) for i in range(0, len(batch), 20)]
    from verifier.probe.base import ProbeResult
    joined = ProbeResult.concat(parts)
    np.testing.assert_allclose(joined.cam, whole.cam, atol=1e-6)
    np.testing.assert_allclose(joined.logits, whole.logits, atol=1e-6)


def test_refuses_a_model_without_spatial_layer(tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    path = export_onnx(mlp, mnist_spec(mlp), tmp_path / "mlp.onnx")
    with pytest.raises(ProbeError, match="no spatial layer"):
        OnnxProbe(file_spec(path))


def test_refuses_rank2_input(tmp_path):
    mlp = nn.Sequential(nn.Linear(784, 10)).eval()
    path = tmp_path / "flat.onnx"
    torch.onnx.export(mlp, torch.zeros(1, 784), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    with pytest.raises(ProbeError, match="rank 2"):
        OnnxProbe(file_spec(path))


def test_refuses_garbage_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff\x13 at all" * 10)
    with pytest.raises(ProbeError, match="not a valid ONNX model"):
        OnnxProbe(file_spec(path))
    path.write_bytes(b"")
    with pytest.raises(ProbeError, match="not a valid ONNX"):
        OnnxProbe(file_spec(path))


def test_refuses_spec_model_mismatch(models, batch):
    _, path = models["gap"]
    with pytest.raises(ProbeError, match="channels 1 but the spec says 3"):
        OnnxProbe(file_spec(path, channels=3))
    with pytest.raises(ProbeError, match="height 28 but the spec says 32"):
        OnnxProbe(file_spec(path, size=(32, 32)))
    with pytest.raises(ProbeError, match="10 logits but the spec lists 12"):
        OnnxProbe(file_spec(path, classes=12))
    probe = OnnxProbe(file_spec(path))
    with pytest.raises(ProbeError, match="expected"):
        probe.run(batch.numpy()[:, 0])
    with pytest.raises(ProbeError, match="classes"):
        probe.run(batch.numpy()[:4], classes=np.array([0, 1, 2, 10]))
    with pytest.raises(ProbeError, match="exact gradients unavailable"):
        OnnxProbe(file_spec(models["fc"][1]), gradient="exact-gap-linear")


def test_export_restores_training_mode(tmp_path):
    model = SmallCNN(head="gap").train()
    export_onnx(model, mnist_spec(model), tmp_path / "m.onnx")
    assert model.training
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


@pytest.mark.parametrize("head", ["gap", "fc"])
def test_parity_with_torch_probe(models, batch, head):
    """The two backends on the same trained model: same layers' numbers, same maps."""
    from verifier.probe.torch_backend import TorchProbe

    model, path = models[head]
    t = TorchProbe(mnist_spec(model)).run(batch.numpy())
    o = OnnxProbe(file_spec(path)).run(batch.numpy())
    np.testing.assert_allclose(o.logits, t.logits, atol=1e-4)
    np.testing.assert_allclose(o.features, t.features, atol=1e-4)
    np.testing.assert_array_equal(o.cam_class, t.cam_class)
    np.testing.assert_allclose(o.early_map, t.early_map, atol=1e-4)
    np.testing.assert_allclose(o.early_stats, t.early_stats, atol=1e-4)
    assert cosine(o.cam, t.cam).min() >= 0.999


def test_parity_with_torch_probe_garbage_output_and_no_linear_layer(tmp_path, batch):
    """A fully convolutional net (no Linear: features = spatial mean of the Grad-CAM layer)
    whose last output is a garbage class the default CAM class must skip."""
    from verifier.probe.torch_backend import TorchProbe

    x, y = load_mnist()
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 11, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = train_classifier(model, x[:600], y[:600], epochs=1)
    spec = ModelSpec(classes=tuple(str(i) for i in range(11)), size=(28, 28), mean=(0.1307,),
                     std=(0.3081,), garbage_class=3, module=model)
    path = export_onnx(model, spec, tmp_path / "fcn.onnx")
    for target, method in (("auto", "exact-gap-linear"), ("4", "finite-difference")):
        # auto: the 1x1 conv's output (last spatial tensor), then GAP: exact;
        # "4": the ReLU before it, whose tail holds a Conv: float32 finite differences
        probe = OnnxProbe(file_spec(path, classes=11, garbage_class=3, target_layer=target))
        assert probe.features_name is None and probe.gradient_method == method
        t = TorchProbe(replace(spec, target_layer=target)).run(batch.numpy())
        o = probe.run(batch.numpy())
        assert not (o.cam_class == 3).any()
        np.testing.assert_array_equal(o.cam_class, t.cam_class)
        np.testing.assert_allclose(o.logits, t.logits, atol=1e-4)
        np.testing.assert_allclose(o.features, t.features, atol=1e-4)
        assert cosine(o.cam, t.cam).min() >= 0.999


def test_threads_set_the_sessions_and_change_no_answer(models, batch):
    """`threads` (what `verifier serve --probe-threads` passes): every session gets that many
    intra-op threads, idle ones sleeping instead of spinning, and the answers are the same."""
    _, path = models["gap"]
    default, single = OnnxProbe(file_spec(path)), open_probe(file_spec(path), threads=1)
    for s in (single._session, single._tail):
        if s is not None:
            opts = s.get_session_options()
            assert opts.intra_op_num_threads == 1
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    a, b = default.run(batch.numpy()), single.run(batch.numpy())
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.cam, b.cam, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="threads"):
        open_probe(file_spec(path), threads=0)
