"""LeNet-5 teachers/students used by DAFL/DFAD on 1x32x32 digits."""
from __future__ import annotations

import torch
from torch import nn


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class LeNet5(nn.Module):
    """DAFL/DFAD LeNet-5 for 32x32 input: ``features`` -> flatten -> ``fc`` -> ``head``.

    ``width`` scales every hidden size (0.5 gives LeNet-5-half); ``batchnorm=True`` adds a
    BatchNorm after each conv and after the hidden fc (the "BN teacher" variant).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 batchnorm: bool = False) -> None:
        super().__init__()
        c1, c2, c3, h = (_ch(c, width) for c in (6, 16, 120, 84))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate([(in_channels, c1), (c1, c2), (c2, c3)]):
            layers.append(nn.Conv2d(cin, cout, 5))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Linear(c3, h)]
        if batchnorm:
            fc.append(nn.BatchNorm1d(h))
        fc.append(nn.ReLU(inplace=True))
        self.fc = nn.Sequential(*fc)
        self.head = nn.Linear(h, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.flatten(self.features(x), 1)))


class LeNet5Half(LeNet5):
    """LeNet-5 with half the channels (3, 8, 60, fc 42): the usual DAFL student."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batchnorm: bool = False) -> None:
        super().__init__(num_classes, in_channels, width=0.5, batchnorm=batchnorm)
