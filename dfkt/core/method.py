"""The method protocol: a reconstructor + a transfer loss + a schedule, driven by the one loop.

A method subclass declares its options dataclass, its training defaults, and implements ``setup``
(build optimisers / generators / memory banks), ``epoch_begin`` (refresh: re-cluster, rebuild a
pool), ``batches`` (the reconstructor: yields :class:`Batch`) and ``step`` (one optimisation step,
returning named loss terms as detached tensors). Anything registered with ``track`` is saved in and
restored from resume checkpoints.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .context import Context


@dataclass
class Batch:
    """One batch for transfer: inputs and, where relevant, sample indices and reconstructed targets."""

    x: torch.Tensor
    idx: torch.Tensor | None = None
    targets: torch.Tensor | None = None   # teacher logits (DFKD) or pseudo-labels (SFDA)
    weights: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """A method without options of its own."""


class Tracked:
    """Parts registered with ``track`` (objects with state_dict, or tensors) make up ``state_dict``: the one
    resume mechanism of methods and DFKD synthesizers/objectives."""

    def track(self, name: str, obj: Any) -> Any:
        """Register an object with ``state_dict``/``load_state_dict`` (or a tensor) for resume."""
        self.__dict__.setdefault("_tracked", {})[name] = obj
        return obj

    def state_dict(self) -> dict:
        out = {}
        for k, v in self.__dict__.get("_tracked", {}).items():
            out[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.__dict__.get("_tracked", {}).items():
            if k not in state:
                continue
            if isinstance(v, torch.Tensor):
                v.copy_(state[k].to(v.device))
            else:
                v.load_state_dict(state[k])


class Method(Tracked, abc.ABC):
    name: ClassVar[str] = "?"
    task: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[dict] = {}           # TrainConfig defaults (epochs, lr, batch_size, ...)
    needs_teacher_bn: ClassVar[bool] = False   # DFKD: BN-statistics methods
    needs_learner_bn: ClassVar[bool] = False   # SFDA: adabn / tent
    needs_index: ClassVar[bool] = False        # SFDA: memory-bank methods
    trains: ClassVar[bool] = True              # False: one-shot methods (source-only, adabn)

    def __init__(self, ctx: Context, opts: Any):
        self.ctx, self.opts = ctx, opts
        self._tracked: dict[str, Any] = {}

    # -- to implement --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build optimisers, generators, memory banks; set ``ctx.steps_per_epoch``."""

    def epoch_begin(self, epoch: int) -> None:
        """Per-epoch reconstruction refresh (re-cluster pseudo-labels, rebuild a pool...)."""

    @abc.abstractmethod
    def batches(self) -> Iterator[Batch]:
        """Yield the epoch's batches (the reconstructor)."""

    @abc.abstractmethod
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch``; returns the named loss terms (detached tensors)."""

    def model(self) -> nn.Module:
        """The trained model to evaluate and deploy."""
        return self.ctx.learner



def poly_decay(optimizer: torch.optim.Optimizer, total_steps: int, gamma: float = 10.0,
               power: float = 0.75) -> torch.optim.lr_scheduler.LambdaLR:
    """SHOT/DANN's lr schedule: lr_0 * (1 + gamma * p) ** -power with p = step / total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (1 + gamma * min(s, total_steps) / total_steps) ** -power)


def cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int, floor: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to all parameters of ``module`` (the module stays in the graph)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, buffers: bool = False) -> None:
    """Mean teacher: ``ema <- decay * ema + (1 - decay) * model`` for every parameter (one fused op);
    ``buffers=True`` also copies the model's buffers (e.g. BatchNorm statistics) into ``ema``."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    if buffers:
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)
