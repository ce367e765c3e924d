"""Data-free knowledge distillation (DFKD): one module per method; importing registers them.

Methods: dafl, dfad, rdskd, zskt (generators, any teacher); deepinversion, dfq, cmi, fast
(BatchNorm-statistics synthesis, teachers with BN); lopes (activation metadata recorded once on
real data, see :func:`dfkt.distill.lopes.record_metadata`). Every method takes the shared options
of :class:`DistillOptions` (KD temperature, student steps, data pool, feature losses) and offers
``synthesize(n)`` for image grids after training.
"""
from __future__ import annotations

from . import cmi, dafl, deepinversion, dfad, dfq, fast, lopes, rdskd, zskt  # noqa: F401
from .common import DistillMethod, DistillOptions, GeneratorMethod, GeneratorOptions
from .generators import Generator
from .lopes import record_metadata
from .pool import DataPool

__all__ = ["DistillMethod", "DistillOptions", "GeneratorMethod", "GeneratorOptions", "Generator", "DataPool",
           "record_metadata"]
