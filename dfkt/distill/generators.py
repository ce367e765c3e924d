"""Generators for DFKD, sized to the input (DCGAN-like: linear -> upsample/conv stages -> output).

The published DAFL/DFAD generators use 64-128 channels at every resolution; for a 1x32x32
LeNet-5 that is ~275 times the teacher's forward cost per image, so on a CPU the generator, not
the distillation, dominates. :class:`Generator` derives its width from the input instead:
``ngf`` defaults to ``8 * C * max(1, H*W/1024)`` capped at 64 (8 for 1x32x32 digits: about
1.1x a LeNet-5 forward per image; 24 for 3x32x32); the number of upsampling stages follows the
image size (the linear layer produces a map of at most 8x8, channels halve at each upsampling and
the last 3x3 conv maps straight to the image channels). Pass ``ngf=64`` for the published CIFAR
width (without their extra full-resolution hidden layer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

OUTPUTS = ("bn", "tanh", "affine")


def auto_ngf(input_shape: tuple) -> int:
    """Default generator width for an input of shape (C, H, W)."""
    c, h, w = (int(s) for s in input_shape)
    return int(min(64, 8 * c * max(1, (h * w) // 1024)))


class Generator(nn.Module):
    """z (and optionally a class label) -> image of ``input_shape``.

    ``out``: ``'bn'`` = tanh then a BatchNorm without affine parameters (DAFL/DFAD's output layer);
    ``'tanh'`` = tanh scaled by ``out_scale``; ``'affine'`` = tanh then a learnable BatchNorm
    (lets BN-statistics losses move the mean and spread of the pixels).
    ``num_classes > 0`` makes it conditional: a learned class embedding is added to ``z``.
    """

    def __init__(self, input_shape: tuple, nz: int = 100, ngf: int | None = None, out: str = "bn",
                 out_scale: float = 1.0, num_classes: int = 0):
        super().__init__()
        if out not in OUTPUTS:
            raise ConfigError(f"generator output {out!r} is unknown; use one of {OUTPUTS}")
        c, h, w = (int(s) for s in input_shape)
        ngf = int(ngf or auto_ngf(input_shape))
        self.input_shape, self.nz, self.ngf, self.out_scale = (c, h, w), nz, ngf, out_scale
        # up-sampling stages: start from a map of at most 8x8, double until the input size
        stages = 0
        while (h % (2 ** (stages + 1)) == 0 and w % (2 ** (stages + 1)) == 0 and max(h, w) // 2 ** stages > 8
               and stages < 4):
            stages += 1
        self.h0, self.w0 = h // 2 ** stages, w // 2 ** stages
        # channels halve at each upsampling; the last conv maps straight to the image channels, so
        # there is no wide hidden layer at full resolution (the costliest part of DCGAN generators)
        widths = [ngf * 2 ** (stages - 1 - i) for i in range(stages)] + [ngf] if stages else [ngf]
        self.embed = nn.Embedding(num_classes, nz) if num_classes > 0 else None
        self.fc = nn.Linear(nz, widths[0] * self.h0 * self.w0)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for i in range(stages):
            layers.append(nn.Upsample(scale_factor=2))
            if i < stages - 1:
                layers += [nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False),
                           nn.BatchNorm2d(widths[i + 1]), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], c, 3, 1, 1), nn.Tanh()]
        if out == "bn":
            layers.append(nn.BatchNorm2d(c, affine=False))
        elif out == "affine":
            layers.append(nn.BatchNorm2d(c, affine=True))
        self.body = nn.Sequential(*layers)
        self.out = out

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None and labels is not None:
            z = z * self.embed(labels)
        x = self.fc(z).view(z.shape[0], -1, self.h0, self.w0)
        x = self.body(x)
        return x * self.out_scale if self.out == "tanh" else x

    def reset_first_layer(self) -> None:
        """Re-initialise the input layer (Fast's ``reset_l0``)."""
        self.fc.reset_parameters()

    def flops(self) -> int:
        """Multiply-accumulates per image (for sizing)."""
        total, hw = self.fc.in_features * self.fc.out_features, self.h0 * self.w0
        for m in self.body:
            if isinstance(m, nn.Upsample):
                hw *= 4
            elif isinstance(m, nn.Conv2d):
                total += hw * m.in_channels * m.out_channels * math.prod(m.kernel_size)
        return total


def sample_z(n: int, nz: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal latent codes on ``device`` (drawn with ``generator`` on the CPU, then moved)."""
    return torch.randn(n, nz, generator=generator).to(device)
