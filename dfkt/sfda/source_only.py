"""Source-only: the source model evaluated on the target, unchanged (the lower bound)."""
from __future__ import annotations

from ..registry import register
from ..core.method import Method


@register("source-only", task="sfda", family="baseline")
class SourceOnly(Method):
    """Source-only: no adaptation; evaluates the source model on the target."""

    trains = False

    def setup(self) -> None:
        self.ctx.steps_per_epoch = 1

    def batches(self):
        return iter(())

    def step(self, batch):  # never called
        return {}
