"""RDSKD (Han et al., "Robustness and Diversity Seeking Data-Free Knowledge Distillation", ICASSP 2021).

DAFL's generator losses (one-hot, activation, information entropy), each in exponential form
relative to its previous value, ``w * exp(L - L_prev)`` (a term that got worse weighs more, so no
term is left behind), plus a mode-seeking diversity regulariser: for two latent codes the ratio
``mean|G(z1) - G(z2)| / mean|z1 - z2|`` is maximised (Mao et al., 2019), so that different codes
give different images.

Defaults (= benchmarks/dfkd-mnist.yaml, DAFL's): ``g_out='tanh'``, a replay pool of 200 generator batches,
6 student steps per generator step; student SGD lr 0.1, batch 256, 50 iterations per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..registry import register
from .dafl import dafl_terms
from .generative import GeneratorOptions, GeneratorSynthesizer
from .method import DEFAULTS, DFKD
from .synthesis import SynthEnv


@dataclass
class RDSKDOptions(GeneratorOptions):
    g_out: Literal["bn", "tanh", "affine"] = "tanh"
    pool_batches: int = 200
    kd_steps: int = 6
    oh: float = 1.0
    act: float = 0.1
    ie: float = 5.0
    div: float = 1.0      # mode-seeking diversity weight


class RelativeObjective:
    """DAFL's terms and the mode-seeking term, each as ``w * exp(L - L_prev)`` (previous values are state)."""

    def setup(self, env: SynthEnv) -> None:
        self.prev = torch.zeros(4, device=env.device)     # oh, act, ie, -ms
        self.started = False

    def __call__(self, env: SynthEnv, x: torch.Tensor, z: torch.Tensor, y=None):
        o = env.opts
        t_logits, t = dafl_terms(env.teacher, x)
        h = x.shape[0] // 2
        ms = (x[:h] - x[h:2 * h]).abs().mean() / (z[:h] - z[h:2 * h]).abs().mean()
        cur = torch.stack([t["oh"], t["act"], t["ie"], -ms]).float()
        prev = self.prev if self.started else cur.detach()
        w = torch.tensor([o.oh, o.act, o.ie, o.div], device=cur.device)
        loss = (w * torch.exp((cur - prev).clamp(max=10.0))).sum()
        self.prev.copy_(cur.detach())
        self.started = True
        return t_logits, loss, {**{k: v.detach() for k, v in t.items()}, "ms": ms.detach()}

    def state_dict(self) -> dict:
        return {"prev": self.prev.cpu().clone(), "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        self.prev.copy_(state["prev"])
        self.started = bool(state["started"])


RDSKD = register("rdskd", task="dfkd", family="generator")(DFKD(
    "RDSKD (Han et al., ICASSP 2021): DAFL's losses in exponential relative form + mode-seeking diversity.",
    Options=RDSKDOptions, module=__name__, defaults=DEFAULTS,
    synthesizer=lambda o: GeneratorSynthesizer(RelativeObjective())))
