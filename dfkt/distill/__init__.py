"""Data-free knowledge distillation (DFKD): one module per method; importing registers them."""
from __future__ import annotations

from . import dafl, dfad  # noqa: F401
from .common import DistillMethod, DistillOptions, GeneratorMethod, GeneratorOptions
from .generators import Generator
from .pool import DataPool

__all__ = ["DistillMethod", "DistillOptions", "GeneratorMethod", "GeneratorOptions", "Generator", "DataPool"]
