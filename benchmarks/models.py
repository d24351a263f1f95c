"""Models the benchmark measures: a ResNet-18-shaped classifier written out here (no torchvision).

`resnet18_shape()` has torchvision's ResNet-18 layout: a 7x7/2 stem, max pool, BasicBlocks
[2, 2, 2, 2] at widths 64-512, global average pooling and one linear layer.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18Shape", "resnet18_shape"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm, identity (or 1x1 strided) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)


class ResNet18Shape(nn.Module):
    """(N, 3, 224, 224) -> (N, num_classes); Grad-CAM layer auto-resolves to `layer4`'s
    output (N, 512, 7, 7), the early layer to the stem's ReLU (N, 64, 112, 112)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_shape(num_classes: int = 10, seed: int = 0) -> ResNet18Shape:
    """A randomly initialised ResNet-18-shaped model in eval mode (the benchmark measures
    speed, not accuracy); batch-norm running statistics are given non-trivial values so
    activations do not collapse or explode through the 18 layers."""
    torch.manual_seed(seed)
    model = ResNet18Shape(num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()
