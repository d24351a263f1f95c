"""The PyTorch probe: tail-only Grad-CAM against a naive full backward, layer choice, state restored."""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import POOL
from torch import nn

from verifier.examples.zoo import mnist_spec, preprocess_uint8
from verifier.probe.base import ProbeError
from verifier.probe.torch_backend import TorchProbe


def naive_gradcam(model: nn.Module, layer: str, x: torch.Tensor, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Grad-CAM: input requires grad, full backward, gradient read at the layer."""
    acts = {}
    module = dict(model.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
    finally:
        h.remove()
    cls = out.argmax(1) if classes is None else torch.as_tensor(classes)
    (grad,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), acts["a"])
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * acts["a"]).sum(1))
    return cam.detach().numpy(), out.detach().numpy()


@pytest.mark.parametrize("model_name", ["gap_model", "fc_model"])
def test_tail_only_gradcam_equals_full_backward(request, mnist, model_name):
    model = request.getfixturevalue(model_name)
    x = preprocess_uint8(mnist[0][POOL][:96])
    probe = TorchProbe(mnist_spec(model))
    res = probe.run(x.numpy())
    cam, logits = naive_gradcam(model, probe.target_layer, x)
    assert res.cam.shape == (96, 7, 7)
    assert np.abs(res.cam - cam).max() <= 1e-5 * max(1.0, np.abs(cam).max())
    np.testing.assert_allclose(res.logits, logits, atol=1e-5)
    assert cam.max() > 0  # a real map, not an all-zero agreement
    # explaining a requested class (not the prediction) also agrees
    other = (res.cam_class + 3) % 10
    res2 = probe.run(x.numpy(), classes=other)
    cam2, _ = naive_gradcam(model, probe.target_layer, x, other)
    assert np.abs(res2.cam - cam2).max() <= 1e-5 * max(1.0, np.abs(cam2).max())
    assert not np.allclose(res2.cam, res.cam)


def test_auto_layers_and_outputs(gap_model, mnist):
    probe = TorchProbe(mnist_spec(gap_model))
    assert probe.target_layer == "features.8"  # ReLU after the last conv: last 4-D spatial output
    assert probe.early_layer == "features.2"   # first conv -> BatchNorm -> ReLU
    assert "features.8" in probe.describe()
    x = preprocess_uint8(mnist[0][POOL][:8]).numpy()
    res = probe.run(x)
    with torch.no_grad():
        acts = {}
        h = gap_model.features[2].register_forward_hook(lambda m, i, o: acts.__setitem__("e", o))
        gap_model(torch.from_numpy(x))
        h.remove()
    e = acts["e"].numpy()
    np.testing.assert_allclose(res.early_map, np.abs(e).mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.early_stats, e.mean((2, 3)), rtol=1e-6, atol=1e-6)
    assert res.features.shape == (8, 64)


def test_block_statistics_are_the_blocks_spatial_mean_and_std(gap_model, mnist):
    """Every conv block's channel means and (population) standard deviations equal numpy's on
    the block outputs captured by plain hooks; a model whose blocks are too wide for the joint
    Gaussian (a ResNet-18's 3,904 channels) gets no standard deviations computed."""
    from verifier.probe.base import wants_block_stds

    probe = TorchProbe(mnist_spec(gap_model))
    assert probe.block_layers == ["features.2", "features.5", "features.8"] and probe.block_stds
    x = preprocess_uint8(mnist[0][POOL][:16]).numpy()
    res = probe.run(x)
    acts = {}
    mods = dict(gap_model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.double().numpy()))
          for n in probe.block_layers]
    with torch.no_grad():
        gap_model(torch.from_numpy(x))
    for h in hs:
        h.remove()
    assert len(res.block_stds) == len(res.block_stats) == 3
    for name, mean, std in zip(probe.block_layers, res.block_stats, res.block_stds):
        np.testing.assert_allclose(mean, acts[name].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, acts[name].std(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        assert std.max() > 0
    resnet18 = [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4 + [128, 256, 512]  # its 20 conv blocks
    assert not wants_block_stds(resnet18) and not wants_block_stds([16])
    assert wants_block_stds([16, 32, 64]) and wants_block_stds([256, 256]) and not wants_block_stds([256, 257])


def test_explicit_layer_names_and_errors(gap_model):
    spec = mnist_spec(gap_model)
    from dataclasses import replace

    probe = TorchProbe(replace(spec, target_layer="features.6", early_layer="features.0"))
    assert (probe.target_layer, probe.early_layer) == ("features.6", "features.0")
    # a conv output goes negative: the early map must be the channel mean of |A|
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        conv = gap_model.features[0](x)
    res = probe.run(x.numpy())
    assert (conv < 0).any()
    np.testing.assert_allclose(res.early_map, conv.abs().mean(1).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ProbeError, match="Candidates: .*features.8"):
        TorchProbe(replace(spec, target_layer="features.99"))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ProbeError, match="no layer with a 4-D spatial output"):
        TorchProbe(mnist_spec(mlp))


def test_state_restored_even_on_error(gap_model, mnist):
    gap_model.train()
    gap_model.features[0].weight.requires_grad_(True)
    probe = TorchProbe(mnist_spec(gap_model))
    try:
        with pytest.raises(ProbeError):
            probe.run(np.zeros((2, 3, 28, 28), np.float32))  # wrong channel count
        with pytest.raises(ProbeError, match="classes must have shape"):  # raised mid-pass, hooks live
            probe.run(np.zeros((2, 1, 28, 28), np.float32), classes=np.zeros(3, dtype=int))
        assert gap_model.training and all(m.training for m in gap_model.modules())
        assert all(p.requires_grad for p in gap_model.parameters())
        for m in gap_model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks
        probe.run(preprocess_uint8(mnist[0][POOL][:4]).numpy())
        assert gap_model.training  # restored after a successful pass too
    finally:
        gap_model.eval()


def test_memory_flat_over_repeated_calls(gap_model, mnist):
    probe = TorchProbe(mnist_spec(gap_model))
    x = preprocess_uint8(mnist[0][POOL][:32]).numpy()
    for _ in range(3):
        probe.run(x)
    gc.collect()
    tracemalloc.start()
    probe.run(x)
    gc.collect()
    first = tracemalloc.get_traced_memory()[0]
    for _ in range(40):
        probe.run(x)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - first < 256 * 1024, f"python memory grew by {after - first} bytes over 40 calls"
    assert not any(m._forward_hooks for m in gap_model.modules())
