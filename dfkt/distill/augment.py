"""Augmentations of the student's batches: random shifts and pairwise mixup (reproducible from a generator)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_px: int, g: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_px`` pixels (border replicated by rolling a padded copy)."""
    if max_px <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_px,) * 4, mode="replicate")
    dx, dy = (int(v) for v in torch.randint(0, 2 * max_px + 1, (2,), generator=g))
    return pad[..., dy:dy + h, dx:dx + w]


def mix_pairs(x: torch.Tensor, alpha: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Mixup of each input with a random partner of the batch, lambda ~ Beta(alpha, alpha) per sample
    (drawn from ``g`` on the host, so runs stay reproducible)."""
    n = x.shape[0]
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
        perm = torch.randperm(n)
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]
