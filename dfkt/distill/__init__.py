"""Data-free knowledge distillation (DFKD): one module per method; importing registers them.

A method is composed, not inherited: a synthesizer (:mod:`.synthesis`: :class:`GeneratorSynthesizer`,
:class:`LatentSynthesizer`, :class:`PixelSynthesizer`, each driven by the method's objective) + the one
:class:`StudentLearner` (KD / L1 / feature losses, replay pool, augmentation, EMA) + the method's loss
weights and defaults, in one configured :class:`DFKDMethod` (see :mod:`.method`).

Methods: dafl, dfad, rdskd, zskt (generators, any teacher); deepinversion, dfq, cmi, fast
(BatchNorm-statistics synthesis, teachers with BN); lopes (activation metadata recorded once on
real data, see :func:`dfkt.distill.lopes.record_metadata`). Every method takes the shared options
of :class:`DistillOptions` (KD temperature, student steps, data pool, feature losses) and offers
``synthesize(n)`` for image grids after training.

The package is also the API function: ``dfkt.distill(teacher, student, method=..., input_shape=...)``
calls :func:`dfkt.api.distill` (its signature and documentation are those of that function). So the
function and the package coexist under one name without re-binding it.
"""
from __future__ import annotations

import sys
import types

from . import cmi, dafl, deepinversion, dfad, dfq, fast, lopes, rdskd, zskt  # noqa: F401
from .generative import GeneratorOptions, GeneratorSynthesizer, LatentSynthesizer
from .generators import Generator
from .lopes import record_metadata
from .method import DFKD, DFKDMethod
from .pixels import PixelSynthesizer
from .pool import DataPool
from .student import DistillOptions, StudentLearner
from .synthesis import SynthEnv, Synthesizer

__all__ = ["DFKD", "DFKDMethod", "DistillOptions", "GeneratorOptions", "StudentLearner", "Synthesizer", "SynthEnv",
           "GeneratorSynthesizer", "LatentSynthesizer", "PixelSynthesizer", "Generator", "DataPool",
           "record_metadata"]


class _CallablePackage(types.ModuleType):
    """This package's type: calling it runs :func:`dfkt.api.distill`."""

    def __call__(self, *args, **kwargs):
        from ..api import distill
        return distill(*args, **kwargs)

    @property
    def __wrapped__(self):   # inspect.signature(dfkt.distill) shows the function's
        from ..api import distill
        return distill


sys.modules[__name__].__class__ = _CallablePackage
