"""DeYO: destroy your object (Lee et al., ICLR 2024)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.losses import entropy
from ..registry import register
from .base import Output, TTAMethod, check_positive
from .common import has_batchnorm, norm_affine_params, patch_shuffle, train_only


@dataclass
class DeYOOptions:
    margin: float = 0.5            # entropy filter: entropy < margin * ln(C)
    e_margin: float = 0.4          # E0 = e_margin * ln(C) of the entropy weight
    plpd: float = 0.2              # pseudo-label probability difference threshold
    patches: int = 4               # patch shuffle: patches x patches tiles
    reweight_ent: bool = True
    reweight_plpd: bool = True

    def validate(self) -> None:
        check_positive("deyo options", margin=self.margin, e_margin=self.e_margin, patches=self.patches)


@register("deyo", task="tta", family="online")
class DeYO(TTAMethod):
    """DeYO (Lee et al., ICLR 2024): entropy minimisation on samples whose prediction a patch shuffle destroys (PLPD).

    Rules (published settings; the public CIFAR-10-C benchmark: Adam lr 1e-3, batch 200): train the
    normalisation layers' scale/shift with test-batch BN statistics; keep samples with entropy
    < 0.5 ln C; shuffle each kept image's 4 x 4 patches; keep those whose pseudo-label probability
    drops by more than 0.2 (PLPD); weight each entropy by exp(E0 - entropy) + exp(PLPD), E0 = 0.4 ln C;
    no step when no sample is kept (nor when one is left on a BatchNorm model: its statistics need two).
    """

    Options = DeYOOptions

    def configure(self) -> None:
        learner = self.ctx.learner
        self.params = train_only(learner, norm_affine_params(learner, self.name))
        k = math.log(self.ctx.num_classes)
        self.margin, self.e0 = self.opts.margin * k, self.opts.e_margin * k
        self.min_kept = 2 if has_batchnorm(learner) else 1

    def init_state(self) -> None:
        self.opt = self.optimizer(self.params)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.ctx.learner(x))

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        logits = out.logits.float()
        ent = entropy(logits, reduction="none")
        idx = (ent.detach() < self.margin).nonzero().squeeze(1)     # host sync (boolean selection)
        terms = {"ent": ent.detach().mean(), "selected": torch.tensor(idx.numel() / x.shape[0], device=x.device)}
        if idx.numel() < self.min_kept:
            return terms
        p = F.softmax(logits[idx].detach(), 1)
        cls = p.argmax(1, keepdim=True)
        with torch.no_grad():
            p_shuffled = F.softmax(self.ctx.learner(patch_shuffle(x[idx], self.ctx.rng, self.opts.patches)).float(), 1)
        plpd = (p.gather(1, cls) - p_shuffled.gather(1, cls)).squeeze(1)
        sel = plpd > self.opts.plpd
        n = sel.sum()
        terms["selected"] = n.float() / x.shape[0]
        if not bool(n > 0):
            return terms
        e = ent[idx]
        coeff = (float(self.opts.reweight_ent) * torch.exp(self.e0 - e.detach())
                 + float(self.opts.reweight_plpd) * torch.exp(plpd))
        loss = (e * coeff * sel).sum() / n
        self.ctx.optimize(loss, self.opt, {"ent": loss})
        terms["loss"] = loss.detach()
        return terms
