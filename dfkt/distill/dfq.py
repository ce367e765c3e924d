"""DFQ (Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
CVPRW 2020), in the form of the CMI code base's ``dfq`` baseline.

A generator is trained with the teacher's BatchNorm statistics as a prior, a one-hot loss against
sampled labels and an adversarial teacher/student disagreement term; the student is distilled
(KL, temperature) on fresh generator batches, ``kd_steps`` per generator step. Needs a teacher
with BatchNorm layers.

Defaults (= benchmarks/dfkd-mnist.yaml): 5 student steps per generator step on a replay pool of 100
generator batches, KD temperature 1; student SGD lr 0.03, batch 256, 50 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .generative import GeneratorSynthesizer
from .method import DEFAULTS, DFKD
from .objectives import BNObjective, BNSynthOptions


@dataclass
class DFQOptions(BNSynthOptions):
    kd_steps: int = 5
    conditional: bool = False   # DFQ's one-hot term is against the teacher's own argmax


DFQ = register("dfq", task="dfkd", family="generator")(DFKD(
    "DFQ (Choi et al., 2020): generator with BN-statistics, one-hot and adversarial losses; KD on its samples.",
    Options=DFQOptions, module=__name__, defaults={**DEFAULTS, "lr": 0.03}, needs_teacher_bn=True,
    # a fresh generator batch per student step
    synthesizer=lambda o: GeneratorSynthesizer(BNObjective(), conditional=o.conditional, resample=True)))
