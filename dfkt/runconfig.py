"""Run configs for the CLI (``dfkt adapt|distill|compress|train-source|train-teacher CONFIG``).

Schema (YAML):

    # dfkt adapt
    method: shot
    model: {name: shot-lenet, num_classes: 10}        # architecture (registry name, or {timm: resnet18}) ...
    source_model: runs/source/model.pt               # ... and the trained source weights (dfkt model.pt)
    target: {domain: mnist10k, root: ../shared/data}  # or {image_list: a.txt, root: imgs/} / {image_folder: d/}
    #                                                   / {npz: t.npz, images: x, labels: y, layout: NHWC}
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

    # dfkt compress
    method: adapt-kd-st                               # a compress recipe (dfkt list --task compress)
    model: {name: shot-lenet, num_classes: 10}        # the source model's architecture ...
    source_model: runs/source/model.pt               # ... and its trained weights
    student: {name: digit-cnn, kwargs: {width: 16}}   # an untrained (or pretrained) smaller classifier
    target: {domain: mnist10k, split: test, corruption: motion_blur, severity: 4}
    eval: null                                        # optional, labelled, only to score
    options: {adapt: nrc, student_epochs: 30}         # the recipe's options
    train: {seed: 0, device: auto}                    # settings of every stage (seed, device, progress, ...)
    out: runs/compress                                # model.pt (the student) and teacher.pt

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
from pathlib import Path
from typing import Literal, Optional

from .config import from_dict
from .core.context import TrainConfig
from .errors import ConfigError


@dataclass
class ModelRef:
    """A model: a registry ``name``, or ``timm: NAME`` / ``torchvision: NAME`` (any classifier of those
    libraries, random weights or ``weights_path``), and/or a dfkt ``checkpoint`` (model.pt) to load."""

    name: Optional[str] = None
    timm: Optional[str] = None              # e.g. resnet18, convnext_atto, vit_tiny_patch16_224 (dfkt[timm])
    torchvision: Optional[str] = None       # e.g. mobilenet_v3_small, vgg11_bn, densenet121
    num_classes: int = 10
    kwargs: dict = field(default_factory=dict)
    weights_path: Optional[str] = None      # local weights (torchvision backbones, timm/torchvision models)
    checkpoint: Optional[str] = None        # a dfkt model.pt to load
    head: Optional[str] = None              # module name of the layer that outputs the logits, when dfkt
    #                                         cannot tell (see dfkt.models.set_head)
    seed: Optional[int] = None              # seed of the initial weights (default: train.seed via the CLI)

    def validate(self, where: str = "model") -> None:
        given = [k for k in ("name", "timm", "torchvision") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"{where}: give one of name, timm, torchvision (got {', '.join(given)}).")

    @property
    def arch(self) -> Optional[str]:
        """The build_model name: a registry name, 'timm:NAME' or 'torchvision:NAME'."""
        if self.timm:
            return f"timm:{self.timm}"
        if self.torchvision:
            return f"torchvision:{self.torchvision}"
        return self.name

    def build(self):
        from .core.checkpoint import load_model
        from .models import build_model, set_head

        if self.arch is None and self.checkpoint is None:
            raise ConfigError("model: give `name` (a registry model, see `dfkt list`), `timm` or `torchvision` "
                              "(a classifier of those libraries) and/or `checkpoint`.")
        if self.arch is None:
            model = load_model(self.checkpoint)
        else:
            kw = dict(self.kwargs)
            if self.weights_path:
                kw["weights_path"] = self.weights_path
            model = build_model(self.arch, num_classes=self.num_classes, seed=self.seed, **kw)
            if self.checkpoint:
                model = load_model(self.checkpoint, model=model)
        if self.head:
            set_head(model, self.head)
        return model


@dataclass
class DataRef:
    """A data set: exactly one of

    * ``domain``: a named domain (digits, mnist10k; + ``corruption``/``severity``), ``size``, ``channels``;
    * ``image_folder``: root/<class>/<image> (labelled) or a flat folder of images (unlabeled);
    * ``image_list``: lines 'path label', or 'path' alone (unlabeled); paths relative to ``root``;
    * ``npz``: a .npz file; ``images``/``labels`` name its arrays (no labels array: unlabeled), ``layout``
      NHW | NHWC | NCHW (inferred when unambiguous), uint8 0..255 or float 0..1, ``size``, ``channels``;
    * ``torchvision``: mnist, fashion-mnist, usps, svhn, cifar10, cifar100 under ``root``.

    Relative file/folder paths are resolved against the data root (``--data-root`` / DFKT_DATA) when one
    is given, else the working folder; an image list's own paths against ``root`` (default: the
    list's folder). Folders/lists are resized to ``resize`` then cropped to ``crop`` (default
    256/224: set both for small models, e.g. 32/32) and read as ``channels`` (default 3; 1: greyscale).
    """

    domain: Optional[str] = None
    image_list: Optional[str] = None
    image_folder: Optional[str] = None
    npz: Optional[str] = None
    torchvision: Optional[str] = None
    root: Optional[str] = None
    split: str = "all"
    size: Optional[int] = None
    channels: Optional[int] = None          # domains/npz: 1 by default for domains; files: 3 (RGB)
    corruption: Optional[str] = None
    severity: int = 3
    corruption_seed: int = 0
    num_classes: Optional[int] = None
    images: str = "images"                  # npz: key of the image array
    labels: Optional[str] = "labels"        # npz: key of the labels (absent from the file: unlabeled)
    layout: Optional[str] = None            # npz: NHW | NHWC | NCHW
    train: bool = False          # image lists/folders/torchvision: training transforms / train split
    download: bool = False
    resize: int = 256            # image lists/folders: Resize((resize, resize)) then crop
    crop: int = 224

    KINDS = ("domain", "image_list", "image_folder", "npz", "torchvision")

    def validate(self, where: str = "data") -> None:
        given = [k for k in self.KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"{where}: give exactly one of {', '.join(self.KINDS)} "
                              f"(got {', '.join(given) or 'none'}).")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"{where}.channels must be 1 or 3, got {self.channels}.")
        if self.layout is not None and str(self.layout).upper() not in ("NHW", "NHWC", "NCHW"):
            raise ConfigError(f"{where}.layout must be NHW, NHWC or NCHW, got {self.layout!r}.")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k))

    def label(self) -> str:
        """A short name for reports: the domain (with its corruption) or the file/folder name."""
        if self.domain:
            name = "uci" if self.domain in ("digits", "uci") else self.domain
            return f"{name}-c:{self.corruption}@{self.severity}" if self.corruption else name
        return Path(str(getattr(self, self.kind))).name.rsplit(".", 1)[0] if self.kind != "torchvision" \
            else self.torchvision

    @staticmethod
    def resolve(path: str, data_root: Optional[str]) -> str:
        p = Path(path).expanduser()
        if p.is_absolute():
            return str(p)
        base = data_root or os.environ.get("DFKT_DATA")
        return str(Path(base).expanduser() / p) if base else str(p)

    def build(self, data_root: str | None = None, split: str | None = None):
        """The data set; ``split`` (default: the reference's own) selects rows: named domains split
        themselves, other kinds take the same fixed shuffled split of their rows (``dfkt.data.split_indices``)."""
        from . import data as D

        split = split or self.split
        if self.domain:
            root = self.root or data_root or os.environ.get("DFKT_DATA")
            return D.get_domain(self.domain, root=root, split=split, size=self.size or 28,
                                channels=self.channels, corruption=self.corruption, severity=self.severity,
                                seed=self.corruption_seed)
        ds = self._build_whole(data_root)
        if split == "all":
            return ds
        idx = D.split_indices(len(ds), split, shuffle=True)
        return ds.subset(idx) if isinstance(ds, D.ArrayDataset) else D.Subset(ds, idx)

    def _build_whole(self, data_root: str | None):
        from . import data as D

        root = self.root or data_root or os.environ.get("DFKT_DATA")
        if self.torchvision:
            if root is None:
                raise ConfigError("data.torchvision needs `root` (or --data-root / DFKT_DATA).")
            return D.torchvision_dataset(self.torchvision, root, train=self.train, download=self.download,
                                         size=self.size, channels=self.channels)
        if self.npz:
            return D.load_npz(self.resolve(self.npz, data_root), images=self.images, labels=self.labels,
                              layout=self.layout, size=self.size, channels=self.channels,
                              num_classes=self.num_classes)
        channels = self.channels or 3

        def make(train: bool):
            tf = D.default_transforms(train, size=self.resize, crop=self.crop, channels=channels)
            if self.image_list:
                lst = self.resolve(self.image_list, data_root)
                img_root = self.resolve(self.root, data_root) if self.root else None
                return D.ImageList(lst, root=img_root, transform=tf, num_classes=self.num_classes,
                                   channels=channels)
            return D.ImageFolder(self.resolve(self.image_folder, data_root), transform=tf, channels=channels)

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
class CompressConfig:
    target: DataRef
    student: ModelRef
    method: Optional[str] = None           # None: dfkt.compress's default recipe
    model: ModelRef = field(default_factory=ModelRef)
    source_model: Optional[str] = None
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)   # settings every stage shares (checked by dfkt.compress)
    eval: Optional[DataRef] = None
    out: Optional[str] = None
    task: Literal["compress"] = "compress"
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
    cls = {"adapt": AdaptConfig, "distill": DistillConfig, "compress": CompressConfig,
           "supervised": SupervisedConfig}[kind]
    return from_dict(cls, data, f"{kind} config")
