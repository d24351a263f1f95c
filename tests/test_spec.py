"""Model spec: the TOML format of DESIGN.md, validated with messages naming the bad key."""
from __future__ import annotations

import pytest

from verifier.spec import SpecError, load_spec

GOOD = """
[model]
path = "model.onnx"
classes = ["normal", "pneumonia"]
[input]
size = [224, 224]
channels = 3
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[layers]
target = "auto"
early = "layer1"
"""


def write(tmp_path, text: str):
    (tmp_path / "model.onnx").write_bytes(b"placeholder")
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_good_spec(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.classes == ("normal", "pneumonia")
    assert spec.size == (224, 224) and spec.channels == 3
    assert spec.path == tmp_path / "model.onnx"  # relative to the spec file
    assert spec.early_layer == "layer1" and spec.backend == "onnx"


@pytest.mark.parametrize("edit, message", [
    (("channels = 3", "channels = 2"), "input.channels"),
    (("std = [0.229, 0.224, 0.225]", "std = [0.229]"), None),  # one value broadcasts
    (("mean = [0.485, 0.456, 0.406]", "mean = [0.4, 0.4]"), "input.mean"),
    (("size = [224, 224]", "size = [224]"), "input.size"),
    (("size = [224, 224]", "size = [0, 224]"), "input.size"),
    (('classes = ["normal", "pneumonia"]', "classes = []"), "model.classes"),
    (('path = "model.onnx"', 'path = "missing.onnx"'), "model.path"),
    (('path = "model.onnx"', 'path = "model.h5"'), "model.path"),
    (("[layers]", "[layers]\nsmooth = 1"), "layers.smooth"),
    (("[input]", "[inputs]"), r"\[inputs\]"),
    (('path = "model.onnx"', ""), "model.path"),
])
def test_bad_specs_name_the_key(tmp_path, edit, message):
    text = GOOD.replace(*edit)
    if message is None:
        assert load_spec(write(tmp_path, text)).std == (0.229,) * 3
        return
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, text))


def test_not_toml(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "[model\npath="))
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.toml")
