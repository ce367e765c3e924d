"""SHOT-IM: SHOT's information maximisation alone (no pseudo-labels)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..registry import register
from .shot import Shot


@dataclass
class ShotIMOptions:
    ent_par: float = 1.0
    gent: bool = True
    backbone_lr: Optional[float] = None   # None: x0.1 for a backbone >= 5M params, else x1 (SFDAMethod)
    dropout: bool = False     # keep dropout on while adapting (official code: on; see SFDAMethod)
    momentum: float = 0.9
    nesterov: bool = True


@register("shot-im", task="sfda", family="self-training")
class ShotIM(Shot):
    """SHOT-IM (Liang et al., ICML 2020): entropy minimisation + diversity, head frozen."""

    Options = ShotIMOptions
    needs_index = False

    def epoch_begin(self, epoch: int) -> None:
        """No pseudo-labels, so nothing to refresh."""
