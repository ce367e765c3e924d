"""AaD: attracting and dispersing (Yang et al., NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.distributed import all_gather_cat
from ..core.method import Batch
from ..registry import register
from .banks import BankMethod
from .common import batch_knn, check_target_size


@dataclass
class AaDOptions:
    K: int = 5                # neighbours attracted (official: 5 VisDA, 3 Office-Home)
    alpha: float = 1.0        # dispersion weight at the start ...
    beta: float = 0.0         # dispersion decay alpha * (1 + 10 p) ** -beta (0 = constant, the official
    #                           Office-31/Office-Home setting; official VisDA: 5); see the class docstring
    anchor: float = 0.3       # CE to the unadapted model's confident half (SFDAMethod.anchor_loss; 0 = published)
    backbone_lr: Optional[float] = None   # None: x0.1 for a backbone >= 5M params, else x1 (SFDAMethod)
    dropout: bool = False     # keep dropout on while adapting (official code: on; see SFDAMethod)
    head_lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True


@register("aad", task="sfda", family="self-training")
class AaD(BankMethod):
    """AaD (Yang et al., NeurIPS 2022): attract kNN predictions, disperse the batch's other predictions.

    Why the dispersion no longer decays by default (issue 9): with the VisDA schedule
    alpha * (1 + 10 p) ** -5 the dispersion weight is 0.4 % of its start after a third of the run, and
    the attraction alone is minimised by predicting one class for a neighbourhood and then for its
    neighbours: the target's classes merge. Measured on sfda-shifts (dev, seed 0): shapes noise@4
    95.2 % at epoch 1, 69.1 % at the end; zigzag@4 65.7 -> 13.1 %; rotate@4 below the source. The
    official Office-31/Office-Home setting keeps alpha constant (beta 0), which does not merge classes
    (shapes noise@4 96.7 %, rotate@4 69.9 % against 69.8 % source). ``beta=5`` restores the VisDA schedule.
    With the SFDAMethod rules too (dropout off, backbone lr x1 for the LeNet): zigzag@4 77.7 %,
    rotate@4 77.0, motion_blur@4 82.7 (was 73.3), scale@4 95.9 (was 74.6), shapes noise@4 97.8.

    dfkt's default adds SHOT's ``anchor`` term (0.3, ``SFDAMethod.anchor_loss``; ``anchor=0`` is the
    published objective). Why (issue 9): attraction and dispersion have no term tying the predictions to
    the source, so on a target where the source is already about right nothing stops a slow drift: on
    shapes->rotate@3 (dev) every seed ended 0.2-1.65 points below source-only (77.7 / 77.6 / 78.65 against
    78.55 / 79.25 / 77.55) while AdaBN alone stays level. With the anchor, dev half, 3 seeds: mean
    82.68 -> 83.31, rotate@3 78.2 / 78.15 / 79.25 (one run still 1.1 below), zigzag@4 74.8 -> 77.4,
    mnist->invert 24.8 -> 28.4 (returned), mnist->uci 98.5 -> 98.0, uci->mnist 69.5 -> 68.8.
    """

    Options = AaDOptions
    defaults = {"epochs": 15, "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-3}   # epochs: SFDAMethod rule
    #   (dev mean at epoch 5 / 8 / 10 / 15: 83.41 / 83.84 / 84.10 / 84.42, still rising)

    def setup_extra(self) -> None:
        check_target_size(self.ctx, self.opts.K, "aad")
        super().setup_extra()

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        alpha = o.alpha * (1 + 10 * self.progress()) ** (-o.beta)
        logits, p = self.forward_and_update(batch.x, batch.idx)
        with torch.no_grad():
            _, nn_idx = batch_knn(self.fea_bank[batch.idx], self.index, o.K, batch.idx)
            s_near = self.score_bank[nn_idx]                                        # [B, K, C]
        attract = -(p.unsqueeze(1) * s_near).sum(2).sum(1).mean()
        allp = all_gather_cat(p)                                                    # global batch
        disperse = ((p @ allp.t()).sum(1) - (p * p).sum(1)).mean()
        loss = attract + alpha * disperse
        terms = {"attract": attract.detach(), "disperse": disperse.detach()}
        loss = self.add_anchor(loss, terms, logits, batch.idx)
        terms["loss"] = loss.detach()
        self.ctx.optimize(loss, self.optimizer, terms)
        self.step_schedule()
        return terms
