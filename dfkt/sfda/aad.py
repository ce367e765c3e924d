"""AaD: attracting and dispersing (Yang et al., NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass

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
    beta: float = 5.0         # ... decaying as alpha * (1 + 10 p) ** -beta (official VisDA: 5; Office: 0.75..)
    backbone_lr: float = 0.1  # official: backbone lr x0.1, bottleneck and head x1
    head_lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True


@register("aad", task="sfda", family="self-training")
class AaD(BankMethod):
    """AaD (Yang et al., NeurIPS 2022): attract kNN predictions, disperse the batch's other predictions."""

    Options = AaDOptions
    defaults = {"epochs": 15, "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-3}

    def setup_extra(self) -> None:
        check_target_size(self.ctx, self.opts.K, "aad")
        super().setup_extra()

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        alpha = o.alpha * (1 + 10 * self.progress()) ** (-o.beta)
        _logits, p = self.forward_and_update(batch.x, batch.idx)
        with torch.no_grad():
            _, nn_idx = batch_knn(self.fea_bank[batch.idx], self.fea_bank, o.K, batch.idx)
            s_near = self.score_bank[nn_idx]                                        # [B, K, C]
        attract = -(p.unsqueeze(1) * s_near).sum(2).sum(1).mean()
        allp = all_gather_cat(p)                                                    # global batch
        disperse = ((p @ allp.t()).sum(1) - (p * p).sum(1)).mean()
        loss = attract + alpha * disperse
        terms = {"attract": attract.detach(), "disperse": disperse.detach(), "loss": loss.detach()}
        self.ctx.optimize(loss, self.optimizer, terms)
        self.step_schedule()
        return terms
