"""DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019).

A generator is trained so that the teacher is confident on its images (one-hot loss), strongly
activated (activation loss on the penultimate features) and balanced over classes (information
entropy loss); the student learns the teacher's outputs on those images by KD.
Official MNIST setting: oh 1, a 0.1, ie 5, latent 100, batch 512; CIFAR: ie 20.

``adv > 0`` (dfkt's addition, off in ``dafl``): the generator also minimises CMI/Fast's agree-only
adversarial KL, i.e. it moves samples to where the student still disagrees with the teacher. DAFL's
losses alone drive the generator to a few saturated, very confident patterns and the student
plateaus (~90 % on MNIST with LeNet-5 -> LeNet-5-half); with ``adv=3`` the samples keep covering
the decision boundaries and the student reaches ~98 % (99 % of the teacher) in two CPU-minutes.
That recipe is registered as its own method, ``dafl+adv`` (DAFL's options with ``adv=3.0``).

Defaults (both; = benchmarks/dfkd-mnist.yaml, tuned there on seed 0, one CPU thread): the published
losses and weights; a tanh generator output (``g_out='tanh'``), a replay pool of 200 generator batches
(``pool_batches=200``) and 6 student steps per generator step (``kd_steps=6``); student SGD lr 0.1
(Nesterov, cosine), batch 256, 50 iterations per epoch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..core.hooks import PENULTIMATE, FeatureRecorder
from ..core.losses import activation_loss, class_balance, one_hot_ce, weighted_terms
from ..registry import register
from .generative import GeneratorOptions, GeneratorSynthesizer
from .method import DEFAULTS, DFKD
from .synthesis import SynthEnv, adversarial_kl, student_logits


@dataclass
class DAFLOptions(GeneratorOptions):
    g_out: Literal["bn", "tanh", "affine"] = "tanh"
    pool_batches: int = 200
    kd_steps: int = 6
    oh: float = 1.0        # one-hot (teacher confidence) weight
    act: float = 0.1       # activation loss weight
    ie: float = 5.0        # information-entropy (class balance) weight
    adv: float = 0.0       # > 0: also push samples to where the student still disagrees with the teacher
    #                        (CMI/Fast's agree-only adversarial KL; not in the published DAFL)


def dafl_terms(teacher, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAFL's generator losses on ``x``: (teacher logits, {'oh', 'act', 'ie'})."""
    with FeatureRecorder(teacher, [PENULTIMATE]) as rec:
        t_logits = teacher(x)
    return t_logits, {"oh": one_hot_ce(t_logits), "act": activation_loss(rec[PENULTIMATE]),
                      "ie": class_balance(t_logits)}


def dafl_objective(env: SynthEnv, x: torch.Tensor, z=None, y=None):
    o = env.opts
    t_logits, t = dafl_terms(env.teacher, x)
    terms = {"oh": (o.oh, t["oh"]), "act": (o.act, t["act"]), "ie": (o.ie, t["ie"])}
    if o.adv > 0:
        terms["adv"] = (o.adv, adversarial_kl(student_logits(env, x), t_logits.float()))
    loss, logged = weighted_terms(terms)
    return t_logits, loss, logged


DAFL = register("dafl", task="dfkd", family="generator")(DFKD(
    "DAFL (Chen et al., ICCV 2019): generator trained with one-hot, activation and information-entropy losses; "
    "`adv > 0` adds dfkt's adversarial term (registered as `dafl+adv`).",
    Options=DAFLOptions, module=__name__, defaults=DEFAULTS,
    synthesizer=lambda o: GeneratorSynthesizer(dafl_objective)))


@dataclass
class DAFLAdvOptions(DAFLOptions):
    adv: float = 3.0       # see the module docstring


DAFL_ADV = register("dafl+adv", task="dfkd", family="generator")(dataclasses.replace(
    DAFL, Options=DAFLAdvOptions,      # DAFL itself, with adv=3.0 as its default
    summary="DAFL+adv (dfkt): DAFL's generator losses + CMI/Fast's agree-only adversarial KL (weight 3); the "
            "strongest DFKD recipe on dfkd-mnist."))
