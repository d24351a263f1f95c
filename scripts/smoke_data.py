"""Smoke-test material for scripts/smoke.sh: a tiny model and PNG folders, from a plain install.

Uses only the package's runtime dependencies (no extras): scikit-learn's 1,797 real 8x8
digits, upscaled to 28x28, train a narrow SmallCNN for one epoch, exported to ONNX.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from verifier.data import save_dataset
from verifier.examples.datasets import load_sklearn_digits
from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier
from verifier.probe.onnx_backend import export_onnx


def main(out: Path) -> None:
    torch.manual_seed(0)
    x8, y = load_sklearn_digits()
    x = np.pad(np.kron(x8, np.ones((1, 3, 3), dtype=np.uint8)), ((0, 0), (2, 2), (2, 2)))  # 28x28
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    model = train_classifier(SmallCNN(width=8), x[:1000], y[:1000], epochs=1, seed=0)
    export_onnx(model, mnist_spec(model), out / "model.onnx")
    (out / "model.toml").write_text(
        '[model]\npath = "model.onnx"\nclasses = ["0","1","2","3","4","5","6","7","8","9"]\n'
        "[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n")
    classes = [str(i) for i in range(10)]
    save_dataset(x[:1000], y[:1000], classes, out / "ref")
    save_dataset(x[1000:1400], y[1000:1400], classes, out / "cal")
    save_dataset(x[1400:1480], y[1400:1480], classes, out / "stream")
    noise = np.random.default_rng(1).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    save_dataset(noise, np.zeros(20, dtype=np.int64), ["noise"], out / "stream" / "ood")
    (out / "key").write_bytes(np.random.default_rng(2).bytes(32))
    (out / "notes").mkdir()
    (out / "notes" / "keep.txt").write_text("a user's notes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
