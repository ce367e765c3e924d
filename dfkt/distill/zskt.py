"""ZSKT (Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019).

The generator maximises KL(teacher || student) on its images; the student minimises the KL plus
``beta`` times attention transfer between matching layers (auto: for each spatial size the last
module common to both nets, or ``feature_layers``), ``kd_steps`` student steps on each generated
batch. Official CIFAR setting: 1 generator / 10 student steps, Adam 1e-3 (G) and 2e-3 (S),
cosine schedule, batch 128, z 100, beta 250.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.losses import kd_kl
from ..registry import register
from .common import GeneratorMethod, GeneratorOptions, no_param_grad


@dataclass
class ZSKTOptions(GeneratorOptions):
    kd_steps: int = 10
    feature_loss: Literal["none", "at", "sp", "pkt", "rkd", "fitnet"] = "at"
    feature_weight: float = 250.0       # ZSKT's beta


@register("zskt", task="dfkd", family="generator")
class ZSKT(GeneratorMethod):
    """ZSKT (Micaelli & Storkey, NeurIPS 2019): adversarial generator (max KL) + KL and attention transfer."""

    Options = ZSKTOptions
    defaults = {"epochs": 20, "iters_per_epoch": 20, "lr": 0.05, "batch_size": 256, "weight_decay": 5e-4}

    def synthesize_batch(self):
        self.generator.train()
        for _ in range(self.opts.g_steps):
            x = self.gen(self.z())
            with self.ctx.autocast(), no_param_grad(self.ctx.learner):
                with torch.no_grad():
                    t_logits = self.teacher(x)
                kl = kd_kl(self.student_logits(x).float(), t_logits.float(), 1.0)
            terms = {"adv": kl.detach()}
            self.g_optimize(-kl, terms)
        return x.detach(), t_logits.detach().float(), terms
