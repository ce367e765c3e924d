"""``shapes``: a procedural 10-class data set of grayscale silhouettes that are not digits.

A third source domain for the shift suites, so that no SFDA default is tuned to handwritten digits
alone. Each image is one shape drawn from a signed distance field with a random position, size,
aspect ratio, rotation, stroke width, ink level and shading; classes differ by shape and topology:

    0 disk      1 ring            2 square       3 square outline   4 triangle
    5 triangle outline  6 plus    7 five-lobed star  8 crescent     9 two dots

Generation is vectorised over the batch and deterministic by ``seed`` (random numbers drawn on the
CPU), so every machine builds the same images.
"""
from __future__ import annotations

import functools
import math

import torch

CLASSES = ("disk", "ring", "square", "square outline", "triangle", "triangle outline", "plus", "star",
           "crescent", "two dots")
DEFAULT_COUNT = 10000   # like mnist10k: train = [:8000], test = [8000:]
DEFAULT_SEED = 0


def _box(x: torch.Tensor, y: torch.Tensor, hx: float | torch.Tensor, hy: float | torch.Tensor) -> torch.Tensor:
    """Signed distance (normalised units) to an axis-aligned box of half sides hx, hy."""
    dx, dy = x.abs() - hx, y.abs() - hy
    outside = torch.sqrt(dx.clamp_min(0) ** 2 + dy.clamp_min(0) ** 2)
    return outside + torch.maximum(dx, dy).clamp_max(0)


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance to an equilateral triangle of circumradius 1 (apex up)."""
    d = None
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3 + math.pi   # outward normals of the three sides
        v = x * math.cos(a) + y * math.sin(a) - 0.5
        d = v if d is None else torch.maximum(d, v)
    return d


def make_shapes(n: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images as uint8 ``[n,size,size]`` (0 = background) and int64 labels (balanced classes).

    Cached per process (a few seconds for 10,000 images); the tensors returned are read-only by
    convention: index them (a copy) before changing anything."""
    return _make_shapes(int(n), int(seed), int(size))


@functools.lru_cache(maxsize=4)
def _make_shapes(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    u = torch.rand(n, 10, generator=g)
    px = size / 28.0
    cx = (size - 1) / 2 + (u[:, 0] - 0.5) * 6 * px
    cy = (size - 1) / 2 + (u[:, 1] - 0.5) * 6 * px
    radius = (7.0 + 4.0 * u[:, 2]) * px                       # pixels
    aspect = 0.8 + 0.45 * u[:, 3]
    angle = (u[:, 4] - 0.5) * math.radians(50)
    stroke = (1.6 + 1.6 * u[:, 5]) * px
    ink = 0.7 + 0.3 * u[:, 6]
    shade = (u[:, 7] - 0.5) * 0.6                             # linear shading across the shape
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
    v = lambda t: t.view(n, 1, 1)   # noqa: E731
    dx, dy = cols.unsqueeze(0) - v(cx), rows.unsqueeze(0) - v(cy)
    cos, sin = torch.cos(v(angle)), torch.sin(v(angle))
    # shape coordinates: rotated, scaled by the radius and the aspect ratio; y points up
    x = (dx * cos + dy * sin) / (v(radius) * v(aspect))
    y = -(-dx * sin + dy * cos) / (v(radius) / v(aspect))
    r = torch.sqrt(x * x + y * y)
    theta = torch.atan2(y, x)
    disk = r - 1
    square = _box(x, y, 0.8, 0.8)
    triangle = _triangle(x, y * 1.0 + 0.15)
    plus = torch.minimum(_box(x, y, 1.0, 0.3), _box(x, y, 0.3, 1.0))
    star = r - (0.55 + 0.45 * (0.5 + 0.5 * torch.cos(5 * theta)))
    crescent = torch.maximum(disk, -(torch.sqrt((x - 0.55) ** 2 + y * y) - 0.85))
    dots = torch.minimum(torch.sqrt((x - 0.55) ** 2 + y * y), torch.sqrt((x + 0.55) ** 2 + y * y)) - 0.42
    sdf = torch.stack([disk, disk, square, square, triangle, triangle, plus, star, crescent, dots], 1)
    d = sdf[torch.arange(n), labels] * v(radius)               # pixels (approximately)
    outline = torch.tensor([False, True, False, True, False, True, False, False, False, False])[labels]
    filled = (0.5 - d).clamp(0, 1)
    ring = (v(stroke) / 2 + 0.5 - d.abs()).clamp(0, 1)
    mask = torch.where(v(outline), ring, filled)
    shading = 1 + v(shade) * (x + y).clamp(-1.5, 1.5) / 1.5
    img = (mask * v(ink) * shading).clamp(0, 1)
    return torch.round(img * 255).to(torch.uint8), labels.long()
