"""DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019).

Min-max game: the generator maximises the teacher/student discrepancy (mean absolute logit
difference), the student minimises it, with ``kd_steps`` student steps per generator step.
``gen_loss='log'`` maximises ``log(discrepancy)`` instead, which rescales the generator's gradient
by 1/discrepancy so that it does not vanish as the student catches up.
Official MNIST setting: lr_S 0.1 (SGD), lr_G 1e-3 (Adam), batch 256, nz 256, 5 student steps per
generator step, 50 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.losses import logit_l1
from ..registry import register
from .common import GeneratorMethod, GeneratorOptions, no_param_grad


@dataclass
class DFADOptions(GeneratorOptions):
    kd_loss: Literal["kl", "l1"] = "l1"
    kd_steps: int = 5
    nz: int = 256
    gen_loss: Literal["l1", "log"] = "l1"
    g_schedule: bool = True      # the official code decays the generator's lr with the student's


@register("dfad", task="dfkd", family="generator")
class DFAD(GeneratorMethod):
    """DFAD (Fang et al., 2019): a generator maximises the teacher/student L1 discrepancy, the student minimises it."""

    Options = DFADOptions
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def synthesize_batch(self):
        o = self.opts
        self.generator.train()
        x = self.gen(self.z())
        with self.ctx.autocast(), no_param_grad(self.ctx.learner):
            with torch.no_grad():
                t_logits = self.teacher(x)
            d = logit_l1(self.student_logits(x).float(), t_logits.float())
        loss = -torch.log(d + 1e-8) if o.gen_loss == "log" else -d
        terms = {"adv": d.detach()}
        self.g_optimize(loss, terms)
        return x.detach(), t_logits.detach().float(), terms

    def student_batch(self, x, t_logits):
        if self.pool is not None:
            return super().student_batch(x, t_logits)
        with torch.no_grad():                     # the official recipe: a fresh batch per student step
            x = self.gen(self.z())
            return x, self.teacher(x)
