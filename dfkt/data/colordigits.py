"""``colormnist``: the MNIST-10k digits in colour, composited onto procedural backgrounds (3 channels).

A 3-channel 32x32 domain built from the data we have, for DFKD with the CIFAR code path (BatchNorm
ResNet teachers, 3-channel generators; benchmarks/dfkd-color.yaml). It is made from dfkt's own
corruptions, not a second colour model:

1. each colour plane of a digit gets its own :func:`~dfkt.data.corruptions.colorize` draw (severity 1:
   ink and background levels at least 0.7 apart, the ink brighter or darker at random), so the digit has
   a random ink colour on a random background colour that differs from it in every channel;
2. the background (not the ink) is shaded by the :func:`~dfkt.data.corruptions.texture` field (two
   sinusoidal gratings times smooth noise; drawn per plane, so the patterns are coloured), darkening it by
   up to ``TEXTURE_STRENGTH``, sometimes down to the level of a dark ink.

Every image's colours are drawn once for the whole data set with a fixed generator (``seed``), before the
split, so an image looks the same in every split and on every machine (random numbers on the CPU).
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import DataError
from .arrays import load_mnist10k, to_float
from .corruptions import colorize, texture

COLOR_SEED = 0
TEXTURE_STRENGTH = 0.6   # the background is multiplied by 1 - strength * (1 - texture), texture in [0, 1]


def color_digits(x: torch.Tensor, seed: int = COLOR_SEED) -> torch.Tensor:
    """Grey digits ``x`` (float ``[N,1,H,W]`` in [0,1], ink = 1) as coloured ``[N,3,H,W]`` images in [0,1];
    the same ``x`` and ``seed`` give the same images."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise DataError(f"color_digits takes grey digits [N,1,H,W], got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    n, _, h, w = x.shape
    planes = x.expand(n, 3, h, w).reshape(n * 3, 1, h, w)
    coloured = colorize(planes, 1, g)                                # bg + (ink - bg) * x, per plane
    field = texture(torch.zeros_like(planes), 5, g)                  # no ink, amplitude 1: the field itself
    shade = 1 - TEXTURE_STRENGTH * (1 - field)
    out = coloured * (planes + (1 - planes) * shade)                 # shade the background, keep the ink
    return out.reshape(n, 3, h, w).clamp_(0, 1)


def color_mnist(root: str | os.PathLike | None, size: int, seed: int = COLOR_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """All of mnist10k (from ``root``) coloured at ``size``: uint8 ``[N,3,size,size]`` images and labels.

    Cached per process (colouring 10,000 digits takes seconds); the tensors returned are read-only by
    convention: index them (a copy) before changing anything."""
    return _color_mnist(None if root is None else str(root), int(size), int(seed))


@functools.lru_cache(maxsize=2)
def _color_mnist(root: str | None, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    u8, labels = load_mnist10k(root)
    x = color_digits(to_float(u8, size=size, mean=0.0, std=1.0), seed)
    return torch.round(x * 255).to(torch.uint8), labels
