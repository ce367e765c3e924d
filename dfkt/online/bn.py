"""BN: BatchNorm with test-batch statistics (Schneider et al., NeurIPS 2020; Nado et al., 2020)."""
from __future__ import annotations

from ..core.hooks import batchnorm_layers
from ..registry import register
from .base import TTAMethod


@register("bn", task="tta", family="online")
class BN(TTAMethod):
    """BN (Schneider et al., NeurIPS 2020): BatchNorm normalises with each test batch's statistics; no update.

    Rules (the public benchmark's ``norm_test``): every BatchNorm layer uses the statistics of the
    current test batch instead of the source running statistics; nothing is trained and no state is
    carried from one batch to the next. Needs BatchNorm layers and >= 2 samples per batch.
    """

    adapts = False

    def configure(self) -> None:
        super().configure()
        batchnorm_layers(self.ctx.learner, self.name)
