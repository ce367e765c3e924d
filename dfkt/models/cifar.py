"""CIFAR ResNet-18/34 (3x3 stem, no max-pool) and Wide-ResNets, all ending in ``fc``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkt.errors import ModelError


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 input: 3x3 stem, stages 64-128-256-512, global avg-pool, ``fc``."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-18."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


def resnet34_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-34."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels)


class WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv x2, optional dropout)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        res = x if self.shortcut is None else self.shortcut(o)
        out = F.relu(self.bn2(self.conv1(o)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + res


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 input (channels 16, 16k, 32k, 64k), ending in ``fc``."""

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10,
                 dropout: float = 0.0, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ModelError(f"WideResNet depth {depth} is invalid; use 6n+4 (e.g. 16, 28, 40)")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        blocks = []
        for i in range(3):
            blocks.append(nn.Sequential(*[
                WideBlock(ch[i] if j == 0 else ch[i + 1], ch[i + 1],
                          (1 if i == 0 else 2) if j == 0 else 1, dropout) for j in range(n)]))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(ch[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn_16_1(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes, dropout)


def wrn_16_2(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, dropout)


def wrn_40_1(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes, dropout)


def wrn_40_2(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, dropout)
