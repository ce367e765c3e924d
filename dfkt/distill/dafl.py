"""DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019).

A generator is trained so that the teacher is confident on its images (one-hot loss), strongly
activated (activation loss on the penultimate features) and balanced over classes (information
entropy loss); the student learns the teacher's outputs on those images by KD.
Official MNIST setting: oh 1, a 0.1, ie 5, latent 100, batch 512; CIFAR: ie 20.

``adv > 0`` (dfkt's addition, off by default): the generator also minimises CMI/Fast's agree-only
adversarial KL, i.e. it moves samples to where the student still disagrees with the teacher. DAFL's
losses alone drive the generator to a few saturated, very confident patterns and the student
plateaus (~90 % on MNIST with LeNet-5 -> LeNet-5-half); with ``adv=3`` the samples keep covering
the decision boundaries and the student reaches ~98 % (99 % of the teacher) in two CPU-minutes
(benchmarks/dfkd-mnist.yaml, ``dafl+adv``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.hooks import FeatureRecorder
from ..core.losses import activation_loss, class_balance, one_hot_ce
from ..registry import register
from .common import GeneratorMethod, GeneratorOptions, adversarial_kl, eval_mode, last_linear, no_param_grad


@dataclass
class DAFLOptions(GeneratorOptions):
    oh: float = 1.0        # one-hot (teacher confidence) weight
    act: float = 0.1       # activation loss weight
    ie: float = 5.0        # information-entropy (class balance) weight
    adv: float = 0.0       # > 0: also push samples to where the student still disagrees with the teacher
    #                        (CMI/Fast's agree-only adversarial KL; not in the published DAFL)


def dafl_terms(teacher, x: torch.Tensor, opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAFL's generator losses on ``x``: (teacher logits, {'oh', 'act', 'ie'})."""
    with FeatureRecorder(teacher, [last_linear(teacher)], inputs=True) as rec:
        t_logits = teacher(x)
    feats = next(iter(rec.features.values()))
    return t_logits, {"oh": one_hot_ce(t_logits), "act": activation_loss(feats), "ie": class_balance(t_logits)}


@register("dafl", task="dfkd", family="generator")
class DAFL(GeneratorMethod):
    """DAFL (Chen et al., ICCV 2019): generator trained with one-hot, activation and information-entropy losses; `adv > 0` adds dfkt's adversarial term (the best DFKD recipe here)."""

    Options = DAFLOptions
    defaults = {"epochs": 20, "iters_per_epoch": 50, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4}

    def synthesize_batch(self):
        o = self.opts
        self.generator.train()
        x = self.gen(self.z())
        with self.ctx.autocast():
            t_logits, t = dafl_terms(self.teacher, x, o)
        loss = o.oh * t["oh"] + o.act * t["act"] + o.ie * t["ie"]
        if o.adv > 0:
            with eval_mode(self.ctx.learner), no_param_grad(self.ctx.learner), self.ctx.autocast():
                t["adv"] = adversarial_kl(self.student_logits(x).float(), t_logits.float())
            loss = loss + o.adv * t["adv"]
        terms = {k: v.detach() for k, v in t.items()}
        self.g_optimize(loss, terms)
        return x.detach(), t_logits.detach().float(), terms
