"""The online test-time adaptation method protocol, on the core's Method and loop.

A test stream (:class:`~dfkt.online.stream.StreamPlan`, the context's ``target``) is played as the
loop's epochs: one epoch = one chunk of batches. For every batch, :meth:`TTAMethod.step` runs

1. ``forward(x)`` -> :class:`Output`: the logits that are scored (and whatever the update needs),
2. records ``argmax`` of those logits as the batch's predictions (**before** any update on it),
3. ``adapt(x, out)``: the update on the batch (optimiser steps, teachers, memory banks...).

So a prediction never depends on an update made on its own batch. The predictions are a tracked
tensor, so checkpoints taken between chunks resume a stream in the middle exactly; a chunk that
starts a segment of the ``reset`` protocol restores the source model (:meth:`TTAMethod.reset`).
Labels never reach a method: :func:`dfkt.tta` scores the predictions afterwards.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..core.method import Batch, Method
from ..errors import ConfigError
from .common import has_batchnorm, use_batch_statistics


@dataclass
class Output:
    """What ``forward`` returns: the logits to score and anything ``adapt`` reuses."""

    logits: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class TTAMethod(Method):
    """Base of the online methods (see the module docstring).

    Class settings: ``batch_stats`` -- BatchNorm layers normalise with test-batch statistics, so a
    model with BatchNorm needs >= 2 samples per batch (BN-free models, e.g. GroupNorm/LayerNorm, take
    any batch size); ``adapts`` -- False for the methods whose state never changes (source, bn).
    Subclasses implement :meth:`configure` (once: modes, hooks, persistent copies),
    :meth:`init_state` (optimisers, teachers, statistics; called again by :meth:`reset`),
    :meth:`forward` and :meth:`adapt`.
    """

    task = "tta"
    defaults = {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}
    batch_stats: ClassVar[bool] = True
    adapts: ClassVar[bool] = True

    def __init__(self, ctx, opts, source_data=None):
        super().__init__(ctx, opts)
        self.source_data = source_data     # optional clean source samples (EATA's Fisher regulariser)

    # -- the loop's protocol ------------------------------------------------------------------------
    def setup(self) -> None:
        ctx = self.ctx
        self.plan = ctx.target
        self.check_batch_size()
        self.configure()
        self.source_state = {k: v.detach().clone() for k, v in ctx.learner.state_dict().items()}
        self.predictions = self.track("predictions", torch.full((self.plan.num_samples,), -1, dtype=torch.long,
                                                                device=ctx.device))
        self.init_state()

    def check_batch_size(self) -> None:
        if self.batch_stats and has_batchnorm(self.ctx.learner) and self.plan.min_batch < 2:
            raise ConfigError(
                f"method {self.name!r} normalises the model's BatchNorm layers with test-batch statistics, which "
                f"needs at least 2 samples per batch; got a batch of {self.plan.min_batch} (batch_size="
                f"{self.plan.batch_size}; a segment of one sample also makes one). Use batch_size >= 2 "
                f"(published settings: 64-200), a model without BatchNorm (GroupNorm/LayerNorm), or a method that "
                f"works one sample at a time: source, rotta.")

    def epoch_begin(self, epoch: int) -> None:
        chunk = self.plan.chunks[epoch]
        self.ctx.steps_per_epoch = chunk.num_batches
        if chunk.reset:
            self.reset()

    def batches(self) -> Iterator[Batch]:
        chunk = self.plan.chunks[self.ctx.epoch]
        self.set_modes()
        for b in range(chunk.first, chunk.last):
            start, end = self.plan.batches[b]
            yield Batch(self.plan.fetch(b, self.ctx.device), torch.arange(start, end, device=self.ctx.device))

    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.ctx.autocast():
            out = self.forward(batch.x)
        self.predictions[batch.idx] = out.logits.detach().argmax(1)   # scored now, before any update
        if not self.adapts:
            return {}
        return self.adapt(batch.x, out)

    # -- to implement -------------------------------------------------------------------------------
    def configure(self) -> None:
        """One-time set-up of the learner (and persistent copies): which parameters train, hooks."""
        self.ctx.learner.requires_grad_(False)

    def set_modes(self) -> None:
        """Module modes for adaptation (re-applied at every chunk, since evaluation may change them)."""
        use_batch_statistics(self.ctx.learner)

    def init_state(self) -> None:
        """(Re)build optimisers, teachers and running statistics from the current learner."""

    def forward(self, x: torch.Tensor) -> Output:
        with torch.no_grad():
            return Output(self.ctx.learner(x))

    def adapt(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        return {}

    # -- helpers ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source model: learner weights and statistics, then fresh optimiser/teacher state."""
        self.ctx.learner.load_state_dict(self.source_state)
        self.init_state()

    def finish(self) -> None:
        """Called once after the stream (remove hooks etc.)."""

    def optimizer(self, params: list[nn.Parameter], kind: str = "adam", momentum: float = 0.9) -> torch.optim.Optimizer:
        """Adam(lr, betas (0.9, 0.999)) or SGD(lr, momentum) on ``params`` with train.lr / weight_decay, tracked."""
        tc = self.ctx.train
        if kind == "adam":
            opt = torch.optim.Adam(params, lr=tc.lr, betas=(0.9, 0.999), weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=tc.lr, momentum=momentum, weight_decay=tc.weight_decay)
        return self.track("opt", opt)

    def frozen_copy(self, name: str) -> nn.Module:
        """A tracked copy of the learner without gradients (a teacher or anchor)."""
        m = copy.deepcopy(self.ctx.learner)
        for p in m.parameters():
            p.requires_grad_(False)
        return self.track(name, m)

    def scalar(self, name: str, value: float = 0.0) -> torch.Tensor:
        """A tracked 0-dim tensor on the device (running values that must survive a resume)."""
        return self.track(name, torch.tensor(float(value), device=self.ctx.device))

    def vector(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.track(name, value.to(self.ctx.device).clone())


def check_unit(where: str, **values: float) -> None:
    """ConfigError unless every value lies in [0, 1]."""
    for k, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{where}: {k} must lie in [0, 1], got {v}.")


def check_positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if not v > 0:
            raise ConfigError(f"{where}: {k} must be > 0, got {v}.")
