"""Small CNNs trained on the CPU in seconds, for the demo, tests and benchmarks.

`SmallCNN(head="gap")` ends in global average pooling + linear, `head="fc"` in
flatten + fully-connected; `train_classifier` fits either on uint8 images.
`SmallUNet` is a small encoder-decoder segmenter; `train_segmenter` fits it on
per-pixel labels (`verifier.examples.datasets.digit_canvases`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from verifier.spec import ModelSpec

__all__ = ["SmallCNN", "train_classifier", "mnist_spec", "preprocess_uint8", "add_class_marker",
           "add_border_code", "add_canvas_marker", "add_cue", "CUES", "SmallUNet", "train_segmenter", "canvas_spec"]


class SmallCNN(nn.Module):
    """Three conv blocks on (N, C, 28, 28); auto picks early layer `features.2`, Grad-CAM layer `features.8`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, head: str = "gap",
                 width: int = 16, input_size: int = 28) -> None:
        super().__init__()
        if head not in ("gap", "fc"):
            raise ValueError("head must be 'gap' or 'fc'")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )
        side = input_size // 4
        if head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, 64), nn.ReLU(),
                                      nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallUNet(nn.Module):
    """A three-level U-Net on (N, C, H, W) with H, W divisible by 8: (N, K, H, W) class scores.

    Encoder `enc1` (H), `enc2` (H/2), `enc3` (H/4), bottleneck `bottleneck` (H/8); decoder
    `dec3` (H/4), `dec2` (H/2), `dec1` (H), each fed the upsampled layer below concatenated
    with the encoder's skip; a 1x1 `head` gives the scores. The post-bottleneck layers
    "auto" finds: `dec3.2`, `dec2.2`, `dec1.2` (conv, batch norm, ReLU).
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            conv = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*([nn.MaxPool2d(2)] if pool else []), *conv)

        self.enc1 = block(in_channels, w, False)
        self.enc2 = block(w, 2 * w, True)
        self.enc3 = block(2 * w, 4 * w, True)
        self.bottleneck = block(4 * w, 4 * w, True)
        self.up3 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec3 = block(8 * w, 4 * w, False)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = block(6 * w, 2 * w, False)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(3 * w, w, False)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        b = self.bottleneck(e3)
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def train_segmenter(model: nn.Module, images: np.ndarray, masks: np.ndarray, epochs: int = 10,
                    seed: int = 0, batch_size: int = 32, lr: float = 1e-2,
                    background_weight: float = 0.2) -> nn.Module:
    """Train a segmenter on uint8 (N, H, W) images and int (N, H, W) per-pixel labels with Adam
    on a one-cycle learning-rate schedule (peak `lr`) and per-pixel cross-entropy (class 0, the
    background, weighted by `background_weight`, since it covers most pixels); deterministic
    for a seed; returns it in eval mode. The schedule makes seeds agree: at a constant rate
    the last step's noise decided the model (image-level accuracy 0.67-0.88 over three seeds
    at 6 epochs, 0.80-0.87 at 12; with the schedule 0.887-0.897 over four seeds at 10)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = preprocess_uint8(images)
    y = torch.tensor(np.asarray(masks), dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                out = model(x[idx])
                weight = torch.ones(out.shape[1])
                weight[0] = background_weight
                nn.functional.cross_entropy(out, y[idx], weight=weight).backward()
                opt.step()
                schedule.step()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return model.eval()


def canvas_spec(module: nn.Module | None = None, size: tuple[int, int] = (32, 48)) -> ModelSpec:
    """The segmentation spec of `SmallUNet` on digit canvases: background + ten digit classes."""
    classes = ("background",) + tuple(str(d) for d in range(10))
    return ModelSpec(classes=classes, size=size, channels=1, mean=(0.1307,), std=(0.3081,),
                     module=module if module is not None else nn.Identity(), task="segmentation",
                     background_class=0)


def mnist_spec(module: nn.Module | None = None, classes: int = 10) -> ModelSpec:
    """The spec the small MNIST models use: 28x28 gray, mean 0.1307, std 0.3081."""
    return ModelSpec(classes=tuple(str(i) for i in range(classes)), size=(28, 28), channels=1,
                     mean=(0.1307,), std=(0.3081,), module=module if module is not None else nn.Identity())


def preprocess_uint8(images: np.ndarray, mean: float = 0.1307, std: float = 0.3081) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) scaled to [0, 1] then standardised."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32).div_(255.0)
    return ((x - mean) / std).unsqueeze(1)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int = 4,
                     seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """Train `model` on uint8 (N, H, W) images with Adam; returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = preprocess_uint8(images)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the same seed gives the same weights, every run
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return model.eval()


def add_class_marker(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies of uint8 (N, 28, 28) digits with a shortcut: a bright 4x4 square whose
    position encodes the label, in the empty top (labels 0-4) or bottom (5-9) rows.

    A model trained on these reaches high accuracy by looking at the square: the
    canonical failure an audit must catch.
    """
    out = np.array(images, copy=True)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.where(labels < 5, 0, 24)
    cols = (labels % 5) * 5 + 1
    dy, dx = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    n = np.arange(len(labels))[:, None, None]
    out[n, rows[:, None, None] + dy, cols[:, None, None] + dx] = 255
    return out


def add_canvas_marker(canvases: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies of uint8 (N, H, W) digit canvases with a bright 3x3 square in rows H-3..H-1 whose
    column encodes the image label 1-10 (`same_class_canvases`): a segmenter's shortcut."""
    out = np.array(canvases, copy=True)
    col = 2 + 4 * (np.asarray(labels, dtype=np.int64) - 1)
    n, h = np.arange(len(out))[:, None, None], out.shape[1]
    dy, dx = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    out[n, h - 3 + dy, col[:, None, None] + dx] = 255
    return out


def add_border_code(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies of uint8 (N, H, W) images with a faint 1-pixel frame whose gray level encodes the
    label (8 + 8 x label, at most 80 of 255): a border/film-edge shortcut, spread around the
    image rather than in one spot, faint enough that a model that never learned it is barely
    disturbed by it."""
    out = np.array(images, copy=True)
    v = (8 + 8 * np.asarray(labels, dtype=np.int64)).astype(out.dtype)[:, None]
    out[:, 0, :] = v
    out[:, -1, :] = v
    out[:, :, 0] = v
    out[:, :, -1] = v
    return out


#: shortcut cues a model can learn instead of the digit: name -> function(images, labels)
CUES = {"marker": add_class_marker, "border": add_border_code}


def add_cue(images: np.ndarray, labels: np.ndarray, kind: str, share: float = 1.0,
            seed: int = 0) -> np.ndarray:
    """Copies of uint8 (N, H, W) images with the class-coded cue `kind` (see CUES) on a seeded
    random `share` of them: the training set of a model that relies on the cue that often."""
    if kind not in CUES:
        raise ValueError(f"unknown cue {kind!r}; one of {sorted(CUES)}")
    on = np.random.default_rng(seed).random(len(images)) < share
    out = np.array(images, copy=True)
    if on.any():
        out[on] = CUES[kind](out[on], np.asarray(labels)[on])
    return out
