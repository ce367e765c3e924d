"""Pixel optimisation: :class:`PixelSynthesizer` optimises the inputs themselves against an objective
(DeepInversion's BN statistics, Lopes' recorded activation statistics)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..core.buffers import RingBuffer
from .synthesis import SynthEnv, Tracked, objective_hook


class PixelAdam:
    """Adam on rows of a pixel tensor with per-row state (rows not being optimised keep theirs)."""

    def __init__(self, shape: tuple, device, lr: float, betas=(0.5, 0.99), eps: float = 1e-8):
        self.m = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], device=device)
        self.lr, self.betas, self.eps = lr, betas, eps

    def step(self, x: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m = self.m[idx].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.v[idx].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.t[idx] + 1
        self.m[idx], self.v[idx], self.t[idx] = m, v, t
        shape = (-1,) + (1,) * (x.dim() - 1)
        mhat = m / (1 - b1 ** t).view(shape)
        vhat = v / (1 - b2 ** t).view(shape)
        return x - self.lr * mhat / (vhat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"m": self.m.cpu(), "v": self.v.cpu(), "t": self.t.cpu()}

    def load_state_dict(self, st: dict) -> None:
        self.m.copy_(st["m"])
        self.v.copy_(st["v"])
        self.t.copy_(st["t"])


class PixelSynthesizer(Tracked):
    """Inputs optimised by Adam (``inv_lr``, ``inv_steps`` per batch, from N(0, ``init_std``) noise) against
    ``objective(env, x, None, y)``; the objective's ``labels(n)`` gives each batch's target labels.

    ``cosine``: the lr follows a cosine over the inner steps (DeepInversion). ``persistent = N > 0``: a
    persistent store of N images optimised round-robin, ``inv_steps`` steps of per-image Adam on the next
    batch of it per iteration; the student draws from the whole store (synthesis cost spread over the run).
    """

    def __init__(self, objective: Any, cosine: bool = False, persistent: int = 0):
        self.objective, self.cosine, self.persistent = objective, cosine, persistent
        self.store: RingBuffer | None = None

    def setup(self, env: SynthEnv) -> None:
        self.env = env
        o, ctx = env.opts, env.ctx
        objective_hook(self.objective, "setup", env)
        if hasattr(self.objective, "state_dict"):
            self.track("objective", self.objective)
        if self.persistent:
            n = max(self.persistent, env.batch)
            self.store = self.track("pixels", RingBuffer(n, {"x": ctx.input_shape, "y": (), "logits": (ctx.num_classes,)},
                                                         ctx.device, dtypes={"y": torch.long}, save_all=True))
            self.store.data["x"].copy_(torch.randn((n, *ctx.input_shape), generator=ctx.rng).to(ctx.device)
                                       * o.init_std)
            self.store.data["y"].copy_(self.objective.labels(n))
            self.adam = self.track("pixel_adam", PixelAdam((n, *ctx.input_shape), ctx.device, o.inv_lr))

    def synthesize(self):
        if self.store is not None:
            return self._persistent_step()
        env, o, ctx = self.env, self.env.opts, self.env.ctx
        y = self.objective.labels(env.batch)
        x = (torch.randn((env.batch, *ctx.input_shape), generator=ctx.rng) * o.init_std).to(ctx.device)
        x.requires_grad_()
        opt = torch.optim.Adam([x], lr=o.inv_lr, betas=(0.5, 0.99))
        for i in range(o.inv_steps):
            if self.cosine:                    # DeepInversion's cosine lr over the inner steps
                for g in opt.param_groups:
                    g["lr"] = o.inv_lr * 0.5 * (1 + math.cos(math.pi * i / o.inv_steps))
            _, loss, terms = self.objective(env, x, None, y)
            env.optimize(loss, opt, terms)
        objective_hook(self.objective, "end")
        x = x.detach()
        with torch.no_grad():
            t = env.teacher(x).float()
        return x, t, terms

    def _persistent_step(self):
        env, o, store = self.env, self.env.opts, self.store
        idx = store.slots(env.batch)
        x, y = store.data["x"][idx], store.data["y"][idx]
        for _ in range(o.inv_steps):
            x = x.detach().requires_grad_()
            _, loss, terms = self.objective(env, x, None, y)
            grad, = torch.autograd.grad(loss, x)
            if env.guard(torch.isfinite(loss.detach()) & torch.isfinite(grad).all(), loss, terms):
                x = self.adam.step(x.detach(), grad, idx)
        objective_hook(self.objective, "end")
        x = x.detach()
        store.data["x"][idx] = x
        with torch.no_grad():
            store.data["logits"][idx] = env.teacher(x).float()
        return x, store.data["logits"][idx], terms

    def sample(self, n: int):
        return None

    def images(self, n: int) -> torch.Tensor | None:
        return self.store.data["x"][:n].clone() if self.store is not None else None
