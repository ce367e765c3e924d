"""AdaBN: re-estimate the BatchNorm statistics on the target (Li et al., 2016)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.hooks import BN_TYPES
from ..core.method import Batch, Method
from ..registry import register
from .common import set_bn_train_only


@dataclass
class AdaBNOptions:
    passes: int = 1        # passes over the target (cumulative average over all of them)


@register("adabn", task="sfda", family="self-training")
class AdaBN(Method):
    """AdaBN (Li et al., 2016): BatchNorm running statistics recomputed on the target; no gradient step."""

    Options = AdaBNOptions
    defaults = {"epochs": 1, "batch_size": 256}
    needs_learner_bn = True
    trains = False

    def setup(self) -> None:
        ctx = self.ctx
        self.loader = ctx.loader(ctx.target, shuffle=True, drop_last=False)
        ctx.steps_per_epoch = len(self.loader) * max(1, self.opts.passes)
        self.bns = [m for m in ctx.learner.modules() if isinstance(m, BN_TYPES)]
        for m in self.bns:
            m.reset_running_stats()
            m.momentum = None            # cumulative moving average = exact target statistics

    def batches(self):
        set_bn_train_only(self.ctx.learner)
        for _ in range(max(1, self.opts.passes)):
            for x, _y, idx in self.loader:
                if x.shape[0] >= 2:
                    yield Batch(x, idx)

    @torch.no_grad()
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.ctx.autocast():
            self.ctx.learner(batch.x)
        return {}
