"""Small students for 28x28 digits (the compression targets of ``dfkt.compress``)."""
from __future__ import annotations

import torch
from torch import nn


class DigitCNN(nn.Module):
    """Three 3x3 conv blocks (``width``, 2x, 4x channels; BatchNorm, ReLU, two 2x2 max-pools), global
    average pooling and a linear ``head``; ``backbone`` / ``head`` attributes (dfkt's split).

    Parameters for 10 classes: width 8 ~6.3k, 16 ~24k, 24 ~54k (SHOT's digit LeNet: ~234k). Works on any
    input of at least 4x4 pixels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = int(width)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate([(in_channels, w), (w, 2 * w), (2 * w, 4 * w)]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
