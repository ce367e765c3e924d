"""Source: the unadapted model on the stream (the reference row of every TTA table)."""
from __future__ import annotations

from ..registry import register
from .base import TTAMethod


@register("source", task="tta", family="baseline")
class Source(TTAMethod):
    """Source: no adaptation; the source model predicts the stream in eval mode (its own BN statistics).

    Works with any batch size, including 1.
    """

    batch_stats = False
    adapts = False

    def set_modes(self) -> None:
        self.ctx.learner.eval()
