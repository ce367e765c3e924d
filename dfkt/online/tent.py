"""Tent: online entropy minimisation over the normalisation layers (Wang et al., ICLR 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.losses import entropy
from ..registry import register
from .base import Output, TTAMethod
from .common import norm_affine_params, train_only


@dataclass
class TentOptions:
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9          # sgd only


@register("tent", task="tta", family="online")
class Tent(TTAMethod):
    """Tent (Wang et al., ICLR 2021): minimise the prediction entropy online, training only the norm layers' scale/shift.

    Rules (published settings): BatchNorm normalises with test-batch statistics; only the affine
    parameters of the normalisation layers train; one step per batch on the mean entropy of its
    predictions, which are scored before the step; never reset (``episodic=False``). CIFAR-10-C:
    Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, batch 128 (200 in the public benchmark);
    ImageNet-C: SGD lr 0.00025, momentum 0.9, batch 64.
    """

    Options = TentOptions

    def configure(self) -> None:
        self.params = train_only(self.ctx.learner, norm_affine_params(self.ctx.learner, self.name))

    def init_state(self) -> None:
        self.opt = self.optimizer(self.params, self.opts.optimizer, self.opts.momentum)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.ctx.learner(x))

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        loss = entropy(out.logits.float())
        self.ctx.optimize(loss, self.opt, {"ent": loss})
        return {"ent": loss.detach()}
