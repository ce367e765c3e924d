"""MNIST-C / ImageNet-C style corruptions of float images in [0, 1].

Every corruption takes ``[N,C,H,W]`` floats, a severity 1..5 and a ``torch.Generator`` (random numbers
are drawn on the CPU, so results do not depend on the device), works on the whole batch at once and
keeps the shape and the [0, 1] range. Pixel-sized parameters are tuned for 28x28 digits and grow with
larger images. After Hendrycks & Dietterich (ImageNet-C, ICLR 2019) and Mu & Gilmer (MNIST-C, 2019).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from dfkt.errors import DataError, suggest

log = logging.getLogger(__name__)

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
CORRUPTIONS: dict[str, CorruptionFn] = {}


def _register(fn: CorruptionFn) -> CorruptionFn:
    CORRUPTIONS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- helpers
def _rand(g: torch.Generator, x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g).to(x.device, x.dtype)


def _sign(g: torch.Generator, x: torch.Tensor, n: int) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(x.device, x.dtype)


def _px(x: torch.Tensor) -> float:
    """Pixel scale: 1 for images up to 28 px, larger for bigger images."""
    return max(1.0, min(x.shape[-2:]) / 28.0)


def _affine(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``x`` at ``a @ p + t`` (``a`` [N,2,2], ``t`` [N,2], normalised coords), zero outside."""
    theta = torch.cat([a, (t if t is not None else a.new_zeros(a.shape[0], 2)).unsqueeze(-1)], dim=-1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _pixel_grid(x: torch.Tensor) -> torch.Tensor:
    """Pixel-centre coordinates ``[1,H,W,2]`` as (col, row)."""
    h, w = x.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                                torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    return torch.stack([cols, rows], dim=-1).unsqueeze(0)


def _segment(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of pixels ``p`` [1,H,W,2] to segments ``a->b`` [N,2] and the arc position along them."""
    a, d = a[:, None, None], (b - a)[:, None, None]
    length2 = (d * d).sum(-1).clamp_min(1e-8)
    t = (((p - a) * d).sum(-1) / length2).clamp(0, 1)
    dist = (p - a - t.unsqueeze(-1) * d).norm(dim=-1)
    return dist, t * length2.sqrt()


def _ink(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Draw white strokes: ``max(x, mask)`` with ``mask`` [N,H,W] in [0,1]."""
    return torch.maximum(x, mask.unsqueeze(1).to(x.dtype))


def _line_endpoints(g: torch.Generator, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image a random line through the central region that spans the whole image."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    ang = _rand(g, x, n) * math.pi
    centre = torch.stack([(w - 1) / 2 + (_rand(g, x, n) - 0.5) * 0.5 * w,
                          (h - 1) / 2 + (_rand(g, x, n) - 0.5) * 0.5 * h], dim=-1)
    half = math.hypot(h, w) * torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
    return centre - half, centre + half


# ----------------------------------------------------------------------------- noise
@_register
def gaussian_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + torch.randn(x.shape, generator=g).to(x.device, x.dtype) * c


@_register
def shot_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    lam = (60.0, 25.0, 12.0, 5.0, 3.0)[severity - 1]
    return (torch.poisson(x.detach().float().cpu() * lam, generator=g) / lam).to(x.device, x.dtype)


@_register
def impulse_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    u = torch.rand(x.shape, generator=g).to(x.device, x.dtype)
    return torch.where(u < amount / 2, torch.zeros_like(x), torch.where(u > 1 - amount / 2, torch.ones_like(x), x))


@_register
def speckle_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    return x + x * torch.randn(x.shape, generator=g).to(x.device, x.dtype) * c


# ----------------------------------------------------------------------------- blur
@_register
def gaussian_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    return _blur(x, (0.5, 0.75, 1.0, 1.25, 1.5)[severity - 1] * _px(x))


@_register
def motion_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Blur along a line of random direction per image (one grouped convolution)."""
    length = (3, 5, 7, 9, 11)[severity - 1] * _px(x)
    r = int(math.ceil(length / 2))
    n, c, h, w = x.shape
    ang = _rand(g, x, n)[:, None, None] * math.pi
    u = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    vv, uu = torch.meshgrid(u, u, indexing="ij")
    along = uu * torch.cos(ang) + vv * torch.sin(ang)
    across = (vv * torch.cos(ang) - uu * torch.sin(ang)).abs()
    k = (1 - across).clamp_min(0) * (length / 2 + 0.5 - along.abs()).clamp(0, 1)
    k = (k / k.sum(dim=(1, 2), keepdim=True)).repeat_interleave(c, dim=0).unsqueeze(1)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate")
    return F.conv2d(y, k, groups=n * c).reshape(n, c, h, w)


@_register
def pixelate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    f = (0.75, 0.6, 0.5, 0.4, 0.3)[severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


# ----------------------------------------------------------------------------- photometric
@_register
def contrast(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c + m


@_register
def brightness(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    return x + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


@_register
def invert(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """``1 - x`` (the severity is ignored)."""
    return 1 - x


@_register
def colorize(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Random ink and background grey levels per image (a colour image seen in luminance): about half
    the images get dark ink on a light background; the ink/background gap shrinks with severity."""
    gap = (0.7, 0.6, 0.5, 0.4, 0.3)[severity - 1]
    n = x.shape[0]
    bg = _rand(g, x, n)
    span = gap + (1 - gap) * _rand(g, x, n)
    up_ok, down_ok = bg + span <= 1, bg - span >= 0
    up = torch.where(up_ok & down_ok, _rand(g, x, n) < 0.5, up_ok)
    fg = torch.where(up, bg + span, bg - span)
    fg = torch.where(up_ok | down_ok, fg, torch.where(bg < 0.5, bg + span, bg - span)).clamp(0, 1)
    bg, fg = bg.view(n, 1, 1, 1), fg.view(n, 1, 1, 1)
    return bg + (fg - bg) * x


@_register
def texture(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """The digit over a random background texture (two sinusoidal gratings times smooth noise), as
    MNIST-M puts digits on photo patches: the ink keeps a random grey level, the texture gets
    stronger with severity until it reaches the ink's brightness."""
    amp = (0.4, 0.55, 0.7, 0.85, 1.0)[severity - 1]
    n, _, h, w = x.shape
    grid = _pixel_grid(x)[0]                                    # [H,W,2] (col, row)
    tex = torch.ones(n, h, w, device=x.device, dtype=x.dtype)
    for _ in range(2):
        ang = _rand(g, x, n).view(n, 1, 1) * math.pi
        period = (3 + 7 * _rand(g, x, n)).view(n, 1, 1) * _px(x)
        phase = _rand(g, x, n).view(n, 1, 1) * 2 * math.pi
        t = grid[..., 0] * torch.cos(ang) + grid[..., 1] * torch.sin(ang)
        tex = tex * (0.5 + 0.5 * torch.sin(2 * math.pi * t / period + phase))
    coarse = torch.rand(n, 1, 4, 4, generator=g).to(x.device, x.dtype)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[:, 0]
    tex = (0.6 * tex + 0.4 * smooth).unsqueeze(1)
    ink = (0.6 + 0.4 * _rand(g, x, n)).view(n, 1, 1, 1)
    return x * ink + (1 - x) * amp * tex


@_register
def jpeg(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """JPEG compression artefacts (Pillow, quality 30..6 with severity), image by image."""
    import io

    import numpy as np
    from PIL import Image

    quality = (30, 20, 14, 10, 6)[severity - 1]
    u8 = torch.round(x.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
    out = torch.empty_like(u8)
    for i in range(u8.shape[0]):
        for c in range(u8.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(u8[i, c].numpy()).save(buf, format="JPEG", quality=quality)
            buf.seek(0)
            out[i, c] = torch.from_numpy(np.array(Image.open(buf).convert("L")))
    return (out.float() / 255).to(x.device, x.dtype)


# ----------------------------------------------------------------------------- geometric
@_register
def rotate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    deg = (10.0, 20.0, 30.0, 40.0, 50.0)[severity - 1]
    n = x.shape[0]
    a = _sign(g, x, n) * torch.deg2rad(deg * (0.75 + 0.25 * _rand(g, x, n)))
    cos, sin = torch.cos(a), torch.sin(a)
    return _affine(x, torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2))


@_register
def shear(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    k = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1] * _sign(g, x, x.shape[0])
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return _affine(x, torch.stack([torch.stack([one, k], -1), torch.stack([zero, one], -1)], -2))


@_register
def scale(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Zoom out around the centre (the digit shrinks)."""
    f = (0.9, 0.8, 0.7, 0.6, 0.5)[severity - 1]
    a = torch.eye(2, device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 2) / f
    return _affine(x, a)


@_register
def translate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    frac = (0.05, 0.1, 0.15, 0.2, 0.25)[severity - 1]
    n = x.shape[0]
    t = torch.stack([_sign(g, x, n), _sign(g, x, n)], -1) * 2 * frac * (0.75 + 0.25 * _rand(g, x, n, 2))
    return _affine(x, torch.eye(2, device=x.device, dtype=x.dtype).expand(n, 2, 2), t)


@_register
def elastic(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random displacement field (coarse noise, bilinearly upsampled) applied with grid_sample."""
    alpha = (0.75, 1.0, 1.5, 2.0, 2.5)[severity - 1] * _px(x)
    n, _, h, w = x.shape
    coarse = torch.randn(n, 2, 4, 4, generator=g).to(x.device, x.dtype)
    disp = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    disp = disp * alpha * torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
    eye = torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(eye, list(x.shape), align_corners=False) + disp
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- strokes
@_register
def stripe(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """One white line across the image at a random angle and offset."""
    width = (1.0, 1.5, 2.0, 2.5, 3.0)[severity - 1] * _px(x)
    a, b = _line_endpoints(g, x)
    dist, _ = _segment(_pixel_grid(x), a, b)
    return _ink(x, (width / 2 + 0.5 - dist).clamp(0, 1))


@_register
def dotted_line(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """A dotted white line; higher severity gives thicker, denser dots."""
    width = (1.0, 1.25, 1.5, 1.75, 2.0)[severity - 1] * _px(x)
    period = (4.0, 3.75, 3.5, 3.25, 3.0)[severity - 1] * _px(x)
    a, b = _line_endpoints(g, x)
    dist, pos = _segment(_pixel_grid(x), a, b)
    dots = ((pos % period) < period * 0.5).to(x.dtype)
    return _ink(x, (width / 2 + 0.5 - dist).clamp(0, 1) * dots)


@_register
def zigzag(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """A zig-zag polyline across the image (more segments with severity), random orientation."""
    segs = (2, 3, 4, 5, 6)[severity - 1]
    width = (1.0, 1.25, 1.5, 1.75, 2.0)[severity - 1] * _px(x)
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    along = torch.linspace(0, 1, segs + 1, device=x.device, dtype=x.dtype).expand(n, -1)
    side = torch.arange(segs + 1, device=x.device) % 2
    across = 0.2 + 0.6 * side + (_rand(g, x, n, segs + 1) - 0.5) * 0.3
    flip = _rand(g, x, n, 1) < 0.5
    across = torch.where(flip, 1 - across, across)
    swap = (_rand(g, x, n, 1) < 0.5).unsqueeze(-1)
    pts = torch.stack([along * (w - 1), across * (h - 1)], -1)
    pts = torch.where(swap, torch.stack([across * (w - 1), along * (h - 1)], -1), pts)
    grid = _pixel_grid(x)
    dist = torch.stack([_segment(grid, pts[:, i], pts[:, i + 1])[0] for i in range(segs)]).amin(0)
    return _ink(x, (width / 2 + 0.5 - dist).clamp(0, 1))


# ----------------------------------------------------------------------------- public
def check_corruption(name: str, severity: int) -> CorruptionFn:
    """The corruption function for ``name``, or :class:`DataError` for a bad name / severity."""
    fn = CORRUPTIONS.get(str(name))
    if fn is None:
        raise DataError(f"unknown corruption {name!r}.{suggest(str(name), CORRUPTIONS)} "
                        f"Use one of: {', '.join(sorted(CORRUPTIONS))}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise DataError(f"corruption severity must be an integer in 1..5, got {severity!r}; "
                        f"pass severity=1 (mild) .. 5 (strong)")
    return fn


def _apply(fn: CorruptionFn, images: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() not in (3, 4):
        raise DataError("corruptions take float tensors [N,C,H,W] or [C,H,W] in [0,1], got "
                        f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                        f"{tuple(getattr(images, 'shape', ()))}; convert with to_float(..., mean=0, std=1)")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.numel() and (float(x.min()) < -1e-4 or float(x.max()) > 1 + 1e-4):
        raise DataError(f"corruptions expect values in [0,1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
                        f"corrupt before normalising (to_float(..., mean=0, std=1))")
    out = fn(x.float(), severity, g).clamp_(0, 1).to(images.dtype)
    return out.squeeze(0) if images.dim() == 3 else out


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """Corrupt ``images`` (float [N,C,H,W] or [C,H,W] in [0,1]); same seed -> same output."""
    fn = check_corruption(name, severity)
    return _apply(fn, images, severity, torch.Generator().manual_seed(int(seed)))


class Corrupt:
    """Transform form of :func:`corrupt` for single ``[C,H,W]`` tensors.

    Holds one generator seeded with ``seed``: a fixed sequence of calls gives a fixed sequence of outputs.
    """

    def __init__(self, name: str, severity: int = 3, seed: int = 0) -> None:
        self.fn = check_corruption(name, severity)
        self.name, self.severity, self.seed = name, severity, seed
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.fn, x, self.severity, self.generator)

    def __repr__(self) -> str:
        return f"Corrupt({self.name!r}, severity={self.severity}, seed={self.seed})"
