"""CoTTA: continual test-time adaptation (Wang et al., CVPR 2022)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core.losses import soft_ce
from ..core.method import ema_update
from ..registry import register
from .base import Output, TTAMethod, check_positive, check_unit
from .common import tta_augment, use_batch_statistics


@dataclass
class CoTTAOptions:
    ema: float = 0.999             # mean-teacher momentum
    restore: float = 0.01          # stochastic restore: each weight goes back to the source with this probability
    threshold: float = 0.92        # anchor confidence below which the teacher averages augmented views
    augmentations: int = 32

    def validate(self) -> None:
        check_unit("cotta options", ema=self.ema, restore=self.restore, threshold=self.threshold)
        check_positive("cotta options", augmentations=self.augmentations)


@register("cotta", task="tta", family="online")
class CoTTA(TTAMethod):
    """CoTTA (Wang et al., CVPR 2022): mean teacher with augmentation-averaged pseudo-labels and stochastic restore.

    Rules (published settings, CIFAR-10-C): every parameter trains (Adam lr 1e-3, batch 200), with
    test-batch BN statistics; the prediction is the mean teacher's (EMA 0.999 of the student), averaged
    over 32 augmented views when the source (anchor) model's mean confidence on the batch is below
    0.92; the student minimises the cross-entropy to the teacher's soft prediction; after each step
    every weight/bias element returns to its source value with probability 0.01. CoTTA's
    augmentations are used without the horizontal flip (digits are not mirror-symmetric).
    """

    Options = CoTTAOptions

    def configure(self) -> None:
        learner = self.ctx.learner
        learner.requires_grad_(True)
        self.params = [p for p in learner.parameters()]
        self.anchor = copy.deepcopy(learner).requires_grad_(False)
        self.restorable = [(n, p) for n, p in learner.named_parameters() if n.rsplit(".", 1)[-1] in ("weight", "bias")]

    def set_modes(self) -> None:
        for m in (self.ctx.learner, self.teacher, self.anchor):
            use_batch_statistics(m)

    def init_state(self) -> None:
        self.opt = self.optimizer(self.params)
        self.teacher = self.frozen_copy("teacher")

    def model(self) -> nn.Module:
        return self.teacher

    def forward(self, x: torch.Tensor) -> Output:
        student = self.ctx.learner(x)
        with torch.no_grad():
            conf = torch.softmax(self.anchor(x).float(), 1).amax(1).mean()
            if bool(conf < self.opts.threshold):
                g = self.ctx.rng
                t = torch.stack([self.teacher(tta_augment(x, g)).float()
                                 for _ in range(self.opts.augmentations)]).mean(0)
            else:
                t = self.teacher(x).float()
        return Output(t, {"student": student})

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        loss = soft_ce(out.extra["student"].float(), out.logits).mean()
        self.ctx.optimize(loss, self.opt, {"ce": loss})
        ema_update(self.teacher, self.ctx.learner, self.opts.ema)
        if self.opts.restore > 0:
            self._stochastic_restore()
        return {"ce": loss.detach()}

    @torch.no_grad()
    def _stochastic_restore(self) -> None:
        g = self.ctx.rng
        for name, p in self.restorable:
            keep = (torch.rand(p.shape, generator=g) >= self.opts.restore).to(p.device)
            src = self.source_state[name]
            p.copy_(torch.where(keep, p, src))
