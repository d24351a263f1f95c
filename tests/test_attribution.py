"""Every attribution method against an independent implementation on trained MNIST CNNs.

captum (Saliency, GuidedBackprop, LayerGradCam), pytorch-grad-cam (GradCAMPlusPlus, ScoreCAM),
the closed form of CAM, and naive per-image / per-position loops for SAM and CRM.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _gradcam_lib import import_gradcam
from conftest import POOL
from torch import nn

from verifier.attribution import METHODS, AttributionError, attribute, attribute_many
from verifier.examples.zoo import preprocess_uint8

LAYER = "features.8"  # SmallCNN's auto target: the ReLU after the last conv (7 x 7)


@pytest.fixture(scope="module")
def x(mnist) -> torch.Tensor:
    return preprocess_uint8(mnist[0][POOL][:24])


def close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> bool:
    """Equal up to `rel` of the larger map's peak (maps are raw, unnormalised)."""
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return a.shape == b.shape and np.abs(a - b).max() <= rel * scale


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------ captum
@pytest.mark.parametrize("model_name", ["gap_model", "fc_model"])
def test_gradient_methods_equal_captum(request, x, model_name):
    from captum.attr import GuidedBackprop, LayerGradCam, Saliency

    model = request.getfixturevalue(model_name)
    tgt = model(x).argmax(1)
    sal = Saliency(model).attribute(x.clone(), target=tgt, abs=True).amax(1).numpy()
    gbp = GuidedBackprop(model).attribute(x.clone(), target=tgt).abs().amax(1).numpy()
    layer = dict(model.named_modules())[LAYER]
    gc = LayerGradCam(model, layer).attribute(x.clone(), target=tgt,
                                              relu_attributions=True)[:, 0].detach().numpy()
    ours = attribute_many(model, x.numpy(), ["saliency", "guided_backprop", "gradcam"])
    assert close(ours["saliency"], sal) and ours["saliency"].shape == (24, 28, 28)
    assert close(ours["guided_backprop"], gbp)
    assert close(ours["gradcam"], gc) and ours["gradcam"].shape == (24, 7, 7)
    assert gc.max() > 0 and not np.allclose(sal, gbp)  # real maps, and they differ


def test_requested_targets(gap_model, x):
    from captum.attr import Saliency

    other = (gap_model(x).argmax(1) + 3) % 10
    ref = Saliency(gap_model).attribute(x.clone(), target=other, abs=True).amax(1).numpy()
    assert close(attribute(gap_model, x.numpy(), "saliency", target=other.numpy()), ref)
    ref7 = Saliency(gap_model).attribute(x.clone(), target=7, abs=True).amax(1).numpy()
    assert close(attribute(gap_model, x.numpy(), "saliency", target=7), ref7)
    assert not close(ref, ref7)
    with pytest.raises(AttributionError, match="target"):
        attribute(gap_model, x.numpy(), "gradcam", target=np.arange(3))
    with pytest.raises(AttributionError, match=r"\[0, 10\)"):
        attribute(gap_model, x.numpy(), "gradcam", target=10)


# ------------------------------------------------------------------ pytorch-grad-cam
def _library_cam(lib_cls, model, x, tgt, batch_size=None):
    """pytorch-grad-cam's map before min-max scaling and resizing: ReLU(get_cam_image)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = dict(model.named_modules())[LAYER]
    obj = lib_cls(model=model, target_layers=[layer])
    if batch_size:
        obj.batch_size = batch_size
    try:
        targets = [ClassifierOutputTarget(int(c)) for c in tgt]
        out = obj.activations_and_grads(x)
        if obj.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, out)).backward()
        acts = obj.activations_and_grads.activations[0].numpy()
        grads = obj.activations_and_grads.gradients[0].numpy() if obj.uses_gradients else None
        with torch.no_grad():
            cam = obj.get_cam_image(x, layer, targets, acts, grads)
        return np.maximum(cam, 0)
    finally:
        obj.activations_and_grads.release()


@pytest.mark.parametrize("model_name", ["gap_model", "fc_model"])
def test_gradcam_pp_and_scorecam_equal_pytorch_grad_cam(request, x, model_name):
    lib = import_gradcam()
    if lib is None:
        pytest.skip("pytorch-grad-cam not installed (pip install --no-deps grad-cam ttach)")
    from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM

    model = request.getfixturevalue(model_name)
    xs = x[:8]
    tgt = model(xs).argmax(1)
    ours = attribute_many(model, xs.numpy(), ["gradcam++", "scorecam"])
    pp = _library_cam(GradCAMPlusPlus, model, xs.clone(), tgt)
    sc = _library_cam(ScoreCAM, model, xs.clone(), tgt, batch_size=64)
    assert close(ours["gradcam++"], pp, rel=1e-4) and pearson(ours["gradcam++"], pp) >= 0.999
    assert close(ours["scorecam"], sc, rel=1e-4) and pearson(ours["scorecam"], sc) >= 0.999
    assert pp.max() > 0 and sc.max() > 0


def test_gradcam_pp_and_scorecam_equal_naive_formulas(gap_model, x):
    """Independent of the library: the papers' formulas, one image at a time."""
    xs = x[:6]
    feats, head = gap_model.features, gap_model.head
    ours = attribute_many(gap_model, xs.numpy(), ["gradcam++", "scorecam"])
    for i in range(len(xs)):
        a = feats(xs[i:i + 1]).detach().requires_grad_(True)
        y = head(a)
        c = int(y.argmax())
        (g,) = torch.autograd.grad(y[0, c], a)
        g, A = g[0].double(), a[0].detach().double()
        alpha = torch.where(g != 0, g**2 / (2 * g**2 + A.sum((1, 2), keepdim=True) * g**3 + 1e-6), 0)
        w = (alpha * g.clamp_min(0)).sum((1, 2))
        assert close(ours["gradcam++"][i], (w[:, None, None] * A).sum(0).clamp_min(0).numpy())
        scores = []
        for k in range(A.shape[0]):
            m = nn.functional.interpolate(a[:, k:k + 1].detach(), size=(28, 28), mode="bilinear",
                                          align_corners=True)
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            with torch.no_grad():
                scores.append(float(gap_model(xs[i:i + 1] * m)[0, c]))
        w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
        assert close(ours["scorecam"][i], (w[:, None, None] * A).sum(0).clamp_min(0).numpy(), 1e-4)


# ------------------------------------------------------------------ closed forms and naive loops
def test_cam_closed_form_on_gap_head(gap_model, x):
    A = gap_model.features(x).detach().double()
    W = gap_model.head[2].weight.detach().double()
    tgt = gap_model(x).argmax(1)
    ref = torch.einsum("nk,nkhw->nhw", W[tgt], A).numpy()
    cam = attribute(gap_model, x.numpy(), "cam")
    assert close(cam, ref) and cam.min() < 0 < cam.max()  # raw and signed
    # on a GAP + linear head Grad-CAM is ReLU(CAM) / (h w)
    assert close(attribute(gap_model, x.numpy(), "gradcam"), np.maximum(ref, 0) / 49)


def test_cam_refuses_other_heads_and_leaves_no_hooks(fc_model, x):
    with pytest.raises(AttributionError, match="global average pooling"):
        attribute(fc_model, x.numpy(), "cam")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in fc_model.modules())


@pytest.mark.parametrize("model_name", ["gap_model", "fc_model"])
def test_crm_equals_naive_per_position_loop(request, x, model_name):
    model = request.getfixturevalue(model_name)
    xs = x[:5]
    crm = attribute(model, xs.numpy(), "crm")
    for i in range(len(xs)):
        with torch.no_grad():
            A = model.features(xs[i:i + 1])
            s = torch.softmax(model.head(A).double(), 1)[0]
            c = int(s.argmax())
            t = torch.zeros_like(s)
            t[c] = 1
            base = float(((t - s) ** 2).sum())
            ref = np.zeros((7, 7))
            for r in range(7):
                for q in range(7):
                    a = A.clone()
                    a[0, :, r, q] = 0
                    sr = torch.softmax(model.head(a).double(), 1)[0]
                    ref[r, q] = float(((t - sr) ** 2).sum()) - base
        assert close(crm[i], ref)
    assert crm.min() < 0 < crm.max()  # signed: positive and negative contributions


@pytest.mark.parametrize("model_name", ["gap_model", "fc_model"])
def test_sam_equals_naive_full_backward(request, x, model_name):
    model = request.getfixturevalue(model_name)
    xs = x[:6]
    sam = attribute(model, xs.numpy(), "sam")
    for i in range(len(xs)):
        xi = xs[i:i + 1].clone().requires_grad_(True)
        A = model.features(xi)
        y = model.head(A)
        c = int(y.argmax())
        (g,) = torch.autograd.grad(y[0, c], A, retain_graph=True)
        level = torch.relu((g.mean((2, 3), keepdim=True) * A).sum(1)).sum()
        (gx,) = torch.autograd.grad(level, xi)
        assert close(sam[i], gx[0].abs().amax(0).double().numpy())
    # at a shallow layer too (voxel-level at any layer)
    shallow = attribute(model, xs.numpy(), "sam", layer="features.2")
    assert shallow.shape == (6, 28, 28) and not close(shallow, sam, 1e-2)


# ------------------------------------------------------------------ state, registry, errors
def test_state_restored_and_registry_declares_needs(gap_model, x):
    gap_model.train()
    flags = [p.requires_grad for p in gap_model.parameters()]
    try:
        for name in (m for m in METHODS if METHODS[m].classification):
            attribute(gap_model, x[:2].numpy(), name)
            assert gap_model.training
            assert [p.requires_grad for p in gap_model.parameters()] == flags
            assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
                       for m in gap_model.modules())
    finally:
        gap_model.eval()
    assert set(METHODS) == {"gradcam", "gradcam++", "scorecam", "cam", "saliency",
                            "guided_backprop", "sam", "crm", "kwc"}
    assert not METHODS["kwc"].classification and METHODS["kwc"].segmentation is not None
    assert "input_gradient" in METHODS["saliency"].needs
    assert "layer_gradient" not in METHODS["crm"].needs and "tail" in METHODS["crm"].needs
    with pytest.raises(AttributionError, match="registered: gradcam"):
        attribute(gap_model, x[:2].numpy(), "lime")


def test_batched_equals_one_at_a_time(fc_model, x):
    xs = x[:4].numpy()
    for name in ("gradcam", "crm", "scorecam", "sam"):
        whole = attribute(fc_model, xs, name)
        single = np.concatenate([attribute(fc_model, xs[i:i + 1], name) for i in range(4)])
        assert close(whole, single, 1e-5), name
