"""DFQ (Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
CVPRW 2020), in the form of the CMI code base's ``dfq`` baseline.

A generator is trained with the teacher's BatchNorm statistics as a prior, a one-hot loss against
sampled labels and an adversarial teacher/student disagreement term; the student is distilled
(KL, temperature) on fresh generator batches, ``kd_steps`` per generator step. Needs a teacher
with BatchNorm layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .common import BNSynthOptions, BNGeneratorMethod, balanced_labels


@dataclass
class DFQOptions(BNSynthOptions):
    kd_steps: int = 5
    conditional: bool = False   # DFQ's one-hot term is against the teacher's own argmax


@register("dfq", task="dfkd", family="generator")
class DFQ(BNGeneratorMethod):
    """DFQ (Choi et al., 2020): generator with BN-statistics, one-hot and adversarial losses; KD on its samples."""

    Options = DFQOptions
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def synthesize_batch(self):
        self.generator.train()
        o = self.opts
        y = balanced_labels(self.synth_bs, self.ctx.num_classes, self.device, self.ctx.rng) if o.conditional else None
        for _ in range(o.g_steps):
            x = self.gen(self.z(), y)
            with self.ctx.autocast():
                loss, t_logits, terms = self.objective(x, y, self.student)
            self.g_optimize(loss, terms)
        return x.detach(), t_logits.detach(), terms

    def student_batch(self, x, t_logits):
        if self.pool is not None:
            return super().student_batch(x, t_logits)
        with torch.no_grad():                      # a fresh generator batch per student step
            y = (balanced_labels(self.synth_bs, self.ctx.num_classes, self.device, self.ctx.rng)
                 if self.opts.conditional else None)
            x = self.gen(self.z(), y)
            return x, self.teacher(x)
