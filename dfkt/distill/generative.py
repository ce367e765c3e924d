"""Synthesizers with a generator network: :class:`GeneratorSynthesizer` (one generator trained through the
run: DAFL, DFAD, RDSKD, ZSKT, DFQ) and :class:`LatentSynthesizer` (a generator used as an image prior and
re-optimised with its latent codes for every batch, from scratch (CMI) or from a meta-learned
initialisation (Fast))."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ..core import distributed as dist
from ..errors import ConfigError
from .generators import Generator, sample_z
from .student import DistillOptions
from .synthesis import SynthEnv, Tracked, objective_hook


@dataclass
class GeneratorOptions(DistillOptions):
    """A generator-based synthesizer's options."""

    nz: int = 100                        # latent size
    ngf: Optional[int] = None            # generator width (default: sized to the input, see generators.py)
    g_out: Literal["bn", "tanh", "affine"] = "bn"
    g_lr: float = 1e-3                   # generator Adam lr
    g_steps: int = 1                     # generator steps per iteration
    g_schedule: bool = False             # the generator lr follows the student's schedule (DFAD decays both)

    def validate(self) -> None:
        super().validate()
        if self.g_steps < 1:
            raise ConfigError(f"g_steps must be >= 1, got {self.g_steps}")
        if self.g_lr <= 0:
            raise ConfigError(f"g_lr must be > 0, got {self.g_lr}")


class _GeneratorBase(Tracked):
    store = None

    def __init__(self, objective: Any, conditional: bool = False, draw_labels: bool = False):
        self.objective, self.conditional = objective, conditional
        self.draw_labels = conditional or draw_labels    # labels for the objective (and the embedding)

    def setup(self, env: SynthEnv) -> None:
        self.env = env
        objective_hook(self.objective, "setup", env)
        if hasattr(self.objective, "state_dict"):
            self.track("objective", self.objective)

    def new_generator(self) -> Generator:
        o, ctx = self.env.opts, self.env.ctx
        k = ctx.num_classes if self.conditional else 0
        return Generator(ctx.input_shape, nz=o.nz, ngf=o.ngf, out=o.g_out, num_classes=k).to(ctx.device)

    def z(self, n: int | None = None) -> torch.Tensor:
        """This rank's part of a global batch of latent codes (the same draw as one process would make)."""
        n = n or self.env.batch
        return dist.shard(sample_z(n * dist.world_size(), self.env.opts.nz, self.env.device, self.env.rng))

    def labels(self, n: int | None = None) -> torch.Tensor | None:
        return self.env.labels(n or self.env.batch) if self.draw_labels else None

    @torch.no_grad()
    def generator_images(self, generator: Generator, n: int) -> torch.Tensor:
        g = copy.deepcopy(generator).train()   # batch statistics, without touching the running ones
        y = self.labels(n)
        return torch.cat([g(self.z(min(256, n - i)), None if y is None else y[i:i + 256])
                          for i in range(0, n, 256)])[:n]


class GeneratorSynthesizer(_GeneratorBase):
    """A generator trained against ``objective`` for ``g_steps`` steps per synthesized batch (fresh latent
    codes each step; with ``conditional`` a class embedding scales z and the labels are drawn once per
    batch). ``resample``: each student step gets a fresh generator batch (DFAD, DFQ) unless there is a pool."""

    def __init__(self, objective: Any, conditional: bool = False, resample: bool = False):
        super().__init__(objective, conditional)
        self.resample = resample

    def setup(self, env: SynthEnv) -> None:
        super().setup(env)
        self.generator = self.track("generator", self.new_generator())
        # trained through DDP under torchrun: global gradients and BatchNorm statistics
        self.gen = env.ctx.ddp(self.generator)
        self.g_opt = self.track("generator_opt", torch.optim.Adam(self.generator.parameters(), lr=env.opts.g_lr,
                                                                  betas=(0.5, 0.999)))

    def synthesize(self):
        env, o = self.env, self.env.opts
        self.generator.train()
        y = self.labels()
        for _ in range(o.g_steps):
            z = self.z()
            x = self.gen(z, y)
            with env.ctx.autocast():
                t_logits, loss, terms = self.objective(env, x, z, y)
            if o.g_schedule:
                for g in self.g_opt.param_groups:
                    g["lr"] = o.g_lr * env.lr_factor(env.progress(), warmup=False)
            ok = env.optimize(loss, self.g_opt, terms)
            objective_hook(self.objective, "after_step", ok)
            env.discard_student_grads()        # gradients reaching the (frozen) student are dropped
        objective_hook(self.objective, "end")
        return x.detach(), t_logits.detach().float(), terms

    @torch.no_grad()
    def sample(self, n: int):
        if not self.resample:
            return None
        y = self.labels()
        x = self.gen(self.z(), y)
        return x, self.env.teacher(x)

    def images(self, n: int) -> torch.Tensor:
        return self.generator_images(self.generator, n)


class _MetaAccumulating:
    """Optimizer facade for the inner steps: before each (finite) inner step the copy's gradients are
    added to the meta generator's (first-order MAML), then the inner optimiser steps."""

    def __init__(self, inner: torch.optim.Optimizer, fast: torch.nn.Module, meta: torch.nn.Module):
        self.inner, self.pairs = inner, list(zip(fast.parameters(), meta.parameters()))

    @property
    def param_groups(self):
        return self.inner.param_groups

    def step(self) -> None:
        for pf, pm in self.pairs:
            if pf.grad is not None:
                pm.grad = pf.grad.detach().clone() if pm.grad is None else pm.grad + pf.grad.detach()
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)


class LatentSynthesizer(_GeneratorBase):
    """Per batch: a generator (``init='scratch'``: new; ``'meta'``: a copy of the meta generator, its first
    layer re-initialised with ``reset_l0``) and balanced labels (the generator sees them with ``conditional``); the copy and its latent codes are optimised
    for ``g_steps`` Adam steps (codes at ``z_lr``, default ``g_lr``), then the batch is drawn from it.
    ``'meta'`` then takes a first-order meta step with the inner steps' gradients (Fast)."""

    def __init__(self, objective: Any, init: Literal["scratch", "meta"] = "scratch", conditional: bool = True):
        super().__init__(objective, conditional, draw_labels=True)
        self.init = init

    def setup(self, env: SynthEnv) -> None:
        super().setup(env)
        if self.init == "meta":
            self.generator = self.track("generator", self.new_generator())
            self.g_opt = self.track("generator_opt", torch.optim.Adam(self.generator.parameters(),
                                                                      lr=env.opts.g_lr, betas=(0.5, 0.999)))

    def synthesize(self):
        env, o = self.env, self.env.opts
        if self.init == "meta":
            gen = copy.deepcopy(self.generator).train()
            if getattr(o, "reset_l0", False):
                gen.reset_first_layer()
        else:
            gen = self.new_generator().train()
        z = self.z().requires_grad_()
        y = self.labels()
        z_lr = getattr(o, "z_lr", None) or o.g_lr
        opt: Any = torch.optim.Adam([{"params": gen.parameters()}, {"params": [z], "lr": z_lr}], lr=o.g_lr,
                                    betas=(0.5, 0.999))
        if self.init == "meta":
            opt = _MetaAccumulating(opt, gen, self.generator)
            self.g_opt.zero_grad(set_to_none=True)
        for _ in range(o.g_steps):
            x = gen(z, y)
            with env.ctx.autocast():
                t_logits, loss, terms = self.objective(env, x, z, y)
            ok = env.optimize(loss, opt, terms)
            objective_hook(self.objective, "after_step", ok)
            env.discard_student_grads()
        if self.init == "meta":
            self.g_opt.step()                      # meta step with the accumulated inner gradients
            self.g_opt.zero_grad(set_to_none=True)
        objective_hook(self.objective, "end")
        with torch.no_grad():                      # the last inner step improved the batch: use it
            x = gen(z, y)
            t_logits = env.teacher(x).float()
        return x, t_logits, terms

    def sample(self, n: int):
        return None

    def images(self, n: int) -> torch.Tensor | None:
        return self.generator_images(self.generator, n) if self.init == "meta" else None
