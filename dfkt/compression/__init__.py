"""Source-free compression (``dfkt.compress``): one module per recipe; importing registers them.

Recipes: ``adapt-kd-st`` (dfkt's, the default) and the three hand-chained baselines ``baseline-a``
(adapt, then distil on the target), ``baseline-b`` (distil data-free, then adapt the student) and
``baseline-c`` (distil the unadapted model on the target, then adapt the student).
"""
from __future__ import annotations

from . import adapt_kd_st, baselines  # noqa: F401
from .api import DEFAULT, CompressResult, Job, Recipe
from .student import TargetKD, TargetKDOptions

__all__ = ["DEFAULT", "CompressResult", "Job", "Recipe", "TargetKD", "TargetKDOptions"]
