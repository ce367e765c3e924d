"""DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019).

Min-max game: the generator maximises the teacher/student discrepancy (mean absolute logit
difference), the student minimises it, with ``kd_steps`` student steps per generator step.
``gen_loss='log'`` maximises ``log(discrepancy)`` instead, which rescales the generator's gradient
by 1/discrepancy so that it does not vanish as the student catches up.
Official MNIST setting: lr_S 0.1 (SGD), lr_G 1e-3 (Adam), batch 256, nz 256, 5 student steps per
generator step, 50 iterations per epoch.

Defaults (= benchmarks/dfkd-mnist.yaml): the official setting, plus a replay pool of 200 generator batches
(``pool_batches=200``: the student steps draw from it instead of one fresh generator batch each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.losses import logit_l1
from ..registry import register
from .generative import GeneratorOptions, GeneratorSynthesizer
from .method import DEFAULTS, DFKD
from .synthesis import SynthEnv, no_param_grad


@dataclass
class DFADOptions(GeneratorOptions):
    kd_loss: Literal["kl", "l1"] = "l1"
    kd_steps: int = 5
    pool_batches: int = 200
    nz: int = 256
    gen_loss: Literal["l1", "log"] = "l1"
    g_schedule: bool = True      # the official code decays the generator's lr with the student's


def dfad_objective(env: SynthEnv, x: torch.Tensor, z=None, y=None):
    """The generator maximises the mean absolute teacher/student logit difference (or its log)."""
    with no_param_grad(env.learner):
        with torch.no_grad():
            t_logits = env.teacher(x)
        d = logit_l1(env.student(x).float(), t_logits.float())
    loss = -torch.log(d + 1e-8) if env.opts.gen_loss == "log" else -d
    return t_logits, loss, {"adv": d.detach()}


DFAD = register("dfad", task="dfkd", family="generator")(DFKD(
    "DFAD (Fang et al., 2019): a generator maximises the teacher/student L1 discrepancy, the student minimises it.",
    Options=DFADOptions, module=__name__, defaults=DEFAULTS,
    # the official recipe: a fresh generator batch per student step
    synthesizer=lambda o: GeneratorSynthesizer(dfad_objective, resample=True)))
