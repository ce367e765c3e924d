"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020), with ADI's competition term.

Inputs are optimised directly (no generator): the teacher's BatchNorm running statistics are
matched by the batch statistics of the synthetic inputs, the teacher must classify them as
sampled target labels (CE), and total-variation and l2 priors keep them image-like; random
jitter (roll) and optional flips are applied before each teacher forward. ``adi > 0`` adds
Adaptive DeepInversion's competition term (maximise the teacher/student Jensen-Shannon divergence).

Two schedules:
* ``pixels = 0`` (the paper's): every iteration optimises a fresh batch for ``inv_steps`` Adam
  steps, then the student trains on it (and on the data pool, if ``pool_batches > 0``);
* ``pixels = N``: a persistent pool of N optimised images; every iteration takes ``inv_steps``
  Adam steps on the next batch of it (round-robin, per-image Adam state) and the student trains
  on batches drawn from the whole pool, so synthesis cost is spread over the run. This is the
  cheapest way to reconstruct data from a BN teacher on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.hooks import BNStatsRecorder
from ..core.losses import total_variation
from ..registry import register
from ..core import distributed as dist
from .common import DistillMethod, DistillOptions, balanced_labels, eval_mode, manual_guard, no_param_grad


@dataclass
class DeepInversionOptions(DistillOptions):
    inv_steps: int = 50          # Adam steps per synthesized batch
    inv_lr: float = 0.1
    bn: float = 1.0              # BN-statistics weight
    bn_first: float = 1.0        # extra factor on the first BN layer
    ce: float = 1.0
    tv: float = 1e-3             # total variation (l1) prior
    l2: float = 0.0              # l2 prior on the inputs
    adi: float = 0.0             # ADI competition weight (0: plain DeepInversion)
    jitter: int = 2              # random roll of up to this many pixels
    flip: bool = False           # random horizontal flips (not for digits)
    pixels: int = 0              # persistent pixel pool size (0: a fresh batch per iteration)
    init_std: float = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.inv_steps < 1:
            raise ValueError(f"inv_steps must be >= 1, got {self.inv_steps}")


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    m = (0.5 * (pa + pb)).clamp_min(1e-7).log()
    return 0.5 * (F.kl_div(m, pa, reduction="batchmean") + F.kl_div(m, pb, reduction="batchmean"))


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
        self.m.copy_(st["m"]), self.v.copy_(st["v"]), self.t.copy_(st["t"])


@register("deepinversion", task="dfkd", family="inversion")
class DeepInversion(DistillMethod):
    """DeepInversion (Yin et al., CVPR 2020): optimise inputs to match the teacher's BN statistics (+ ADI)."""

    Options = DeepInversionOptions
    needs_teacher_bn = True
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def build(self) -> None:
        o, ctx = self.opts, self.ctx
        self.recorder = BNStatsRecorder(self.teacher, method=self.name)
        if o.pixels:
            n = max(o.pixels, self.synth_bs)
            self.px = self.track("pixels", torch.randn((n, *ctx.input_shape), generator=ctx.rng).to(self.device)
                                 * o.init_std)
            self.px_y = self.track("pixel_labels", balanced_labels(n, ctx.num_classes, self.device, ctx.rng))
            self.px_t = self.track("pixel_logits", torch.zeros(n, ctx.num_classes, device=self.device))
            self.px_adam = self.track("pixel_adam", PixelAdam(tuple(self.px.shape), self.device, o.inv_lr))
            self.state.update(px_head=0, px_filled=0)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.jitter:
            dx, dy = (int(v) for v in torch.randint(-o.jitter, o.jitter + 1, (2,), generator=self.ctx.rng))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if o.flip and bool(torch.rand((), generator=self.ctx.rng) < 0.5):
            x = torch.flip(x, dims=(3,))
        return x

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        o = self.opts
        xa = self.augment(x)
        with self.ctx.autocast():
            with self.recorder:
                t = self.teacher(xa).float()
            bn = self.recorder.loss(o.bn_first)
            ce = F.cross_entropy(t, y)
            loss = o.bn * bn + o.ce * ce
            terms = {"bn": bn.detach(), "ce": ce.detach()}
            if o.tv:
                loss = loss + o.tv * total_variation(x)
            if o.l2:
                loss = loss + o.l2 * x.pow(2).mean()
            if o.adi > 0:
                with eval_mode(self.ctx.learner), no_param_grad(self.ctx.learner):
                    js = js_divergence(self.student(xa).float(), t)
                loss = loss + o.adi * (1 - js)
                terms["js"] = js.detach()
        return loss, terms

    def synthesize_batch(self):
        o, ctx = self.opts, self.ctx
        if o.pixels:
            return self._pool_step()
        x = (torch.randn((self.synth_bs, *ctx.input_shape), generator=ctx.rng).to(self.device) * o.init_std)
        x.requires_grad_()
        y = balanced_labels(self.synth_bs, ctx.num_classes, self.device, ctx.rng)
        opt = torch.optim.Adam([x], lr=o.inv_lr, betas=(0.5, 0.99))
        for i in range(o.inv_steps):
            for g in opt.param_groups:      # DeepInversion's cosine lr over the inner steps
                g["lr"] = o.inv_lr * 0.5 * (1 + math.cos(math.pi * i / o.inv_steps))
            loss, terms = self.objective(x, y)
            self.synth_optimize(loss, opt, terms)
        x = x.detach()
        with torch.no_grad():
            t = self.teacher(x).float()
        return x, t, terms

    def _pool_step(self):
        o, ctx = self.opts, self.ctx
        n = self.px.shape[0]
        idx = (torch.arange(self.synth_bs) + self.state["px_head"]) % n
        self.state["px_head"] = (self.state["px_head"] + self.synth_bs) % n
        idx = idx.to(self.device)
        x = self.px[idx]
        y = self.px_y[idx]
        for _ in range(o.inv_steps):
            x = x.detach().requires_grad_()
            loss, terms = self.objective(x, y)
            grad, = torch.autograd.grad(loss, x)
            if manual_guard(ctx, torch.isfinite(loss.detach()) & torch.isfinite(grad).all(), loss, terms):
                x = self.px_adam.step(x.detach(), grad, idx)
        self.state["px_filled"] = min(n, self.state["px_filled"] + self.synth_bs)
        x = x.detach()
        self.px[idx] = x
        with torch.no_grad():
            self.px_t[idx] = self.teacher(x).float()
        return x, self.px_t[idx], terms

    def student_batch(self, x, t_logits):
        if self.opts.pixels:
            j = dist.shard(torch.randint(0, max(1, self.state["px_filled"]), (self.ctx.batch_per_rank * dist.world_size(),),
                                         generator=self.ctx.rng)).to(self.device)
            return self.px[j], self.px_t[j]
        return super().student_batch(x, t_logits)

    @torch.no_grad()
    def synthesize(self, n: int) -> torch.Tensor:
        if self.opts.pixels:
            return self.px[:n].clone()
        if self.pool is not None and len(self.pool):
            return self.pool.all()[0][:n].clone()
        out = []
        while sum(len(v) for v in out) < n:
            with torch.enable_grad():
                out.append(self.synthesize_batch()[0])
        return torch.cat(out)[:n]
