"""CMI (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021).

Every synthesis starts a generator and latent codes from scratch and optimises them for
``g_steps`` steps on DeepInversion-style terms (teacher BN statistics, one-hot against sampled
labels, adversarial teacher/student disagreement) plus a contrastive term: the teacher's
penultimate features of a sample and of a random crop of it, through a learned projection head,
must be closer to each other than to other samples of the batch and to a memory bank of earlier
syntheses (InfoNCE), which pushes new samples away from what was already synthesized. The batches
go to a data pool on which the student trains. Official CIFAR setting: g_steps 200, lr_g 1e-3,
bn 1, oh 0.5 (1 for CIFAR-100), adv 0.5, cr 0.8, cr_T 0.1, T 20, student lr 0.1, batch 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.hooks import FeatureRecorder
from ..registry import register
from .common import BNObjective, BNSynthOptions, GeneratorMethod, balanced_labels, last_linear


@dataclass
class CMIOptions(BNSynthOptions):
    g_steps: int = 20
    bn: float = 1.0
    oh: float = 0.5
    adv: float = 0.5
    cr: float = 0.8            # contrastive weight
    cr_t: float = 0.1          # InfoNCE temperature
    bank_size: int = 4096      # memory bank of teacher features of past syntheses
    proj_dim: int = 128
    crop_scale: float = 0.5    # smallest side fraction of the local crop
    pool_batches: int = 40
    kd_steps: int = 5


def random_crop_resize(x: torch.Tensor, scale: float, g: torch.Generator | None) -> torch.Tensor:
    """One random crop (side fraction in [scale, 1]) of the whole batch, resized back."""
    h, w = x.shape[-2:]
    f = scale + (1 - scale) * float(torch.rand((), generator=g))
    ch, cw = max(1, int(h * f)), max(1, int(w * f))
    top = int(torch.randint(0, h - ch + 1, (), generator=g))
    left = int(torch.randint(0, w - cw + 1, (), generator=g))
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


@register("cmi", task="dfkd", family="inversion")
class CMI(GeneratorMethod):
    """CMI (Fang et al., IJCAI 2021): contrastive model inversion (BN statistics + instance discrimination)."""

    Options = CMIOptions
    needs_teacher_bn = True
    defaults = {"epochs": 20, "iters_per_epoch": 20, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def build(self) -> None:
        super().build()
        o = self.opts
        self.objective = self.track("bn_objective", BNObjective(self.teacher, self.ctx.learner, o, self.name))
        self.feat_name = last_linear(self.teacher)
        with torch.no_grad(), FeatureRecorder(self.teacher, [self.feat_name], inputs=True) as rec:
            self.teacher(torch.zeros((2, *self.ctx.input_shape), device=self.device))
        dim = rec[self.feat_name].flatten(1).shape[1]
        self.head = self.track("head", nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True),
                                                     nn.Linear(dim, o.proj_dim)).to(self.device))
        self.head_opt = self.track("head_opt", torch.optim.Adam(self.head.parameters(), lr=o.g_lr, betas=(0.5, 0.999)))
        self.bank = self.track("bank", torch.zeros(o.bank_size, dim, device=self.device))
        self.state.update(bank_n=0, bank_head=0)

    def contrastive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.opts
        local = random_crop_resize(x, o.crop_scale, self.ctx.rng)
        with FeatureRecorder(self.teacher, [self.feat_name], inputs=True) as rec:
            self.teacher(local)
        f_local = rec[self.feat_name].flatten(1)
        f_global = self.global_feat
        q = F.normalize(self.head(f_global), dim=1)
        k = F.normalize(self.head(f_local), dim=1)
        keys = k
        if self.state["bank_n"]:
            keys = torch.cat([k, F.normalize(self.head(self.bank[:self.state["bank_n"]]), dim=1)])
        logits = q @ keys.t() / o.cr_t
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, target), f_global.detach()

    def synthesize_batch(self):
        o = self.opts
        gen = self.build_generator(self.ctx.num_classes if o.conditional else 0).train()   # from scratch
        z = self.z().requires_grad_()
        opt = torch.optim.Adam([{"params": gen.parameters()}, {"params": [z]}], lr=o.g_lr, betas=(0.5, 0.999))
        y = balanced_labels(self.synth_bs, self.ctx.num_classes, self.device, self.ctx.rng)
        for _ in range(o.g_steps):
            x = gen(z, y)
            with self.ctx.autocast():
                with FeatureRecorder(self.teacher, [self.feat_name], inputs=True) as rec:
                    loss, t_logits, terms = self.objective(x, y, self.student)
                self.global_feat = rec[self.feat_name].flatten(1)
                cr, feats = self.contrastive(x)
            loss = loss + o.cr * cr
            terms["cr"] = cr.detach()
            self.head_opt.zero_grad(set_to_none=True)
            if self.synth_optimize(loss, opt, terms):
                self.head_opt.step()                   # the head learns with the generator
            self.head_opt.zero_grad(set_to_none=True)
            self.s_opt.zero_grad(set_to_none=True)
        n = feats.shape[0]
        idx = (torch.arange(n, device=self.device) + self.state["bank_head"]) % self.bank.shape[0]
        self.bank[idx] = feats
        self.state["bank_head"] = (self.state["bank_head"] + n) % self.bank.shape[0]
        self.state["bank_n"] = min(self.bank.shape[0], self.state["bank_n"] + n)
        self.last_generator = gen
        with torch.no_grad():
            x = gen(z, y)
            t_logits = self.teacher(x).float()
        return x, t_logits, terms

    @torch.no_grad()
    def synthesize(self, n: int) -> torch.Tensor:
        return self.synthesize_from_pool(n)
