"""Fast (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).

Like CMI/DeepInversion, batches are synthesized by optimising a generator copy and its latent
codes against the teacher's BatchNorm statistics, a one-hot loss and an adversarial term; but the
copy starts from a *meta-learned* generator, so a handful of steps (``g_steps`` 2-5 instead of
hundreds) suffice. After each synthesis the meta generator takes a first-order MAML step with the
gradients of the inner steps. Statistics are matched with a momentum over batches (``bn_mmt``),
the first layer of the copy is re-initialised each time (``reset_l0``), the batches go to a data
pool on which the student trains, and the first ``warmup`` epochs only synthesize.
Official CIFAR setting: g_steps 2-5, lr_g 5e-3, lr_z 0.015, bn 10, oh 0.5, adv 1.1 (CIFAR-10),
bn_mmt 0.9, T 20, kd/ep steps 400, warmup 20 of 220 epochs, student lr 0.2, batch 256.

Defaults (= benchmarks/dfkd-mnist.yaml, dfkt's CPU recipe): g_steps 2, lr_g 5e-3, lr_z 0.015, bn_mmt 0.9 as
published, but bn 1, oh 1, adv 1, no first-layer reset, KD temperature 1, a pool of 100 batches and 5
student steps per batch; student SGD lr 0.03 (at 0.1 the student collapses to one class after ~60 s on the
MNIST teacher), batch 256, 50 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .generative import LatentSynthesizer
from .method import DEFAULTS, DFKD
from .objectives import BNObjective, BNSynthOptions


@dataclass
class FastOptions(BNSynthOptions):
    g_steps: int = 2
    g_lr: float = 5e-3
    z_lr: float = 0.015
    bn: float = 1.0
    oh: float = 1.0
    adv: float = 1.0
    bn_mmt: float = 0.9
    reset_l0: bool = False
    kd_steps: int = 5


FAST = register("fast", task="dfkd", family="generator")(DFKD(
    "Fast (Fang et al., AAAI 2022): meta-learned generator initialisation, few synthesis steps, data pool.",
    Options=FastOptions, module=__name__, defaults={**DEFAULTS, "lr": 0.03}, needs_teacher_bn=True,
    synthesizer=lambda o: LatentSynthesizer(BNObjective(), init="meta", conditional=o.conditional)))
