"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.loader import make_loader
from ..core.losses import entropy
from ..errors import ConfigError
from ..registry import register
from .base import Output, TTAMethod, check_positive
from .common import norm_affine_params, train_only, use_batch_statistics

log = logging.getLogger("dfkt")


@dataclass
class EATAOptions:
    e_margin: float = 0.4          # reliable samples: entropy < e_margin * ln(C)
    d_margin: float = 0.4          # non-redundant samples: |cos(p, moving average of p)| < d_margin
    fisher_alpha: float = 1.0      # weight of the Fisher (EWC) anti-forgetting term; 0 = ETA
    fisher_samples: int = 2000     # clean source samples the Fisher is estimated on

    def validate(self) -> None:
        check_positive("eata options", e_margin=self.e_margin, d_margin=self.d_margin)
        if self.fisher_alpha < 0 or self.fisher_samples < 1:
            raise ConfigError(f"eata options: fisher_alpha must be >= 0 and fisher_samples >= 1, got "
                              f"{self.fisher_alpha} and {self.fisher_samples}.")


@register("eata", task="tta", family="online")
class EATA(TTAMethod):
    """EATA (Niu et al., ICML 2022): entropy minimisation on reliable, non-redundant samples + Fisher anti-forgetting.

    Rules (published settings, CIFAR-10-C in the public benchmark): train the normalisation layers'
    scale/shift with test-batch BN statistics; a sample takes part when its entropy is below
    E0 = 0.4 ln C and the cosine similarity of its prediction to the moving average of the selected
    predictions (m <- 0.9 m + 0.1 mean) is below 0.4 (ImageNet: 0.05); its entropy is weighted by
    exp(E0 - entropy); no step when no sample is selected; Adam lr 1e-3 (ImageNet: SGD 0.00025),
    batch 200. Anti-forgetting: alpha * sum F (theta - theta_0)^2 with the diagonal Fisher F of the
    pseudo-label CE on 2,000 clean source samples, alpha = 1 (ImageNet: 2000). Without source samples
    (``dfkt.tta(..., source_data=...)``) EATA runs as ETA, as the reference code does.
    """

    Options = EATAOptions

    def configure(self) -> None:
        learner = self.ctx.learner
        self.params = train_only(learner, norm_affine_params(learner, self.name))
        self.e0 = self.opts.e_margin * math.log(self.ctx.num_classes)
        self.fisher = None
        if self.opts.fisher_alpha > 0 and self.source_data is not None:
            self.fisher = self._fisher()
        elif self.opts.fisher_alpha > 0:
            log.info("eata: no source_data given, so no Fisher regulariser (EATA runs as ETA)")

    def _fisher(self) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]:
        """(parameter, Fisher diagonal, source value) for every trained parameter."""
        learner = self.ctx.learner
        use_batch_statistics(learner)
        n = min(self.opts.fisher_samples, len(self.source_data))
        bs = max(2, self.plan.batch_size)
        fisher = [torch.zeros_like(p) for p in self.params]
        batches = 0
        for x, _y, idx in make_loader(self.source_data, bs, self.ctx.device, shuffle=False, shard=False):
            keep = idx < n
            if not bool(keep.any()):
                break
            x = x[keep]
            if x.shape[0] < 2:
                continue
            logits = learner(x)
            loss = F.cross_entropy(logits, logits.detach().argmax(1))
            grads = torch.autograd.grad(loss, self.params)
            for f, g in zip(fisher, grads):
                f.add_(g.detach() ** 2)
            batches += 1
        return [(p, f / max(1, batches), p.detach().clone()) for p, f in zip(self.params, fisher)]

    def init_state(self) -> None:
        self.opt = self.optimizer(self.params)
        k = self.ctx.num_classes
        self.probs = self.vector("probs", torch.full((k,), 1.0 / k))
        self.probs_set = self.scalar("probs_set", 0.0)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.ctx.learner(x))

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        logits = out.logits.float()
        ent = entropy(logits, reduction="none")
        p = F.softmax(logits.detach(), 1)
        reliable = ent.detach() < self.e0
        cos = F.cosine_similarity(self.probs.unsqueeze(0), p, dim=1)
        fresh = (cos.abs() < self.opts.d_margin) | (self.probs_set == 0)
        sel = reliable & fresh
        n = sel.sum()
        with torch.no_grad():
            mean_sel = (p * sel.unsqueeze(1)).sum(0) / n.clamp_min(1)
            new = torch.where(self.probs_set > 0, 0.9 * self.probs + 0.1 * mean_sel, mean_sel)
            self.probs.copy_(torch.where(n > 0, new, self.probs))
            self.probs_set.copy_(torch.where(n > 0, torch.ones_like(self.probs_set), self.probs_set))
        w = sel.float() * torch.exp(self.e0 - ent.detach())
        loss = (ent * w).sum() / n.clamp_min(1)
        terms = {"ent": ent.detach().mean(), "selected": n.float() / x.shape[0]}
        if self.fisher is not None:
            ewc = sum((f * (p_ - p0) ** 2).sum() for p_, f, p0 in self.fisher) * self.opts.fisher_alpha
            loss = loss + ewc
            terms["ewc"] = ewc.detach()
        if bool(n > 0):        # one host sync: no step (and no Adam momentum drift) without selected samples
            self.ctx.optimize(loss, self.opt, terms)
        return terms
