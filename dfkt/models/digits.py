"""SHOT's digit networks (backbone / bottleneck / weight-normalised head)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dfkt.errors import ModelError


def shot_init(m: nn.Module) -> None:
    """SHOT's init: kaiming convs, xavier Linear, BN weight ~ N(1, 0.02); zero biases."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class LeNetBase(nn.Module):
    """SHOT LeNet backbone for 1x28x28 input -> 800 features."""

    out_features = 800

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv_params = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(20, 50, 5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv_params(x), 1)


class DTNBase(nn.Module):
    """SHOT DTN backbone for 3x32x32 input -> 4096 features."""

    out_features = 4096

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, p in [(in_channels, 64, 0.1), (64, 128, 0.3), (128, 256, 0.5)]:
            layers += [nn.Conv2d(cin, cout, 5, stride=2, padding=2), nn.BatchNorm2d(cout),
                       nn.Dropout2d(p), nn.ReLU()]
        self.conv_params = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv_params(x), 1)


class Bottleneck(nn.Module):
    """Linear(in, dim) followed by BatchNorm1d when ``kind == 'bn'`` ('ori': Linear only)."""

    def __init__(self, in_features: int, dim: int = 256, kind: str = "bn") -> None:
        super().__init__()
        if kind not in ("bn", "ori"):
            raise ModelError(f"bottleneck kind {kind!r} is unknown; use 'bn' or 'ori'")
        self.in_features, self.out_features, self.kind = in_features, dim, kind
        self.bottleneck = nn.Linear(in_features, dim)
        self.bn = nn.BatchNorm1d(dim, affine=True) if kind == "bn" else nn.Identity()
        self.apply(shot_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bottleneck(x))


def WNLinear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A weight-normalised ``nn.Linear`` (per-output-row norm, parametrization API)."""
    lin = nn.Linear(in_features, out_features, bias=bias)
    shot_init(lin)
    return weight_norm(lin, name="weight", dim=0)


class Head(nn.Module):
    """Classifier head: weight-normalised Linear (``kind='wn'``) or plain (``'linear'``)."""

    def __init__(self, dim: int, num_classes: int, kind: str = "wn") -> None:
        super().__init__()
        if kind == "wn":
            self.fc = WNLinear(dim, num_classes)
        elif kind == "linear":
            self.fc = nn.Linear(dim, num_classes)
            shot_init(self.fc)
        else:
            raise ModelError(f"head kind {kind!r} is unknown; use 'wn' or 'linear'")
        self.in_features, self.out_features, self.kind = dim, num_classes, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class SplitNet(nn.Module):
    """``head(bottleneck(backbone(x)))`` with the three parts as attributes."""

    def __init__(self, backbone: nn.Module, bottleneck: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.bottleneck, self.head = backbone, bottleneck, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def shot_digit_net(arch: str = "lenet", num_classes: int = 10, bottleneck_dim: int = 256,
                   bottleneck: str = "bn", head: str = "wn") -> SplitNet:
    """SHOT digit model: LeNetBase (1x28x28) or DTNBase (3x32x32) + bottleneck + WN head."""
    bases = {"lenet": LeNetBase, "dtn": DTNBase}
    if arch not in bases:
        raise ModelError(f"SHOT digit arch {arch!r} is unknown; use 'lenet' or 'dtn'")
    base = bases[arch]()
    return SplitNet(base, Bottleneck(base.out_features, bottleneck_dim, bottleneck),
                    Head(bottleneck_dim, num_classes, head))
