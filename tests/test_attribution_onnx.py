"""Attribution on ONNX files: the same maps as the torch path for every method ONNX offers,
and a clear refusal naming those methods for the rest."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import POOL

from verifier.attribution import AttributionError, attribute, attribute_many, onnx_methods
from verifier.examples.zoo import mnist_spec, preprocess_uint8
from verifier.probe.onnx_backend import export_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gap_model, fc_model):
    out = tmp_path_factory.mktemp("onnx")
    return {name: (m, export_onnx(m, mnist_spec(m), out / f"{name}.onnx"))
            for name, m in (("gap", gap_model), ("fc", fc_model))}


def close(a: np.ndarray, b: np.ndarray, rel: float) -> bool:
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return a.shape == b.shape and np.abs(a - b).max() <= rel * scale


@pytest.mark.parametrize("head", ["gap", "fc"])
def test_onnx_maps_equal_torch(exported, mnist, head):
    model, path = exported[head]
    x = preprocess_uint8(mnist[0][POOL][100:108]).numpy()
    methods = [m for m in onnx_methods() if not (m == "cam" and head == "fc")]
    assert set(onnx_methods()) == {"gradcam", "scorecam", "cam", "crm"}
    ref = attribute_many(model, x, methods)
    got = attribute_many(path, x, methods)
    spec = mnist_spec(model)
    for m in methods:
        assert got[m].shape == ref[m].shape == (8, 7, 7), m
        # exact tails (GAP + linear) and re-evaluated tails agree to float32 rounding;
        # Grad-CAM on the fc head comes from central finite differences on the float64 tail
        rel = 1e-4 if (m == "gradcam" and head == "fc") else 1e-5
        assert close(got[m], ref[m], rel), (m, np.abs(got[m] - ref[m]).max())
        assert np.corrcoef(got[m].ravel(), ref[m].ravel())[0, 1] >= 0.999
    # the same through a TOML spec naming the file, with requested classes
    tgt = np.arange(8) % 10
    toml = path.with_suffix(".toml")
    toml.write_text(f'[model]\npath = "{path.name}"\nclasses = {list(spec.classes)}\n'
                    f'[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n')
    got_t = attribute(toml, x, "crm", target=tgt)
    assert close(got_t, attribute(model, x, "crm", target=tgt), 1e-5)
    assert not close(got_t, ref["crm"], 1e-2)  # the requested class, not the prediction


def test_onnx_refuses_gradient_methods_naming_what_it_runs(exported, mnist):
    _, path = exported["gap"]
    x = preprocess_uint8(mnist[0][POOL][:2]).numpy()
    for m in ("saliency", "guided_backprop", "sam", "gradcam++"):
        with pytest.raises(AttributionError, match="The ONNX backend runs: gradcam, scorecam, cam, crm"):
            attribute(path, x, m)


def test_onnx_cam_refuses_fc_head(exported, mnist):
    _, path = exported["fc"]
    x = preprocess_uint8(mnist[0][POOL][:2]).numpy()
    with pytest.raises(AttributionError, match="global average pooling"):
        attribute(path, x, "cam")


def test_torchscript_file_runs_through_the_onnx_path(gap_model, mnist, tmp_path):
    import torch

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(gap_model), str(path))
    x = preprocess_uint8(mnist[0][POOL][:4]).numpy()
    for m in ("crm", "gradcam"):
        assert close(attribute(path, x, m, layer="features.8"), attribute(gap_model, x, m), 1e-5), m
    with pytest.raises(AttributionError, match="torchscript file m.pt"):
        attribute(path, x, "sam")
