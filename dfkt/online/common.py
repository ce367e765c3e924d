"""Parts shared by the online test-time adaptation methods: normalisation-layer set-up, the affine
parameters they train, test-time augmentations, DeYO's patch shuffle and RoTTA's robust BatchNorm.

Everything works on whole batches on the model's device; random numbers come from the run's seeded
CPU generator (``ctx.rng``) so that a stream gives the same result on every run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.hooks import BN_TYPES
from ..errors import ModelError
from ..sfda.common import random_affine, random_blur

NORM_TYPES = BN_TYPES + (nn.GroupNorm, nn.LayerNorm)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())


def use_batch_statistics(model: nn.Module) -> None:
    """Eval mode everywhere (no dropout), except that BatchNorm layers normalise with the statistics of
    the test batch and leave their running statistics untouched (Tent's set-up: train mode with
    ``track_running_stats=False``; the buffers stay, so resets and checkpoints keep working)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            m.train()
            m.track_running_stats = False


def norm_affine_params(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The scale/shift parameters of every BatchNorm/GroupNorm/LayerNorm layer (what Tent, EATA, SAR,
    DeYO and ROID train); a model without any raises ModelError."""
    params = [p for m in model.modules() if isinstance(m, NORM_TYPES)
              for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
    if not params:
        raise ModelError(f"method {method!r} trains the scale/shift of normalisation layers (BatchNorm, GroupNorm, "
                         f"LayerNorm), but the model ({type(model).__name__}) has none with affine parameters. Use a "
                         f"model with normalisation layers (e.g. 'lenet5-bn') or method 'cotta' (all parameters).")
    return params


def train_only(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``requires_grad`` on ``params`` only; returns them."""
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


# ----------------------------------------------------------------------------- augmentations
def tta_augment(x: torch.Tensor, g: torch.Generator, cotta: bool = True) -> torch.Tensor:
    """CoTTA's test-time augmentation on normalised image batches, per image: contrast x0.7-1.3 and a
    brightness shift of +-0.2 image std, an affine warp (+-15 degrees, +-1/16 translation, scale
    0.9-1.1), and (``cotta=True``; ROID's set leaves them out) a light blur (sigma <= 0.5 px) and
    Gaussian noise (std 0.005 of the image range). No horizontal flip: digits are not mirror-symmetric."""
    n = x.shape[0]
    r = torch.rand(n, 2, generator=g).to(x.device, x.dtype)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True) if x[0].numel() > 1 else torch.zeros_like(mean)
    c = (0.7 + 0.6 * r[:, 0]).view(n, 1, 1, 1)
    b = (r[:, 1] * 0.4 - 0.2).view(n, 1, 1, 1)
    x = (x - mean) * c + mean + b * std
    x = random_affine(x, g, degrees=15.0, translate=1 / 16, scale=(0.9, 1.1), shear=0.0)
    if not cotta:
        return x
    x = random_blur(x, g, max_sigma=0.5)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
    return x + 0.005 * span * torch.randn(x.shape, generator=g).to(x.device, x.dtype)


def patch_shuffle(x: torch.Tensor, g: torch.Generator, patches: int = 4) -> torch.Tensor:
    """DeYO's object-destroying view: cut each image into ``patches`` x ``patches`` tiles and shuffle
    them (one random permutation per image); sides not divisible by ``patches`` are resized first."""
    n, c, h, w = x.shape
    ph, pw = max(1, h // patches), max(1, w // patches)
    hh, ww = ph * patches, pw * patches
    y = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False) if (hh, ww) != (h, w) else x
    tiles = y.reshape(n, c, patches, ph, patches, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, patches * patches, c, ph, pw)
    perm = torch.argsort(torch.rand(n, patches * patches, generator=g), dim=1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(1), perm]
    y = tiles.reshape(n, patches, patches, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False) if (hh, ww) != (h, w) else y


# ----------------------------------------------------------------------------- robust BatchNorm
class RobustBatchNorm:
    """RoTTA's robust BatchNorm (Yuan et al., CVPR 2023) as forward hooks on a model's BN layers: each
    forward first moves the layer's running statistics towards the batch's by ``momentum`` and then
    normalises with them (gradients flow through the batch part). Layers that see fewer than two values
    per channel (e.g. a single sample in a BatchNorm1d) normalise with the running statistics alone,
    so any batch size works. The model stays a plain module whose running statistics are adapted.

    ``update = False``: the hooks do nothing (in eval mode the layers then normalise with the running
    statistics, unchanged).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.05):
        self.momentum = momentum
        self.update = True
        self.layers = [m for m in model.modules() if isinstance(m, BN_TYPES)]
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, m: nn.Module, args: tuple, _out: torch.Tensor) -> torch.Tensor:
        if not self.update:
            return None            # eval mode: the layer normalises with its running statistics
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = m.running_mean, m.running_var
        if x.numel() // x.shape[1] >= 2:
            b_var, b_mean = torch.var_mean(x, dim=dims, unbiased=False)
            mean = (1 - self.momentum) * mean + self.momentum * b_mean
            var = (1 - self.momentum) * var + self.momentum * b_var
            with torch.no_grad():
                m.running_mean.copy_(mean.detach())
                m.running_var.copy_(var.detach())
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)
        if m.affine:
            y = y * m.weight.view(shape) + m.bias.view(shape)
        return y

