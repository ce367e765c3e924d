"""Distillation on real target images: the transfer stage of every compress recipe.

A core :class:`~dfkt.core.method.Method` whose reconstructor is the unlabeled target set (the SFDA
side: real images, sample indices) and whose transfer is DFKD's KD loss (the teacher's predictions,
computed once on the clean target images), plus optional self-training terms of the student's own:

* ``augment``: the student sees a randomly shifted ('shift') or affine-warped ('affine') view of each image,
  the teacher's target stays that of the clean image;
* ``im``: information maximisation on the student's predictions (confident, balanced; SHOT's IM loss);
* ``refine``: CE to labels re-clustered each epoch in the *student's* feature space (SHOT's clustering,
  centroids weighted by the mean of the teacher's and the student's probabilities), from ``refine_start``
  (a fraction of the run) on, when the student's features have formed.

The student is trained whole (it has no source training to keep), SGD with a cosine lr, a short warm-up
and gradient-norm clipping, as DFKD's students are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from ..core.evaluate import predict
from ..core.losses import information_maximization, kd_kl, pseudo_label_ce
from ..core.method import Batch, Method
from ..errors import ConfigError
from ..sfda.common import clustering_pseudo_labels, random_affine, set_bn_train_only


@dataclass
class TargetKDOptions:
    """The student stage's options (train settings: ``epochs``, ``lr``, ``batch_size``, ``weight_decay``)."""

    temperature: float = 1.0      # KD temperature
    augment: Literal["none", "shift", "affine"] = "none"   # the student's view of each image (the teacher's
    #                               target is the clean image's): 'shift' = random translations of up to 8 %,
    #                               'affine' = rotation/scale/shear/translation (dfkt.sfda.common.random_affine)
    im: float = 0.0               # weight of the student's information maximisation (0 = off)
    refine: float = 0.0           # weight of the CE to the re-clustered labels (0 = off)
    refine_start: float = 0.5     # fraction of the epochs before the re-clustered labels / bootstrap start
    bootstrap: float = 0.0        # from refine_start on, the KD target is (1 - b) teacher + b student (its own
    #                               clean-image predictions of the epoch's start; 0 = the teacher alone)
    momentum: float = 0.9
    warmup: float = 0.05          # linear lr warm-up over this fraction of the steps
    grad_clip: float = 1.0        # clip the student's gradient norm (0 = off)

    def validate(self, where: str = "student options") -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.bootstrap < 1.0:
            raise ConfigError(f"{where}.bootstrap is a weight in [0, 1), got {self.bootstrap}.")
        for k in ("im", "refine", "grad_clip"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{where}.{k} must be >= 0 (0 = off), got {getattr(self, k)}.")
        for k in ("refine_start", "warmup"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"{where}.{k} is a fraction of the run in [0, 1), got {getattr(self, k)}.")


class TargetKD(Method):
    """Distil ``ctx.teacher`` into ``ctx.learner`` on the target images (``ctx.target``)."""

    name = "target-kd"
    task = "compress"
    Options = TargetKDOptions
    defaults = {"epochs": 30, "lr": 0.05, "batch_size": 64, "weight_decay": 5e-4}

    def setup(self) -> None:
        ctx = self.ctx
        view = getattr(ctx.target, "eval_view", None)
        self.view = ctx.target if view is None else view
        # the teacher's predictions on the clean target images, once (it is frozen)
        self.teacher_logits = predict(ctx.teacher, self.view, ctx.device)["logits"]
        # the KD targets (logits): the teacher's, or with `bootstrap` mixed with the student's own predictions
        self.targets = self.track("targets", self.teacher_logits.clone())
        self.loader = ctx.loader(ctx.target, shuffle=True, drop_last=False)
        ctx.steps_per_epoch = len(self.loader)
        self.net = ctx.ddp(ctx.learner)
        params = [p for p in ctx.learner.parameters() if p.requires_grad]
        self.optimizer = self.track("opt", torch.optim.SGD(params, lr=ctx.train.lr, momentum=self.opts.momentum,
                                                           weight_decay=ctx.train.weight_decay, nesterov=True))
        total, warm = ctx.total_steps, max(1, int(self.opts.warmup * ctx.total_steps))

        def lr_at(s: int) -> float:
            if self.opts.warmup > 0 and s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

        self.sched = self.track("sched", torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at))
        self.refined = self.track("refined", torch.full((len(ctx.target),), -1, dtype=torch.long, device=ctx.device))

    def epoch_begin(self, epoch: int) -> None:
        o, ctx = self.opts, self.ctx
        if (o.refine <= 0 and o.bootstrap <= 0) or epoch < int(o.refine_start * ctx.train.epochs):
            return
        out = predict(ctx.learner, self.view, ctx.device, features=True)
        if o.bootstrap > 0:
            t = o.temperature
            soft = ((1 - o.bootstrap) * F.softmax(self.teacher_logits / t, 1)
                    + o.bootstrap * F.softmax(out["logits"] / t, 1))
            self.targets.copy_(t * torch.log(soft + 1e-8))       # softmax(targets / t) = soft
        if o.refine > 0:
            mix = 0.5 * (F.softmax(self.teacher_logits, 1) + F.softmax(out["logits"], 1))
            self.refined.copy_(clustering_pseudo_labels(out["features"], torch.log(mix + 1e-8)))

    def batches(self) -> Iterator[Batch]:
        set_bn_train_only(self.ctx.learner)      # BatchNorm on batch statistics, dropout off
        for x, _y, idx in self.loader:
            if x.shape[0] < 2:
                continue
            yield Batch(x, idx, targets=self.targets[idx])

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        o, ctx = self.opts, self.ctx
        if o.augment == "affine":
            x = random_affine(batch.x, ctx.rng)
        elif o.augment == "shift":
            x = random_affine(batch.x, ctx.rng, degrees=0.0, translate=0.08, scale=(1.0, 1.0), shear=0.0)
        else:
            x = batch.x
        with ctx.autocast():
            logits = self.net(x)
        logits = logits.float()
        kd = kd_kl(logits, batch.targets, o.temperature)
        loss, terms = kd, {"kd": kd.detach()}
        if o.im > 0:
            im, t = information_maximization(logits)
            loss = loss + o.im * im
            terms.update(t)
        if o.refine > 0 and ctx.epoch >= int(o.refine_start * ctx.train.epochs):
            ce = pseudo_label_ce(logits, self.refined[batch.idx])
            loss = loss + o.refine * ce
            terms["refine"] = ce.detach()
        terms["loss"] = loss.detach()
        ctx.optimize(loss, self.optimizer, terms, max_norm=o.grad_clip or None)
        self.sched.step()
        return terms
