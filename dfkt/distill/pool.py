"""The DFKD replay pool: :class:`dfkt.core.buffers.DataPool` (the core's one ring buffer), re-exported."""
from __future__ import annotations

from ..core.buffers import DataPool, RingBuffer

__all__ = ["DataPool", "RingBuffer"]
