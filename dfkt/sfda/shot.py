"""SHOT: source hypothesis transfer (Liang et al., ICML 2020)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..core.losses import entropy, marginal_entropy, pseudo_label_ce
from ..core.method import Batch
from ..registry import register
from .common import SFDAMethod, clustering_pseudo_labels


@dataclass
class ShotOptions:
    beta: float = 0.1                 # cls_par: weight of the pseudo-label CE (0.1 digits, 0.3 objects)
    ent_par: float = 1.0              # weight of the IM loss
    gent: bool = True                 # include the diversity (marginal entropy) term
    rounds: int = 1                   # hard re-clustering rounds after the soft-centroid one
    threshold: Optional[int] = None   # None: keep every class (SHOT digits); 0: drop empty classes (objects)
    distance: Literal["cosine", "euclidean"] = "cosine"
    refresh_every: int = 1            # re-cluster every this many epochs (SHOT: each epoch start)
    backbone_lr: Optional[float] = None   # None: x0.1 for a backbone >= 5M params, else x1 (SFDAMethod)
    dropout: bool = False     # keep dropout on while adapting (official code: on; see SFDAMethod)
    warmup_epochs: int = 0            # epochs with the pseudo-label term off (SHOT VisDA: 1)
    anchor: float = 0.3               # CE to the unadapted model's confident-half predictions (0 = published SHOT)
    momentum: float = 0.9
    nesterov: bool = True


@register("shot", task="sfda", family="self-training")
class Shot(SFDAMethod):
    """SHOT (Liang et al., ICML 2020): information maximisation + self-supervised clustering pseudo-labels.

    dfkt's default adds one term to the published objective, ``anchor`` (0.3): a cross-entropy to the
    predictions of the unadapted model (source weights, target BatchNorm statistics) on the half of each
    of its predicted classes where it is most confident. Why (issue 9): SHOT's pseudo-labels are the
    nearest centroid in the model's own feature space; where the shift adds structure the features
    follow (zigzag strokes, a rotation that makes 6 and 9 or 2 and 7 neighbours), the centroids form
    around that structure and the CE term locks it in. Measured on sfda-shifts dev, seed 0 (source-only
    / SHOT / SHOT + anchor): zigzag@4 62.9 / 52.6 / 71.9 %, rotate@4 69.8 / 66.5 / 73.5; unchanged where
    SHOT already works (motion_blur@4 83.0 / 83.5, uci->mnist 69.3 / 68.9). ``anchor=0`` is the
    published objective (the sfda-digits variant ``shot-paper`` runs it with SHOT's digit settings).
    """

    Options = ShotOptions
    # SHOT's digit recipe but 5 epochs (published: 30; ``epochs=30`` restores it), by SFDAMethod's epochs rule:
    # sfda-shifts dev mean at epoch 5 / 15 of the 15-epoch run: shot 81.56 / 81.65, shot-im (inherits) 82.39 / 82.38
    defaults = {"epochs": 5, "lr": 0.01, "batch_size": 64, "weight_decay": 1e-3}
    needs_index = True

    def setup_extra(self) -> None:
        n = len(self.ctx.target)
        self.pseudo = self.track("pseudo", torch.zeros(n, dtype=torch.long, device=self.ctx.device))
        self.pl_acc = None

    def epoch_begin(self, epoch: int) -> None:
        if getattr(self.opts, "beta", 0.0) > 0 and epoch % max(1, self.opts.refresh_every) == 0:
            out = self.target_outputs()
            self.pseudo.copy_(clustering_pseudo_labels(out["features"], out["logits"], self.opts.rounds,
                                                       self.opts.threshold, self.opts.distance))
            self.pl_acc = (self.pseudo == out["labels"]).float().mean()   # diagnostics only (labels unused)

    def batches(self):
        for b in super().batches():
            b.targets = self.pseudo[b.idx]
            yield b

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o = self.opts
        with self.ctx.autocast():
            logits = self.net(batch.x)
        logits = logits.float()
        ent = entropy(logits)
        div = marginal_entropy(logits) if o.gent else torch.zeros((), device=logits.device)
        loss = o.ent_par * (ent - div)
        terms = {"ent": ent.detach(), "div": div.detach()}
        loss = self.add_anchor(loss, terms, logits, batch.idx)
        beta = getattr(o, "beta", 0.0)
        if beta > 0:
            ce = pseudo_label_ce(logits, batch.targets)
            on = float(self.ctx.epoch >= o.warmup_epochs)
            loss = loss + on * beta * ce
            terms["ce"] = ce.detach()
        terms["loss"] = loss.detach()
        self.ctx.optimize(loss, self.optimizer, terms)
        self.step_schedule()
        return terms
