"""Shared fixtures: real MNIST splits and small CNNs trained once per test session on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

#: the 5,000 real digits are split once: model training/reference, calibration, test pool
TRAIN, CAL = slice(0, 3000), slice(3000, 3600)
POOL = slice(3600, 5000)


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    from verifier.examples.datasets import load_mnist

    return load_mnist()


def _train(mnist, head: str, seed: int, epochs: int = 4):
    from verifier.examples.zoo import SmallCNN, train_classifier

    x, y = mnist
    torch.manual_seed(seed)
    return train_classifier(SmallCNN(head=head), x[TRAIN], y[TRAIN], epochs=epochs, seed=seed)


@pytest.fixture(scope="session")
def gap_model(mnist):
    """SmallCNN with a global-average-pooling head, trained on 3,000 real digits."""
    return _train(mnist, "gap", seed=0)


@pytest.fixture(scope="session")
def fc_model(mnist):
    """SmallCNN with a flatten + fully-connected head, trained on the same digits."""
    return _train(mnist, "fc", seed=0, epochs=2)


@pytest.fixture(scope="session")
def gap_bundle(tmp_path_factory, mnist, gap_model):
    """A bundle for `gap_model` built through the Python API (reference = training digits)."""
    from verifier.bundle.builder import build_bundle
    from verifier.examples.zoo import mnist_spec

    x, y = mnist
    out = tmp_path_factory.mktemp("bundle") / "gap"
    build_bundle(mnist_spec(gap_model), (x[TRAIN], y[TRAIN]), out, calibration=(x[CAL], y[CAL]), seed=0)
    return out


@pytest.fixture(scope="session")
def seg_data(mnist):
    """Digit canvases (two real digits each, per-pixel labels): (train images, train masks,
    held-out images, held-out masks); training digits from TRAIN, held-out ones from POOL."""
    from verifier.examples.datasets import digit_canvases

    x, y = mnist
    ti, tm = digit_canvases(x[TRAIN], y[TRAIN], 1000, seed=0)
    hi, hm = digit_canvases(x[POOL], y[POOL], 64, seed=1)
    return ti, tm, hi, hm


@pytest.fixture(scope="session")
def seg_model(seg_data):
    """SmallUNet trained on 1,000 digit canvases (10 epochs, about 15 s on one CPU core)."""
    from verifier.examples.zoo import SmallUNet, train_segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    try:
        torch.manual_seed(0)
        return train_segmenter(SmallUNet(), seg_data[0], seg_data[1], seed=0)
    finally:
        torch.set_num_threads(threads)


MNIST_TOML = ('[model]\npath = "model.onnx"\nclasses = ["0","1","2","3","4","5","6","7","8","9"]\n'
              "[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n")


def write_onnx_model(root, model):
    """`model` exported to root/model.onnx with its spec root/model.toml (as a user writes
    one); returns the spec's path. For tests that need a bundle another process can load."""
    from verifier.examples.zoo import mnist_spec
    from verifier.probe.onnx_backend import export_onnx

    export_onnx(model, mnist_spec(model), root / "model.onnx")
    (root / "model.toml").write_text(MNIST_TOML)
    return root / "model.toml"
