"""Online test-time adaptation (TTA): predict each batch of a test stream, then adapt on it.

``dfkt.tta(model, stream, method=...)`` plays a :class:`Stream` (protocols ``continual``, ``mixed``,
``reset``) through one of the registered methods (task ``"tta"``): ``source``, ``bn``, ``tent``,
``eata``, ``sar``, ``cotta``, ``rotta``, ``roid``, ``deyo``; each is a short file on the shared core
(the loop, NaN guard, checkpoints, losses) and on :mod:`dfkt.online.common`.
"""
from . import bn, cotta, deyo, eata, roid, rotta, sar, source, tent  # noqa: F401  (register the methods)
from .stream import PROTOCOLS, Stream

__all__ = ["Stream", "PROTOCOLS"]
