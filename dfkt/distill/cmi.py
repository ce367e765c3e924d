"""CMI (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021).

Every synthesis starts a generator and latent codes from scratch and optimises them for
``g_steps`` steps on DeepInversion-style terms (teacher BN statistics, one-hot against sampled
labels, adversarial teacher/student disagreement) plus a contrastive term: the teacher's
penultimate features of a sample and of a random crop of it, through a learned projection head,
must be closer to each other than to other samples of the batch and to a memory bank of earlier
syntheses (InfoNCE), which pushes new samples away from what was already synthesized. The batches
go to a data pool on which the student trains. Official CIFAR setting: g_steps 200, lr_g 1e-3,
bn 1, oh 0.5 (1 for CIFAR-100), adv 0.5, cr 0.8, cr_T 0.1, T 20, student lr 0.1, batch 256.

Defaults (= benchmarks/dfkd-mnist.yaml, dfkt's CPU recipe): the official loss weights with 10 synthesis
steps per batch, KD temperature 1 (T=20 diverges LeNet-5-half), a pool of 100 batches, 5 student steps
per batch; student SGD lr 0.03, batch 256, 10 iterations per epoch.

Measured (seed 0, dfkd-mnist's lenet5-bn teacher at 99.05 %, 300 s on one thread; not yet the default, which
needs the suite rerun): a generator from scratch per batch spends the budget on synthesis (g_steps 50: 9.45 %,
10: 44.6, 2: 59.3); ``init='meta'`` (one generator that persists across batches, Fast's meta step) with
``g_steps=2`` reaches 90.1 % (74.8 at 120 s), with ``g_steps=10`` 46.8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.buffers import RingBuffer
from ..core.hooks import PENULTIMATE, FeatureRecorder
from ..registry import register
from .generative import LatentSynthesizer
from .method import DFKD
from .objectives import BNObjective, BNSynthOptions
from .synthesis import SynthEnv, Tracked


@dataclass
class CMIOptions(BNSynthOptions):
    g_steps: int = 10
    bn: float = 1.0
    oh: float = 0.5
    adv: float = 0.5
    cr: float = 0.8            # contrastive weight
    cr_t: float = 0.1          # InfoNCE temperature
    bank_size: int = 4096      # memory bank of teacher features of past syntheses
    proj_dim: int = 128
    crop_scale: float = 0.5    # smallest side fraction of the local crop
    kd_steps: int = 5
    init: Literal["scratch", "meta"] = "scratch"   # per batch a new generator (official) or a copy of one
    #                                               that persists and takes a meta step (Fast's); figures above


def random_crop_resize(x: torch.Tensor, scale: float, g: torch.Generator | None) -> torch.Tensor:
    """One random crop (side fraction in [scale, 1]) of the whole batch, resized back."""
    h, w = x.shape[-2:]
    f = scale + (1 - scale) * float(torch.rand((), generator=g))
    ch, cw = max(1, int(h * f)), max(1, int(w * f))
    top = int(torch.randint(0, h - ch + 1, (), generator=g))
    left = int(torch.randint(0, w - cw + 1, (), generator=g))
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


class ContrastiveObjective(Tracked):
    """:class:`BNObjective` + ``cr`` x InfoNCE between the teacher's penultimate features of each sample and
    of a random crop of it (through a learned projection head), against the batch and a memory bank of
    earlier syntheses' features (the core's ring buffer)."""

    def setup(self, env: SynthEnv) -> None:
        o = env.opts
        self.bn = self.track("bn", BNObjective())
        self.bn.setup(env)
        with torch.no_grad(), FeatureRecorder(env.teacher, [PENULTIMATE]) as rec:
            env.teacher(torch.zeros((2, *env.ctx.input_shape), device=env.device))
        dim = rec[PENULTIMATE].flatten(1).shape[1]
        self.head = self.track("head", nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True),
                                                     nn.Linear(dim, o.proj_dim)).to(env.device))
        self.head_opt = self.track("head_opt", torch.optim.Adam(self.head.parameters(), lr=o.g_lr, betas=(0.5, 0.999)))
        self.bank = self.track("bank", RingBuffer(o.bank_size, {"f": (dim,)}, env.device))

    def __call__(self, env: SynthEnv, x: torch.Tensor, z, y):
        o = env.opts
        with FeatureRecorder(env.teacher, [PENULTIMATE]) as rec:
            t_logits, loss, terms = self.bn(env, x, z, y)
        f_global = rec[PENULTIMATE].flatten(1)
        local = random_crop_resize(x, o.crop_scale, env.rng)
        with FeatureRecorder(env.teacher, [PENULTIMATE]) as rec:
            env.teacher(local)
        q = F.normalize(self.head(f_global), dim=1)
        keys = F.normalize(self.head(rec[PENULTIMATE].flatten(1)), dim=1)
        if len(self.bank):
            keys = torch.cat([keys, F.normalize(self.head(self.bank.filled("f")), dim=1)])
        cr = F.cross_entropy(q @ keys.t() / o.cr_t, torch.arange(q.shape[0], device=q.device))
        self.feats = f_global.detach()
        self.head_opt.zero_grad(set_to_none=True)
        return t_logits, loss + o.cr * cr, {**terms, "cr": cr.detach()}

    def after_step(self, ok: bool) -> None:
        if ok:
            self.head_opt.step()                   # the head learns with the generator
        self.head_opt.zero_grad(set_to_none=True)

    def end(self) -> None:
        self.bank.add(f=self.feats)
        self.bn.end()


CMI = register("cmi", task="dfkd", family="inversion")(DFKD(
    "CMI (Fang et al., IJCAI 2021): contrastive model inversion (BN statistics + instance discrimination).",
    Options=CMIOptions, module=__name__, needs_teacher_bn=True,
    defaults={"epochs": 20, "iters_per_epoch": 10, "lr": 0.03, "batch_size": 256, "weight_decay": 5e-4},
    synthesizer=lambda o: LatentSynthesizer(ContrastiveObjective(), init=o.init, conditional=o.conditional)))
