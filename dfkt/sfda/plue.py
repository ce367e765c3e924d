"""PLUE: pseudo-labels guided by uncertainty estimation (Litrico et al., CVPR 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.distributed import all_gather_cat
from ..core.hooks import frozen_bn_stats
from ..core.losses import marginal_entropy
from ..core.method import Batch
from ..registry import register
from .banks import BankMethod
from .common import check_target_size, forward_with_features, weak_augment
from .moco import MomentumKeys


@torch.no_grad()
def uncertainty_weight(probs: torch.Tensor) -> torch.Tensor:
    """PLUE's per-sample weight ``exp(-H(p) / log C)`` in [1/e, 1]: 1 for a one-hot ``p``, 1/e for uniform."""
    h = -(probs * torch.log(probs + 1e-5)).sum(1)
    return torch.exp(-h / torch.log(torch.tensor(float(probs.shape[1]))))


def negative_learning(logits: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample negative-learning loss ``-log(1 - p[y'])`` for one complementary label ``y' != label``
    drawn uniformly per sample (Kim et al., ICCV 2019): it only says which class the sample is *not*."""
    c = logits.shape[1]
    shift = torch.randint(1, c, labels.shape, generator=g).to(labels.device)
    comp = (labels + shift) % c
    p = F.softmax(logits, 1).gather(1, comp.unsqueeze(1)).squeeze(1)
    return -torch.log((1 - p).clamp(1e-5, 1.0))


@dataclass
class PLUEOptions:
    K: int = 10                   # neighbours whose bank predictions are averaged (soft kNN vote)
    temporal_length: int = 5      # epochs of pseudo-labels remembered per sample (the temporal queue)
    queue_size: int = 16384       # MoCo key queue (capped at the target size)
    temperature: float = 0.07     # InfoNCE temperature
    momentum_ema: float = 0.999   # momentum (key) model
    negative: bool = True         # negative learning (False: CE on the refined pseudo-label)
    reweight: bool = True         # weight the classification loss by exp(-H(refined) / log C)
    contrastive: bool = True      # the InfoNCE term with temporally consistent negatives
    anchor: float = 0.0           # CE to the unadapted model's confident half (SFDAMethod.anchor_loss); 0:
    #                               published, and dfkt's default (measured: see the docstring)
    backbone_lr: float = 1.0      # published: one lr for the whole network (see the docstring)
    head_lr: float = 1.0
    dropout: bool = False         # keep dropout on while adapting (see SFDAMethod)
    momentum: float = 0.0         # published: plain SGD
    nesterov: bool = False


@register("plue", task="sfda", family="self-training")
class PLUE(BankMethod):
    """PLUE (Litrico et al., CVPR 2023): entropy-weighted kNN-vote pseudo-labels, negative learning, temporal MoCo.

    Pseudo-label guidance by uncertainty estimation: the kNN vote's entropy weights a negative-learning loss;
    MoCo keeps samples that shared a pseudo-label in recent epochs out of each other's negatives; + diversity.

    Each step: the learner's weak view votes with its K=10 cosine neighbours in a bank of the whole target
    (mean of their bank probabilities: the refined prediction, argmax = pseudo-label); its entropy gives the
    weight exp(-H / log C). The strong view is trained with negative learning (a random class other than
    the pseudo-label must get a low probability; wrong labels hurt less than with CE), an InfoNCE loss
    against the momentum model's key of a second view, and the diversity term sum p̄ log p̄ of both views.
    A queued key is no negative of a query if the two samples had the same pseudo-label in any of the
    last 5 epochs (``temporal_length``; the temporal queue that keeps likely same-class pairs apart
    from the negatives). The bank rows of the batch take the learner's weak-view features and probabilities.

    Published settings as a rule (official code, VisDA-C): SGD without momentum, lr 0.01 for every
    parameter (backbone, bottleneck and head alike), weight decay 5e-4, constant lr, batch 64, K 10,
    T 0.07, m 0.999, queue 16384, temporal length 5, loss weights 1. The backbone lr is x1, as published:
    the SFDAMethod size rule exists for methods published with x0.1 on ImageNet backbones; x1 is also
    what it gives a from-scratch network. Measured on sfda-shifts dev, seed 0 (source-only / shot / plue):
    motion_blur@4 64.6 / 83.5 / 80.8, zigzag@4 62.9 / 72.0 / 77.7, uci->mnist 51.2 / 68.9 / 68.1; lr 3e-3,
    lr 1e-3 or backbone x0.1 instead: 82.0 / 81.0 / 82.3, 78.6 / 77.3 / 76.7, 65.1 / 61.6 / 65.3: no reason
    to leave the published lr. At that lr (defaults), the other dev tasks: gaussian_noise@5 94.5 (source
    90.6), contrast@3 87.9 (16.5), rotate@4 72.4 (69.9), scale@4 89.7 (63.6), invert 33.4 (20.8), mnist->uci
    91.4 (77.4), shapes->contrast@3 87.9 (51.2), shapes->gaussian_noise@4 95.8 (83.0); the
    guard never fired. MISSES the floor on shapes->rotate@3: 76.0 against source-only 78.6. The cause, measured
    on the seed-0 source: the bilinear rotation at 28 px rounds the shapes' corners, and the source reads
    four classes confidently as their neighbours (square -> disk, square outline -> ring, triangle outline
    -> square outline, plus -> star: 302 of its 429 errors); plue's own pseudo-labels inherit these
    confident mistakes, and no method gains more than 3 points on this task. SHOT's ``anchor`` (0.3, which
    fixed the same kind of drift for aad) does not fix it and is
    not the default: on the dev half, 3 seeds, dev mean 80.65 -> 79.70, rotate@3 misses 2 -> 1 (seed 0:
    77.0 vs 78.55), mnist->invert 46.7 -> 30.9 (the AdaBN source's confident half is mostly wrong there),
    mnist->uci 88.9 -> 92.4. Differences, stated: 15 epochs
    (official: 100 on VisDA-C, 1000 on DomainNet-126; the benchmark's budget, as adacontrast); the bank is
    kept by sample index and refreshed from the epoch's evaluation pass (official: a FIFO, rebuilt by an
    eval pass every epoch); remembered labels start empty (official: random); the weak view is the image
    itself and the two strong views are ``weak_augment``'s affine views (official: MoCo-v2 crops / colour
    jitter / blur), which do not feed BatchNorm's running statistics, for the reason adacontrast gives
    (blur + noise + cutout views of low-contrast digits start near uniform). Dropout is off while adapting
    (SFDAMethod).
    """

    Options = PLUEOptions
    defaults = {"epochs": 15, "lr": 1e-2, "batch_size": 64, "weight_decay": 5e-4}   # epochs: SFDAMethod rule
    #   (dev mean at epoch 5 / 8 / 10 / 15: 79.39 / 79.59 / 80.14 / 80.65, still rising)

    def setup_extra(self) -> None:
        o, ctx = self.opts, self.ctx
        check_target_size(ctx, o.K, "plue")
        super().setup_extra()
        self.sched = self.track("sched", torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0))
        # the queue's label row is the key's sample index (its remembered labels are looked up at use)
        self.moco = MomentumKeys(self, o.queue_size, 1, o.momentum_ema, self.fea_bank.shape[1], torch.long)
        self.memory = self.track("memory", torch.full((len(ctx.target), o.temporal_length), -1,
                                                      dtype=torch.long, device=ctx.device))

    def epoch_begin(self, epoch: int) -> None:
        if epoch > 0:                       # the banks take the epoch's evaluation pass (as the official code)
            out = self.target_outputs()
            self.fea_bank.copy_(F.normalize(out["features"], dim=1))
            self.score_bank.copy_(F.softmax(out["logits"], 1))
        super().epoch_begin(epoch)          # (an approximate index is rebuilt from the new rows)

    def train_mode(self) -> None:
        super().train_mode()
        self.moco.sync_modes()

    @torch.no_grad()
    def refine(self, feats: torch.Tensor) -> torch.Tensor:
        """The refined prediction: mean bank probability of the K nearest bank rows (cosine)."""
        return self.knn_vote(feats, self.opts.K)

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o, ctx = self.opts, self.ctx
        head = ctx.parts.head
        xq, xk = weak_augment(batch.x, ctx.rng), weak_augment(batch.x, ctx.rng)
        with ctx.autocast():
            lw, fw = forward_with_features(self.net, head, batch.x)              # weak view (trained: diversity)
        lw = lw.float()
        refined = self.refine(fw.detach())
        pl = refined.argmax(1)
        slot = ctx.epoch % o.temporal_length
        self.memory[all_gather_cat(batch.idx), slot] = all_gather_cat(pl)
        with ctx.autocast(), frozen_bn_stats(ctx.learner):
            lq, fq = forward_with_features(self.net, head, xq)
        lq = lq.float()
        w = uncertainty_weight(refined) if o.reweight else torch.ones_like(refined[:, 0])
        cls = negative_learning(lq, pl, ctx.rng) if o.negative else F.cross_entropy(lq, pl, reduction="none")
        cls = (w * cls).mean()
        div = -(marginal_entropy(lw) + marginal_entropy(lq))
        loss = cls + div
        terms = {"cls": cls.detach(), "div": div.detach(), "weight": w.mean()}
        loss = self.add_anchor(loss, terms, lw, batch.idx)    # on the weak view (off by default)
        k = self.moco.keys(xk)
        if o.contrastive:
            q = F.normalize(fq.float(), dim=1)
            mine, theirs = self.memory[batch.idx], self.memory[self.moco.labels()[:, 0]]
            same = ((mine.unsqueeze(1) == theirs.unsqueeze(0)) & (mine.unsqueeze(1) >= 0)).any(2)
            ins = F.cross_entropy(self.moco.instance_logits(q, k, o.temperature, same), torch.zeros_like(pl))
            loss = loss + ins
            terms["ins"] = ins.detach()
        terms["loss"] = loss.detach()
        ctx.optimize(loss, self.optimizer, terms)
        self.step_schedule()
        with torch.no_grad():
            self.moco.push(k, batch.idx.unsqueeze(1))
            self.moco.update()
            self.write_bank(batch.idx, fw, F.softmax(lw, 1))
        return terms
