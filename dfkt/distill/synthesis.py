"""The reconstruction side of DFKD: the :class:`Synthesizer` protocol, what a synthesizer works with
(:class:`SynthEnv`) and the small helpers synthesizers and their objectives share.

A synthesizer makes the transfer data: ``synthesize()`` takes its optimisation steps (a generator's,
latent codes', pixels') and returns ``(x, teacher_logits, named terms)``; the method's ``batches()`` yields
those batches to the student learner. Its *objective* is what makes one method differ from another (DAFL's
one-hot/activation/entropy terms, DFAD's L1 discrepancy, DeepInversion's BN statistics): a callable
``objective(env, x, z, y) -> (teacher_logits, loss, terms)``, optionally an object with ``setup(env)``,
``after_step(ok)`` (after each optimisation step), ``end()`` (after each synthesized batch) and
``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import distributed as dist
from ..core.buffers import RingBuffer
from ..core.context import Context
from ..core.method import Tracked  # noqa: F401  (re-exported: the synthesizers track their state with it)


@runtime_checkable
class Synthesizer(Protocol):
    """What the DFKD method needs from a reconstruction (see the module docstring)."""

    store: Optional[RingBuffer]    # replay data the synthesizer keeps itself (persistent pixels), or None

    def setup(self, env: "SynthEnv") -> None: ...

    def synthesize(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...

    def sample(self, n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh batch for one student step (DFAD/DFQ), or None: the student uses the synthesized batch."""

    def images(self, n: int) -> Optional[torch.Tensor]:
        """``n`` images for grids, or None: the method shows its replay data."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(eq=False)
class SynthEnv:
    """What a synthesizer and its objective work with: the run context, the frozen teacher, the student
    (``student`` to call, ``learner`` the module itself), the method's options and the synthesized batch size."""

    ctx: Context
    teacher: nn.Module
    student: nn.Module
    learner: nn.Module
    opts: Any
    batch: int
    method: str
    progress: Callable[[], float]                    # the student schedule's progress in [0, 1]
    lr_factor: Callable[..., float]                  # the student's lr factor at a progress
    discard_student_grads: Callable[[], None]

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def rng(self) -> torch.Generator:
        return self.ctx.rng

    def student_ready(self) -> bool:
        """False during the synthesis-only warm-up epochs (``warmup``): adversarial terms wait for a student."""
        return self.ctx.epoch >= getattr(self.opts, "warmup", 0)

    def optimize(self, loss: torch.Tensor, optimizer, terms: dict[str, torch.Tensor]) -> bool:
        """ctx.optimize for synthesis steps: the NaN guard counts them as their own stream, so good student
        steps do not reset a run of failing synthesis steps."""
        return self.ctx.optimize(loss, optimizer, terms, stream="synthesis")

    def guard(self, finite: torch.Tensor, loss: torch.Tensor, terms: dict) -> bool:
        """The NaN/inf guard for synthesis updates made by hand (not through an optimizer)."""
        return self.ctx.guard.record(bool(finite), loss, self.ctx.step, terms, stream="synthesis")

    def labels(self, n: int, num_classes: int | None = None) -> torch.Tensor:
        return balanced_labels(n, num_classes or self.ctx.num_classes, self.device, self.rng)


def objective_hook(objective: Any, name: str, *args) -> None:
    fn = getattr(objective, name, None)
    if fn is not None:
        fn(*args)


class no_param_grad:
    """Context manager: ``module``'s parameters get no gradients (inputs still do), then restore."""

    def __init__(self, *modules: nn.Module):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


class eval_mode:
    """Context manager: ``module`` in eval mode (BN running statistics untouched), then restored."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was = self.module.training
        self.module.eval()
        return self

    def __exit__(self, *exc):
        self.module.train(self.was)


def student_logits(env: SynthEnv, x: torch.Tensor) -> torch.Tensor:
    """The student's logits on ``x`` for an adversarial term: eval mode, gradients flow to ``x`` only."""
    with eval_mode(env.learner), no_param_grad(env.learner):
        return env.student(x).float()


def balanced_labels(n: int, num_classes: int, device, g: torch.Generator | None = None) -> torch.Tensor:
    """``n`` labels (this rank's part of a global batch of ``n * world_size``) covering the classes as
    evenly as possible, in random order."""
    total = n * dist.world_size()
    y = torch.arange(total) % num_classes
    return dist.shard(y[torch.randperm(total, generator=g)]).to(device)


def adversarial_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, agree_only: bool = True) -> torch.Tensor:
    """Negative per-sample KL(t || s), counted where student and teacher agree (CMI/Fast's ``adv``).

    Minimising it moves samples to where the student disagrees with the teacher, but stops pushing
    a sample once the two predictions differ (so samples stay near the decision boundary).
    """
    kl = (F.softmax(t_logits, 1) * (F.log_softmax(t_logits, 1) - F.log_softmax(s_logits, 1))).sum(1)
    if agree_only:
        kl = kl * (s_logits.argmax(1) == t_logits.argmax(1)).float()
    return -kl.mean()


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    m = (0.5 * (pa + pb)).clamp_min(1e-7).log()
    return 0.5 * (F.kl_div(m, pa, reduction="batchmean") + F.kl_div(m, pb, reduction="batchmean"))
