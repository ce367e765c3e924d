"""Momentum contrast for SFDA (AdaContrast, PLUE): a momentum copy of the learner that encodes keys, a
FIFO queue of past keys, each with a row of labels, and the InfoNCE logits with masked negatives."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..core.buffers import RingBuffer
from ..core.distributed import all_gather_cat
from ..core.hooks import frozen_bn_stats
from ..core.method import Method, ema_update, freeze
from .common import forward_with_features


class MomentumKeys:
    """The key side of MoCo (He et al., CVPR 2020) as the SFDA methods use it.

    ``model``: a frozen copy of the learner, updated by ``update`` as ``m * model + (1 - m) * learner``;
    ``queue``: a ring (``core.buffers.RingBuffer``) of the last ``queue_size`` (at most the target size)
    L2-normalised keys, each with a row of ``label_width`` values of ``label_dtype`` that the method
    defines (AdaContrast: the one-hot pseudo-label; PLUE: the key's sample index). Both are tracked by
    ``method`` (saved and restored on resume).
    """

    def __init__(self, method: Method, queue_size: int, label_width: int, momentum: float,
                 feature_dim: int, label_dtype: torch.dtype = torch.float32) -> None:
        ctx = method.ctx
        self.momentum = momentum
        self.model = method.track("ema", freeze(copy.deepcopy(ctx.learner)))
        head = next(n for n, m in ctx.learner.named_modules() if m is ctx.parts.head)
        self.head = self.model.get_submodule(head)                   # the momentum model's head
        self.queue = method.track("queue", RingBuffer(min(queue_size, len(ctx.target)),
                                                      {"key": (feature_dim,), "label": (label_width,)},
                                                      ctx.device, dtypes={"label": label_dtype}))
        self.ctx = ctx

    def sync_modes(self) -> None:
        """The momentum model takes the learner's train/eval modes (dropout off, BN on batch statistics)."""
        for m_ema, m in zip(self.model.modules(), self.ctx.learner.modules()):
            m_ema.training = m.training

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised momentum features of ``x`` (BatchNorm running statistics untouched)."""
        with self.ctx.autocast(), frozen_bn_stats(self.model):
            _, f = forward_with_features(self.model, self.head, x)
        return F.normalize(f.float(), dim=1)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum logits and features of ``x`` (BatchNorm in its current mode)."""
        with self.ctx.autocast():
            logits, f = forward_with_features(self.model, self.head, x)
        return logits.float(), f

    def instance_logits(self, q: torch.Tensor, k: torch.Tensor, temperature: float,
                        drop: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE logits [B, 1 + queue]: column 0 the positive ``q . k``, then ``q`` against the queued
        keys; ``drop`` [B, queue] (True = not a negative for that query) masks queued keys out."""
        neg = q @ self.queue.filled("key").t()
        if drop is not None:
            neg = neg.masked_fill(drop, float("-inf"))
        return torch.cat([(q * k).sum(1, keepdim=True), neg], 1) / temperature

    @torch.no_grad()
    def push(self, k: torch.Tensor, labels: torch.Tensor) -> None:
        """Queue every rank's keys with their label rows."""
        self.queue.add(key=all_gather_cat(k), label=all_gather_cat(labels))

    def labels(self) -> torch.Tensor:
        """The label rows of the queued keys, in the queue's row order (``instance_logits``' columns 1:)."""
        return self.queue.filled("label")

    @torch.no_grad()
    def update(self) -> None:
        ema_update(self.model, self.ctx.learner, self.momentum)
