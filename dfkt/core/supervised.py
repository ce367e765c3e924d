"""Supervised training as a method of the one loop: the source-model and teacher recipes use it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .losses import smoothed_ce
from .method import Batch, Method, cosine_decay, poly_decay, sgd


@dataclass
class SupervisedOptions:
    smoothing: float = 0.0                        # SHOT's source recipe: 0.1
    schedule: Literal["poly", "cosine", "none"] = "poly"
    momentum: float = 0.9
    nesterov: bool = True
    augment: bool = False                         # random +-2 px shifts (digits)


def random_shift(x: torch.Tensor, max_px: int, g: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_px`` pixels (zero fill), vectorised on the device."""
    if max_px <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_px,) * 4, value=float(x.min()))
    sh = torch.randint(0, 2 * max_px + 1, (n, 2), generator=g).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h) + sh[:, :1])              # [n, h]
    cols = (torch.arange(w, device=x.device).view(1, w) + sh[:, 1:])              # [n, w]
    b = torch.arange(n, device=x.device).view(n, 1, 1)
    out = pad.permute(0, 2, 3, 1)[b, rows.unsqueeze(2), cols.unsqueeze(1)]       # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


class Supervised(Method):
    """Cross-entropy (optionally label-smoothed) training on a labelled set."""

    name, task = "supervised", "supervised"
    Options = SupervisedOptions
    defaults = {"epochs": 30, "lr": 0.01, "batch_size": 64, "weight_decay": 5e-4}

    def __init__(self, ctx, opts, train_set):
        super().__init__(ctx, opts)
        self.train_set = train_set

    def setup(self) -> None:
        ctx, tc = self.ctx, self.ctx.train
        self.loader = ctx.loader(self.train_set, shuffle=True, drop_last=False)
        ctx.steps_per_epoch = len(self.loader)
        self.net = ctx.ddp(ctx.learner)
        self.opt = self.track("opt", sgd(ctx.learner.parameters(), tc.lr, self.opts.momentum, tc.weight_decay,
                                         self.opts.nesterov))
        sched = {"poly": poly_decay, "cosine": cosine_decay}.get(self.opts.schedule)
        self.sched = self.track("sched", sched(self.opt, ctx.total_steps)) if sched else None

    def batches(self):
        self.ctx.learner.train()
        for x, y, idx in self.loader:
            yield Batch(x, idx, targets=y)

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = random_shift(batch.x, 2, self.ctx.rng) if self.opts.augment else batch.x
        with self.ctx.autocast():
            logits = self.net(x)
        loss = smoothed_ce(logits.float(), batch.targets, self.opts.smoothing)
        self.ctx.optimize(loss, self.opt, {"ce": loss})
        if self.sched is not None:
            self.sched.step()
        return {"ce": loss.detach()}
