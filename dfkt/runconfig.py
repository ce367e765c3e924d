"""Run configs for the CLI (``dfkt adapt|distill|train-source|train-teacher CONFIG``).

Schema (YAML):

    # dfkt adapt
    method: shot
    model: {name: shot-lenet, num_classes: 10}        # architecture (registry name) ...
    source_model: runs/source/model.pt               # ... and the trained source weights (dfkt model.pt)
    target: {domain: mnist10k, root: ../shared/data}  # or {image_list: a.txt, root: imgs/} / {image_folder: d/}
    options: {beta: 0.1}                              # the method's own options
    train: {epochs: 30, lr: 0.01, device: auto}       # dfkt.TrainConfig
    out: runs/shot

    # dfkt distill
    method: dafl
    teacher: {name: lenet5, num_classes: 10, checkpoint: runs/teacher/model.pt}
    student: {name: lenet5-half}
    input_shape: [1, 32, 32]
    eval: {domain: mnist10k, split: test, size: 32}   # optional, labelled, only to score
    options: {}
    train: {}
    out: runs/dafl

    # dfkt train-source / train-teacher
    model: {name: shot-lenet, num_classes: 10}
    data: {domain: digits, split: source_train}
    val: {domain: digits, split: source_val}
    options: {smoothing: 0.1, schedule: poly}
    train: {epochs: 30}
    out: runs/source
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from .config import from_dict
from .core.context import TrainConfig
from .errors import ConfigError


@dataclass
class ModelRef:
    name: Optional[str] = None
    num_classes: int = 10
    kwargs: dict = field(default_factory=dict)
    weights_path: Optional[str] = None      # torchvision backbone weights (resnet50/101)
    checkpoint: Optional[str] = None        # a dfkt model.pt to load

    def build(self):
        from .core.checkpoint import load_model
        from .models import build_model

        if self.name is None and self.checkpoint is None:
            raise ConfigError("model: give `name` (a registry model, see `dfkt list`) and/or `checkpoint`.")
        if self.name is None:
            return load_model(self.checkpoint)
        kw = dict(self.kwargs)
        if self.weights_path:
            kw["weights_path"] = self.weights_path
        model = build_model(self.name, num_classes=self.num_classes, **kw)
        if self.checkpoint:
            model = load_model(self.checkpoint, model=model)
        return model


@dataclass
class DataRef:
    """Exactly one of: domain (digits/mnist10k), image_list, image_folder, torchvision."""

    domain: Optional[str] = None
    image_list: Optional[str] = None
    image_folder: Optional[str] = None
    torchvision: Optional[str] = None
    root: Optional[str] = None
    split: str = "all"
    size: Optional[int] = None
    channels: int = 1
    corruption: Optional[str] = None
    severity: int = 3
    corruption_seed: int = 0
    num_classes: Optional[int] = None
    train: bool = False          # image lists/folders/torchvision: training transforms / train split
    download: bool = False
    resize: int = 256            # image lists/folders: Resize((resize, resize)) then crop
    crop: int = 224

    def validate(self, where: str = "data") -> None:
        given = [k for k in ("domain", "image_list", "image_folder", "torchvision") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"{where}: give exactly one of domain, image_list, image_folder, torchvision "
                              f"(got {', '.join(given) or 'none'}).")

    def build(self, data_root: str | None = None):
        from . import data as D

        root = self.root or data_root or os.environ.get("DFKT_DATA")
        if self.domain:
            return D.get_domain(self.domain, root=root, split=self.split, size=self.size or 28,
                                channels=self.channels, corruption=self.corruption, severity=self.severity,
                                seed=self.corruption_seed)
        if self.torchvision:
            if root is None:
                raise ConfigError("data.torchvision needs `root` (or --data-root / DFKT_DATA).")
            return D.torchvision_dataset(self.torchvision, root, train=self.train, download=self.download,
                                         size=self.size)
        def make(train: bool):
            tf = D.default_transforms(train, size=self.resize, crop=self.crop)
            if self.image_list:
                return D.ImageList(self.image_list, root=self.root, transform=tf, num_classes=self.num_classes)
            return D.ImageFolder(self.image_folder, transform=tf)

        ds = make(self.train)
        if self.train:  # training transforms; passes that score or pseudo-label use the test ones
            ds.eval_view = make(False)
        return ds


@dataclass
class AdaptConfig:
    method: str
    target: DataRef
    model: ModelRef = field(default_factory=ModelRef)
    source_model: Optional[str] = None
    options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Optional[DataRef] = None
    out: Optional[str] = None
    task: Literal["sfda"] = "sfda"
    description: str = ""


@dataclass
class DistillConfig:
    method: str
    teacher: ModelRef
    student: ModelRef
    input_shape: list[int]
    num_classes: Optional[int] = None
    eval: Optional[DataRef] = None
    options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: Optional[str] = None
    task: Literal["dfkd"] = "dfkd"
    description: str = ""


@dataclass
class SupervisedConfig:
    model: ModelRef
    data: DataRef
    val: Optional[DataRef] = None
    options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: Optional[str] = None
    description: str = ""


def parse(kind: str, data: dict):
    cls = {"adapt": AdaptConfig, "distill": DistillConfig, "supervised": SupervisedConfig}[kind]
    return from_dict(cls, data, f"{kind} config")
