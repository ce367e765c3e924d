"""Synthesis objectives shared by several methods: the teacher's BatchNorm statistics as a prior
(:class:`BNObjective`: DFQ, Fast, CMI) with a one-hot and an adversarial term."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..core.hooks import BNStatsRecorder
from ..core.losses import class_balance, weighted_terms
from .generative import GeneratorOptions
from .synthesis import SynthEnv, adversarial_kl, student_logits


@dataclass
class BNSynthOptions(GeneratorOptions):
    """BatchNorm-statistics synthesis: the teacher's BN running statistics as a prior on the inputs."""

    g_out: Literal["bn", "tanh", "affine"] = "affine"
    bn: float = 1.0            # BN-statistics loss weight
    bn_first: float = 1.0      # extra factor on the first BN layer (DeepInversion)
    bn_mmt: float = 0.0        # Fast: momentum over the synthetic batch statistics (0 = this batch only)
    oh: float = 1.0            # CE of the teacher against the sampled target labels
    adv: float = 1.0           # adversarial term (see adversarial_kl)
    conditional: bool = True   # the generator also sees the sampled label (a class embedding scales z);
    #                            the published generators see z only, which needs far more steps
    balance: float = 0.0       # DAFL's class-balance term
    temperature: float = 1.0   # KD temperature (CMI/Fast publish T=20, which diverges LeNet-5-half at lr 0.1)
    pool_batches: int = 100    # replay pool of synthesized batches


class BNObjective:
    """Teacher BN statistics (the core's BN hook, with ``bn_mmt`` momentum) + one-hot against the sampled
    labels (or the teacher's argmax) + agree-only adversarial KL (once the student trains) + class balance."""

    def setup(self, env: SynthEnv) -> None:
        self.recorder = BNStatsRecorder(env.teacher, method=env.method, momentum=env.opts.bn_mmt)

    def __call__(self, env: SynthEnv, x: torch.Tensor, z, y: torch.Tensor | None):
        o = env.opts
        with self.recorder:
            t_logits = env.teacher(x)
        t_logits = t_logits.float()
        terms = {"bn": (o.bn, self.recorder.loss(o.bn_first)),
                 "oh": (o.oh, F.cross_entropy(t_logits, y if y is not None else t_logits.argmax(1)))}
        if o.adv > 0 and env.student_ready():
            terms["adv"] = (o.adv, adversarial_kl(student_logits(env, x), t_logits))
        if o.balance > 0:
            terms["balance"] = (o.balance, class_balance(t_logits))
        loss, logged = weighted_terms(terms)
        return t_logits, loss, logged

    def end(self) -> None:
        self.recorder.commit()      # bn_mmt > 0: fold this batch's statistics into the running ones

    def state_dict(self) -> dict:
        return self.recorder.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.recorder.load_state_dict(state)
