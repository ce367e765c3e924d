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

Defaults (= benchmarks/dfkd-mnist.yaml, dfkt's CPU recipe, not the paper's 2k-step batches): a persistent
pool of 4096 images (``pixels=4096``), 2 Adam steps per batch of it and 2 student steps per iteration,
KD temperature 1; student SGD lr 0.03, batch 256, 50 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.hooks import BNStatsRecorder
from ..core.losses import total_variation, weighted_terms
from ..registry import register
from .method import DEFAULTS, DFKD
from .pixels import PixelSynthesizer
from .student import DistillOptions
from .synthesis import SynthEnv, js_divergence, student_logits


@dataclass
class DeepInversionOptions(DistillOptions):
    inv_steps: int = 2           # Adam steps per synthesized batch (the paper: 2k on fresh batches)
    inv_lr: float = 0.1
    bn: float = 1.0              # BN-statistics weight
    bn_first: float = 1.0        # extra factor on the first BN layer
    ce: float = 1.0
    tv: float = 1e-3             # total variation (l1) prior
    l2: float = 0.0              # l2 prior on the inputs
    adi: float = 0.0             # ADI competition weight (0: plain DeepInversion)
    jitter: int = 2              # random roll of up to this many pixels
    flip: bool = False           # random horizontal flips (not for digits)
    pixels: int = 4096           # persistent pixel pool size (0: a fresh batch per iteration, the paper's)
    init_std: float = 1.0
    temperature: float = 1.0
    kd_steps: int = 2

    def validate(self) -> None:
        super().validate()
        if self.inv_steps < 1:
            raise ValueError(f"inv_steps must be >= 1, got {self.inv_steps}")


class InversionObjective:
    """BN statistics (the core's BN hook) + CE to the sampled labels + TV / l2 priors on jittered (flipped)
    inputs; ``adi > 0``: minus the teacher/student Jensen-Shannon divergence."""

    def setup(self, env: SynthEnv) -> None:
        self.env = env
        self.recorder = BNStatsRecorder(env.teacher, method=env.method)

    def labels(self, n: int) -> torch.Tensor:
        return self.env.labels(n)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        o, g = self.env.opts, self.env.rng
        if o.jitter:
            dx, dy = (int(v) for v in torch.randint(-o.jitter, o.jitter + 1, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if o.flip and bool(torch.rand((), generator=g) < 0.5):
            x = torch.flip(x, dims=(3,))
        return x

    def __call__(self, env: SynthEnv, x: torch.Tensor, z, y: torch.Tensor):
        o = env.opts
        xa = self.augment(x)
        with env.ctx.autocast():
            with self.recorder:
                t = env.teacher(xa).float()
            terms = {"bn": (o.bn, self.recorder.loss(o.bn_first)), "ce": (o.ce, F.cross_entropy(t, y))}
            if o.tv:
                terms["tv"] = (o.tv, total_variation(x))
            if o.l2:
                terms["l2"] = (o.l2, x.pow(2).mean())
            if o.adi > 0:          # adi * (1 - js), the constant dropped
                terms["js"] = (-o.adi, js_divergence(student_logits(env, xa), t))
            loss, logged = weighted_terms(terms)
        return t, loss, logged


DEEPINVERSION = register("deepinversion", task="dfkd", family="inversion")(DFKD(
    "DeepInversion (Yin et al., CVPR 2020): optimise inputs to match the teacher's BN statistics (+ ADI).",
    Options=DeepInversionOptions, module=__name__, defaults={**DEFAULTS, "lr": 0.03}, needs_teacher_bn=True,
    synthesizer=lambda o: PixelSynthesizer(InversionObjective(), cosine=True, persistent=o.pixels)))
