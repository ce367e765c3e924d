"""RDSKD (Han et al., "Robustness and Diversity Seeking Data-Free Knowledge Distillation", ICASSP 2021).

DAFL's generator losses (one-hot, activation, information entropy), each in exponential form
relative to its previous value, ``w * exp(L - L_prev)`` (a term that got worse weighs more, so no
term is left behind), plus a mode-seeking diversity regulariser: for two latent codes the ratio
``mean|G(z1) - G(z2)| / mean|z1 - z2|`` is maximised (Mao et al., 2019), so that different codes
give different images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .common import GeneratorMethod, GeneratorOptions
from .dafl import dafl_terms


@dataclass
class RDSKDOptions(GeneratorOptions):
    oh: float = 1.0
    act: float = 0.1
    ie: float = 5.0
    div: float = 1.0      # mode-seeking diversity weight


@register("rdskd", task="dfkd", family="generator")
class RDSKD(GeneratorMethod):
    """RDSKD (Han et al., ICASSP 2021): DAFL's losses in exponential relative form + mode-seeking diversity."""

    Options = RDSKDOptions
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def build(self) -> None:
        super().build()
        self.prev = self.track("prev_terms", torch.zeros(4, device=self.device))   # oh, act, ie, ms
        self.state["started"] = False

    def synthesize_batch(self):
        o = self.opts
        self.generator.train()
        z = self.z()
        x = self.gen(z)
        with self.ctx.autocast():
            t_logits, t = dafl_terms(self.teacher, x, o)
        h = x.shape[0] // 2
        ms = (x[:h] - x[h:2 * h]).abs().mean() / (z[:h] - z[h:2 * h]).abs().mean()
        cur = torch.stack([t["oh"], t["act"], t["ie"], -ms]).float()
        prev = self.prev if self.state["started"] else cur.detach()
        w = torch.tensor([o.oh, o.act, o.ie, o.div], device=cur.device)
        loss = (w * torch.exp((cur - prev).clamp(max=10.0))).sum()
        terms = {**{k: v.detach() for k, v in t.items()}, "ms": ms.detach()}
        self.g_optimize(loss, terms)
        self.prev.copy_(cur.detach())
        self.state["started"] = True
        return x.detach(), t_logits.detach().float(), terms
