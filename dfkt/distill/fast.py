"""Fast (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).

Like CMI/DeepInversion, batches are synthesized by optimising a generator copy and its latent
codes against the teacher's BatchNorm statistics, a one-hot loss and an adversarial term; but the
copy starts from a *meta-learned* generator, so a handful of steps (``g_steps`` 2-5 instead of
hundreds) suffice. After each synthesis the meta generator takes a first-order MAML step with the
gradients of the inner steps. Statistics are matched with a momentum over batches (``bn_mmt``),
the first layer of the copy is re-initialised each time (``reset_l0``), the batches go to a data
pool on which the student trains, and the first ``warmup`` epochs only synthesize.
Official CIFAR setting: g_steps 2-5, lr_g 5e-3, lr_z 0.015, bn 10, oh 0.5, adv 1.1 (CIFAR-10),
bn_mmt 0.9, T 20, kd/ep steps 400, warmup 20 of 220 epochs, student lr 0.2, batch 256.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..registry import register
from .common import BNSynthOptions, BNGeneratorMethod, balanced_labels


@dataclass
class FastOptions(BNSynthOptions):
    g_steps: int = 2
    g_lr: float = 5e-3
    z_lr: float = 0.015
    bn: float = 10.0
    oh: float = 0.5
    adv: float = 1.1
    bn_mmt: float = 0.9
    reset_l0: bool = True
    warmup: int = 0            # epochs of synthesis only (no student steps)
    pool_batches: int = 40
    kd_steps: int = 5


class _MetaAccumulating:
    """Optimizer facade for the inner steps: before each (finite) inner step the copy's gradients are
    added to the meta generator's (first-order MAML), then the inner optimiser steps."""

    def __init__(self, inner: torch.optim.Optimizer, fast: torch.nn.Module, meta: torch.nn.Module):
        self.inner, self.pairs = inner, list(zip(fast.parameters(), meta.parameters()))

    @property
    def param_groups(self):
        return self.inner.param_groups

    def step(self) -> None:
        for pf, pm in self.pairs:
            if pf.grad is not None:
                pm.grad = pf.grad.detach().clone() if pm.grad is None else pm.grad + pf.grad.detach()
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)


@register("fast", task="dfkd", family="generator")
class Fast(BNGeneratorMethod):
    """Fast (Fang et al., AAAI 2022): meta-learned generator initialisation, few synthesis steps, data pool."""

    Options = FastOptions
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def synthesize_batch(self):
        o = self.opts
        fast = copy.deepcopy(self.generator).train()
        if o.reset_l0:
            fast.reset_first_layer()
        z = self.z().requires_grad_()
        y = balanced_labels(self.synth_bs, self.ctx.num_classes, self.device, self.ctx.rng)
        inner = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": o.z_lr}], lr=o.g_lr,
                                 betas=(0.5, 0.999))
        opt = _MetaAccumulating(inner, fast, self.generator)
        adv_on = self.ctx.epoch >= o.warmup
        self.g_opt.zero_grad(set_to_none=True)
        for _ in range(o.g_steps):
            x = fast(z, y)
            with self.ctx.autocast():
                loss, t_logits, terms = self.objective(x, y, self.student if adv_on else None)
            self.g_optimize(loss, terms, opt)
        self.g_opt.step()                          # meta step with the accumulated inner gradients
        self.g_opt.zero_grad(set_to_none=True)
        self.objective.commit()
        with torch.no_grad():                      # the last inner step improved the batch: use it
            x = fast(z, y)
            t_logits = self.teacher(x).float()
        return x, t_logits, terms

    @torch.no_grad()
    def synthesize(self, n: int) -> torch.Tensor:
        g = copy.deepcopy(self.generator).train()
        y = balanced_labels(n, self.ctx.num_classes, self.device, self.ctx.rng)
        return torch.cat([g(self.z(min(256, n - i)), y[i:i + 256]) for i in range(0, n, 256)])[:n]

    def step(self, batch):
        if self.ctx.epoch < self.opts.warmup:
            x, t_logits, terms = self.synthesize_batch()
            self.pool.add(x, t_logits) if self.pool is not None else None
            return terms
        return super().step(batch)
