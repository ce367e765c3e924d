"""Typed configs of online test-time adaptation: the stream spec (shared by ``dfkt tta CONFIG`` and the
``tta`` bench suites) and the run config of ``dfkt tta``.

    # dfkt tta CONFIG
    method: tent
    model: {name: lenet5-bn, num_classes: 10}
    source_model: runs/source/model.pt            # a dfkt model.pt (trained source weights)
    data: {domain: mnist10k, split: test, size: 32}
    stream:
      corruptions: [gaussian_noise, shot_noise, contrast]   # one segment each ([] = the data as it is)
      severity: 5
      protocol: continual                         # continual | mixed | reset
    source_data: {domain: mnist10k, split: train, size: 32}   # optional: EATA's Fisher
    options: {}                                   # the method's options
    train: {batch_size: 64, lr: 0.001, seed: 0}   # dfkt.TrainConfig (epochs: set by the stream)
    chunk_batches: 50
    out: runs/tta
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from ..core.context import TrainConfig
from ..errors import ConfigError
from ..runconfig import DataRef, ModelRef
from .stream import Stream


@dataclass
class StreamSpec:
    """How to make a stream from clean test data: one segment per corruption, played by ``protocol``."""

    corruptions: list[str] = field(default_factory=list)
    severity: int = 5
    corruption_seed: int = 0
    protocol: Literal["continual", "mixed", "reset"] = "continual"
    shuffle: bool = True

    def validate(self, where: str = "stream") -> None:
        from ..data.corruptions import check_corruption
        from ..errors import DataError

        for c in self.corruptions:
            try:
                check_corruption(c, self.severity)
            except DataError as e:
                raise ConfigError(f"{where}: {e}") from None
        dup = sorted({c for c in self.corruptions if self.corruptions.count(c) > 1})
        if dup:
            raise ConfigError(f"{where}: corruptions {dup} are listed twice; list each once.")

    def segments(self, make: Callable[[Optional[str], int, int], Any]) -> dict[str, Any]:
        """``{corruption: make(corruption, severity, corruption_seed)}`` (``{'clean': make(None, ...)}``
        without corruptions)."""
        if not self.corruptions:
            return {"clean": make(None, self.severity, self.corruption_seed)}
        return {c: make(c, self.severity, self.corruption_seed) for c in self.corruptions}

    def build(self, make: Callable[[Optional[str], int, int], Any], seed: int) -> Stream:
        return Stream(self.segments(make), protocol=self.protocol, shuffle=self.shuffle, seed=seed)


@dataclass
class TTAConfig:
    method: str
    data: DataRef
    stream: StreamSpec = field(default_factory=StreamSpec)
    model: ModelRef = field(default_factory=ModelRef)
    source_model: Optional[str] = None
    source_data: Optional[DataRef] = None
    options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    chunk_batches: int = 50
    out: Optional[str] = None
    task: Literal["tta"] = "tta"
    description: str = ""

    def validate(self, where: str = "tta config") -> None:
        if self.stream.corruptions and not self.data.domain:
            raise ConfigError(f"{where}: stream.corruptions corrupt a named domain (data.domain); for image lists or "
                              f"folders list no corruptions and give the data already corrupted.")
        if self.chunk_batches < 1:
            raise ConfigError(f"{where}: chunk_batches must be >= 1, got {self.chunk_batches}.")

    def build_stream(self, data_root: str | None = None) -> Stream:
        def make(corruption, severity, seed):
            ref = self.data if corruption is None else dataclasses.replace(
                self.data, corruption=corruption, severity=severity, corruption_seed=seed)
            return ref.build(data_root)

        return self.stream.build(make, self.train.seed)
