"""Test streams for online test-time adaptation: named segments of data in one fixed order.

A :class:`Stream` is a list of named segments (e.g. one per corruption), each a map-style data set
yielding ``(x, y)`` or ``(x, y, index)`` (labels only score the predictions; ``-1`` = unlabeled).
The protocol says how the segments are played, as in the public test-time-adaptation benchmark
(Marsden et al.'s ``test-time-adaptation`` repository):

* ``continual``: one segment after another; the model is never reset (CoTTA's continual setting);
* ``reset``:     one segment after another; the model is reset to the source model at the start of
  each segment (the classic per-corruption evaluation);
* ``mixed``:     the samples of all segments shuffled together into one segment (mixed domains).

Within a segment the samples are shuffled once by ``seed`` (``shuffle=True``) or kept in data order.
:meth:`Stream.plan` cuts the stream into batches (never across a segment) and the batches into
chunks, the units of progress, history and checkpoints of a run (see :func:`dfkt.tta`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..core.loader import dataset_len
from ..errors import ConfigError, DataError, suggest

PROTOCOLS = ("continual", "mixed", "reset")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown stream protocol {protocol!r}.{suggest(str(protocol), PROTOCOLS)} "
                          f"Use one of: {', '.join(PROTOCOLS)}.")
    return protocol


def _segments(data: Any) -> list[tuple[str, Any]]:
    """Normalise the ways of giving segments: one data set, a mapping name -> data set, or a list of
    data sets or of (name, data set) pairs."""
    if isinstance(data, Mapping):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(d[0], d[1]) if isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], str)
                 else (str(getattr(d, "name", f"segment{i}")), d) for i, d in enumerate(data)]
    else:
        items = [(str(getattr(data, "name", "stream")), data)]
    if not items:
        raise DataError("a stream needs at least one segment (data set); got none.")
    names = [n for n, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"stream segment names must be unique, got {dup} more than once; pass a mapping "
                        f"name -> data set.")
    return items


def _tensor_pair(ds: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    t = getattr(ds, "tensors", None)
    if isinstance(t, (tuple, list)) and len(t) == 2 and all(torch.is_tensor(v) for v in t):
        return t[0], t[1]
    return None


@dataclass(frozen=True)
class Chunk:
    """Batches ``[first, last)`` of the plan; ``reset``: reset the model to the source before them."""

    first: int
    last: int
    segment: int | None          # the segment all its samples come from (None: mixed)
    reset: bool

    @property
    def num_batches(self) -> int:
        return self.last - self.first


class Stream:
    """Named segments of test data in a fixed order (see the module docstring).

    >>> s = Stream({"gaussian_noise": ds1, "contrast": ds2}, protocol="continual", seed=0)
    >>> len(s), s.names
    """

    def __init__(self, segments: Any, protocol: str = "continual", shuffle: bool = True, seed: int = 0):
        self.protocol = check_protocol(protocol)
        items = _segments(segments)
        self.names = [n for n, _ in items]
        self.datasets = [d for _, d in items]
        self.sizes = [dataset_len(d) for d in self.datasets]
        self.shuffle, self.seed = bool(shuffle), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        parts = []
        for s, n in enumerate(self.sizes):
            local = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            parts.append(torch.stack([torch.full((n,), s, dtype=torch.long), local], 1))
        order = torch.cat(parts)
        if self.protocol == "mixed":
            order = order[torch.randperm(len(order), generator=g)] if self.shuffle else order
        self.domain, self.local = order[:, 0].contiguous(), order[:, 1].contiguous()
        self._cache: dict = {}

    def __len__(self) -> int:
        return int(self.domain.numel())

    def __repr__(self) -> str:
        return (f"Stream({len(self.names)} segments, {len(self)} samples, protocol={self.protocol!r}, "
                f"shuffle={self.shuffle}, seed={self.seed})")

    def describe(self) -> dict:
        """What identifies the stream (for run fingerprints and results)."""
        return {"segments": self.names, "sizes": self.sizes, "protocol": self.protocol, "shuffle": self.shuffle,
                "seed": self.seed}

    # -- batches ------------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[int, int, int | None]]:
        """Runs of consecutive samples that batches may not cross: (start, end, segment)."""
        if self.protocol == "mixed":
            return [(0, len(self), None)]
        out, start = [], 0
        for s, n in enumerate(self.sizes):
            out.append((start, start + n, s))
            start += n
        return out

    def plan(self, batch_size: int, chunk_batches: int = 25) -> "StreamPlan":
        """Batches of ``batch_size`` samples (the last one of a block smaller; a last batch of a single
        sample is merged into the one before when ``batch_size > 1``, since test-batch statistics need
        two), grouped into chunks of at most ``chunk_batches`` batches that never cross a segment."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, int) or chunk_batches < 1:
            raise ConfigError(f"chunk_batches must be a positive integer, got {chunk_batches!r}.")
        batches: list[tuple[int, int]] = []
        chunks: list[Chunk] = []
        for start, end, seg in self.blocks():
            first = len(batches)
            bounds = list(range(start, end, batch_size)) + [end]
            if batch_size > 1 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
                del bounds[-2]
            batches += list(zip(bounds[:-1], bounds[1:]))
            for c in range(first, len(batches), chunk_batches):
                chunks.append(Chunk(c, min(c + chunk_batches, len(batches)), seg,
                                    reset=self.protocol == "reset" and c == first))
        return StreamPlan(self, batch_size, batches, chunks)

    # -- data ---------------------------------------------------------------------------------------
    def _device_tensors(self, device: torch.device):
        """All segments' images and labels concatenated on ``device`` (in-memory data sets only)."""
        key = str(device)
        if key not in self._cache:
            pairs = [_tensor_pair(d) for d in self.datasets]
            if any(p is None for p in pairs):
                self._cache[key] = None
            else:
                shapes = {tuple(p[0].shape[1:]) for p in pairs}
                if len(shapes) > 1:
                    raise DataError(f"stream segments have different sample shapes {sorted(shapes)}; every "
                                    f"segment must hold inputs of one shape.")
                offsets = torch.tensor([0] + self.sizes[:-1]).cumsum(0)
                rows = (offsets[self.domain] + self.local).to(device)
                x = torch.cat([p[0] for p in pairs]).to(device)
                y = torch.cat([p[1].long() for p in pairs]).to(device)
                self._cache[key] = (x, y, rows)
        return self._cache[key]

    def labels(self) -> torch.Tensor:
        """Labels of all samples in stream order (CPU; ``-1`` where unlabeled)."""
        cached = self._device_tensors(torch.device("cpu"))
        if cached is not None:
            x, y, rows = cached
            return y[rows]
        return torch.tensor([_label(self.datasets[int(s)][int(i)]) for s, i in zip(self.domain, self.local)],
                            dtype=torch.long)

    def fetch(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        """Inputs of stream positions ``[start, end)`` on ``device`` (labels are not handed out here)."""
        cached = self._device_tensors(device)
        if cached is not None:
            x, _y, rows = cached
            return x[rows[start:end]]
        items = [self.datasets[int(s)][int(i)] for s, i in zip(self.domain[start:end], self.local[start:end])]
        return torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items]).to(device)


def _label(item: Any) -> int:
    if isinstance(item, (tuple, list)) and len(item) > 1:
        return int(item[1])
    return -1


@dataclass
class StreamPlan:
    """A stream cut into batches (``(start, end)`` stream positions) and chunks of batches."""

    stream: Stream
    batch_size: int
    batches: list[tuple[int, int]]
    chunks: list[Chunk]

    @property
    def num_samples(self) -> int:
        return len(self.stream)

    @property
    def min_batch(self) -> int:
        return min(e - s for s, e in self.batches)

    def fetch(self, batch: int, device: torch.device) -> torch.Tensor:
        s, e = self.batches[batch]
        return self.stream.fetch(s, e, device)


def make_stream(data: Any, protocol: str = "continual", shuffle: bool = True, seed: int = 0) -> Stream:
    """``data`` as a :class:`Stream` (a Stream is returned as it is)."""
    if isinstance(data, Stream):
        return data
    return Stream(data, protocol=protocol, shuffle=shuffle, seed=seed)
