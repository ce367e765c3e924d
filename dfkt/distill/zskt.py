"""ZSKT (Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019).

The generator maximises KL(teacher || student) on its images; the student minimises the KL plus
``beta`` times attention transfer between matching layers (auto: for each spatial size the last
module common to both nets, or ``feature_layers``), ``kd_steps`` student steps on each generated
batch. Official CIFAR setting: 1 generator / 10 student steps, Adam 1e-3 (G) and 2e-3 (S),
cosine schedule, batch 128, z 100, beta 250.

Defaults (= benchmarks/dfkd-mnist.yaml): the official optimisers (student Adam lr 2e-3: with SGD 0.05 the
student collapses to one class), 10 student steps per generator step, beta 250, plus a replay pool of
100 generator batches; batch 256, 20 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.losses import kd_kl
from ..registry import register
from .generative import GeneratorOptions, GeneratorSynthesizer
from .method import DFKD
from .synthesis import SynthEnv, no_param_grad


@dataclass
class ZSKTOptions(GeneratorOptions):
    kd_steps: int = 10
    pool_batches: int = 100
    optimizer: Literal["sgd", "adam"] = "adam"
    feature_loss: Literal["none", "at", "sp", "pkt", "rkd", "fitnet"] = "at"
    feature_weight: float = 250.0       # ZSKT's beta


def zskt_objective(env: SynthEnv, x: torch.Tensor, z=None, y=None):
    """The generator maximises KL(teacher || student) on its images."""
    with no_param_grad(env.learner):
        with torch.no_grad():
            t_logits = env.teacher(x)
        kl = kd_kl(env.student(x).float(), t_logits.float(), 1.0)
    return t_logits, -kl, {"adv": kl.detach()}


ZSKT = register("zskt", task="dfkd", family="generator")(DFKD(
    "ZSKT (Micaelli & Storkey, NeurIPS 2019): adversarial generator (max KL) + KL and attention transfer.",
    Options=ZSKTOptions, module=__name__,
    defaults={"epochs": 20, "iters_per_epoch": 20, "lr": 0.002, "batch_size": 256, "weight_decay": 5e-4},
    synthesizer=lambda o: GeneratorSynthesizer(zskt_objective)))
