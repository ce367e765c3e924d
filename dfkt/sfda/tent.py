"""Tent: test-time entropy minimisation over the BatchNorm affine parameters (Wang et al., ICLR 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.hooks import BN_TYPES
from ..core.losses import entropy
from ..core.method import Batch, Method
from ..registry import register
from .common import set_bn_train_only


@dataclass
class TentOptions:
    optimizer: Literal["adam", "sgd"] = "adam"   # Tent: Adam(lr 1e-3, betas (0.9, 0.999)) on digits/CIFAR
    momentum: float = 0.9                        # sgd only
    reset_stats: bool = False                    # start BN running statistics from scratch on the target


@register("tent", task="sfda", family="self-training")
class Tent(Method):
    """Tent (Wang et al., ICLR 2021): minimise prediction entropy, updating only BatchNorm scale/shift.

    BatchNorm layers normalise with the batch statistics (train mode) and update their running
    statistics, which evaluation then uses; every other module stays in eval mode (no dropout).
    A model without BatchNorm (ViTs, ConvNeXt, GroupNorm nets) adapts the scale/shift of its
    LayerNorm / GroupNorm layers instead.
    """

    Options = TentOptions
    defaults = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}

    def setup(self) -> None:
        ctx = self.ctx
        self.loader = ctx.loader(ctx.target, shuffle=True, drop_last=False)
        ctx.steps_per_epoch = len(self.loader)
        learner = ctx.learner
        for p in learner.parameters():
            p.requires_grad_(False)
        norms = [m for m in learner.modules() if isinstance(m, BN_TYPES)]
        if not norms:   # BN-free models: LayerNorm / GroupNorm scale and shift
            norms = [m for m in learner.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
        params = []
        for m in norms:
            if self.opts.reset_stats and isinstance(m, BN_TYPES):
                m.reset_running_stats()
            params += [p for p in (m.weight, m.bias) if isinstance(p, nn.Parameter)]
        for p in params:
            p.requires_grad_(True)
        if not params:
            from ..errors import ModelError
            raise ModelError("tent updates the scale/shift of normalisation layers (BatchNorm, else LayerNorm/"
                             "GroupNorm), but the model has none with affine parameters; use a method that needs "
                             "none, e.g. 'shot' or 'shot-im'.")
        self.net = ctx.ddp(learner)
        tc = ctx.train
        if self.opts.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=tc.lr, betas=(0.9, 0.999), weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=tc.lr, momentum=self.opts.momentum, weight_decay=tc.weight_decay)
        self.optimizer = self.track("opt", opt)

    def batches(self):
        set_bn_train_only(self.ctx.learner)
        for x, _y, idx in self.loader:
            if x.shape[0] >= 2:
                yield Batch(x, idx)

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.ctx.autocast():
            logits = self.net(batch.x)
        loss = entropy(logits.float())
        self.ctx.optimize(loss, self.optimizer, {"ent": loss})
        return {"ent": loss.detach()}
