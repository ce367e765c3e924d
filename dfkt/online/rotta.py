"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan et al., CVPR 2023)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.losses import soft_ce
from ..core.method import ema_update
from ..registry import register
from .base import Output, TTAMethod, check_positive, check_unit
from .common import RobustBatchNorm, norm_affine_params, train_only, tta_augment


@dataclass
class RoTTAOptions:
    memory_size: int = 64          # capacity of the category-balanced memory bank
    update_frequency: int = 64     # one update every this many test samples (whatever the batch size)
    nu: float = 0.001              # teacher <- (1 - nu) teacher + nu student
    alpha: float = 0.05            # robust BatchNorm momentum
    lambda_t: float = 1.0          # weight of the age in the eviction score
    lambda_u: float = 1.0          # weight of the uncertainty in the eviction score

    def validate(self) -> None:
        check_positive("rotta options", memory_size=self.memory_size, update_frequency=self.update_frequency)
        check_unit("rotta options", nu=self.nu, alpha=self.alpha)


class MemoryBank:
    """RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU).

    Each class holds at most ``capacity / num_classes`` samples while the bank is full; a new sample
    (labelled with the teacher's prediction) evicts, from its class or else from the fullest classes,
    the item with the highest score ``lambda_t * sigmoid(age / capacity) + lambda_u * entropy / ln C``
    when that score beats the new sample's; every insertion ages all items by one.
    """

    def __init__(self, capacity: int, num_classes: int, lambda_t: float, lambda_u: float,
                 device: torch.device | None = None):
        self.capacity, self.num_classes, self.device = capacity, num_classes, device
        self.per_class = capacity / num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.items: list[list[list]] = [[] for _ in range(num_classes)]   # [data, uncertainty, age]

    def score(self, age: float, uncertainty: float) -> float:
        return (self.lambda_t / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def __len__(self) -> int:
        return sum(len(c) for c in self.items)

    def add(self, x: torch.Tensor, label: int, uncertainty: float) -> None:
        if self._make_room(label, self.score(0, uncertainty)):
            self.items[label].append([x, uncertainty, 0])
        for cls in self.items:
            for it in cls:
                it[2] += 1

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.items[label]) < self.per_class:
            if len(self) < self.capacity:
                return True
            counts = [len(c) for c in self.items]
            classes = [c for c, n in enumerate(counts) if n == max(counts)]
        else:
            classes = [label]
        best = None
        for c in classes:
            for i, (_x, u, age) in enumerate(self.items[c]):
                s = self.score(age, u)
                if best is None or s >= best[0]:
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] > new_score:
            self.items[best[1]].pop(best[2])
            return True
        return False

    def batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All stored samples and their ages / capacity, class by class (None when empty)."""
        flat = [it for cls in self.items for it in cls]
        if not flat:
            return None
        x = torch.stack([it[0] for it in flat])
        ages = torch.tensor([it[2] / self.capacity for it in flat], device=x.device)
        return x, ages

    def state_dict(self) -> dict:
        flat = [(c, it) for c, cls in enumerate(self.items) for it in cls]
        return {"classes": [c for c, _ in flat], "uncertainty": [it[1] for _, it in flat],
                "age": [it[2] for _, it in flat],
                "data": torch.stack([it[0].detach().cpu() for _, it in flat]) if flat else None}

    def load_state_dict(self, state: dict) -> None:
        self.items = [[] for _ in range(self.num_classes)]
        for k, c in enumerate(state["classes"]):
            x = state["data"][k]
            self.items[c].append([x.to(self.device) if self.device is not None else x, state["uncertainty"][k],
                                  state["age"][k]])


@register("rotta", task="tta", family="online")
class RoTTA(TTAMethod):
    """RoTTA (Yuan et al., CVPR 2023): robust BN, a category-balanced memory bank and a timeliness-weighted mean teacher.

    Rules (published settings, CIFAR-10-C, batch 64): BatchNorm becomes robust BN (running statistics
    moved towards the batch's by alpha = 0.05 and then used to normalise; the teacher predicts with
    them frozen); the teacher's predictions fill a 64-sample category-balanced memory bank (eviction
    by age and entropy, lambda_t = lambda_u = 1); every 64 test samples, whatever the batch size, the
    student (normalisation layers' scale/shift, Adam lr 1e-3) learns the teacher's soft predictions
    on the bank from strongly augmented views, each weighted by exp(-a)/(1+exp(-a)) of its age a
    (in bank capacities), and the teacher follows by EMA with nu = 0.001. Works at batch size 1.
    """

    Options = RoTTAOptions
    batch_stats = False

    def configure(self) -> None:
        learner = self.ctx.learner
        self.params = train_only(learner, norm_affine_params(learner, self.name))
        self.teacher = self.frozen_copy("teacher")             # made before the hooks, kept across resets
        self.rbn = [RobustBatchNorm(m, self.opts.alpha) for m in (learner, self.teacher)]
        self._robust_update(False)

    def _robust_update(self, on: bool) -> None:
        for r in self.rbn:
            r.update = on

    def set_modes(self) -> None:
        self.ctx.learner.eval()
        self.teacher.eval()

    def init_state(self) -> None:
        self.teacher.load_state_dict(self.ctx.learner.state_dict())
        self.opt = self.optimizer(self.params)
        o = self.opts
        self.bank = self.track("bank", MemoryBank(o.memory_size, self.ctx.num_classes, o.lambda_t, o.lambda_u,
                                                  self.ctx.device))
        self.seen = self.scalar("seen", 0.0)

    def model(self) -> nn.Module:
        return self.teacher

    def finish(self) -> None:
        for r in self.rbn:
            r.remove()

    def forward(self, x: torch.Tensor) -> Output:
        with torch.no_grad():
            return Output(self.teacher(x).float())

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        p = torch.softmax(out.logits, 1)
        ent = -(p * torch.log(p + 1e-6)).sum(1)
        labels, uncert = p.argmax(1).tolist(), ent.tolist()      # one host sync per batch
        seen = int(self.seen.item())
        terms: dict[str, torch.Tensor] = {}
        for i in range(x.shape[0]):
            self.bank.add(x[i].detach(), labels[i], uncert[i])
            seen += 1
            if seen % self.opts.update_frequency == 0:
                terms = self.update()
        self.seen.fill_(float(seen))
        return terms

    def update(self) -> dict[str, torch.Tensor]:
        got = self.bank.batch()
        if got is None:
            return {}
        data, ages = got
        self._robust_update(True)
        try:
            with torch.no_grad():
                t = self.teacher(data).float()
            s = self.ctx.learner(tta_augment(data, self.ctx.rng)).float()
        finally:
            self._robust_update(False)
        w = torch.exp(-ages) / (1 + torch.exp(-ages))
        loss = (soft_ce(s, t) * w).mean()
        self.ctx.optimize(loss, self.opt, {"ce": loss})
        ema_update(self.teacher, self.ctx.learner, 1.0 - self.opts.nu)
        return {"ce": loss.detach()}
