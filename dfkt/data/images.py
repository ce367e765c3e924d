"""Image files on disk: SHOT-style image lists and class-per-folder trees (Office, DomainNet, VisDA)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from dfkt.errors import DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def default_transforms(train: bool, size: int = 256, crop: int = 224,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       channels: int = 3) -> T.Compose:
    """SHOT's object-recognition transforms: resize to ``size`` x ``size``, random (train) or centre
    (test) crop of ``crop``, horizontal flip when training, ToTensor, Normalize (``channels=1``:
    grey images normalised with (0.5, 0.5))."""
    if channels == 1:
        mean, std = (0.5,), (0.5,)
    ops: list = [T.Resize((size, size))]
    ops += [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class _FileDataset(Dataset):
    """Shared loading: ``samples`` is a list of (path, label); items are ``(x, y, idx)``; ``y`` is -1
    for unlabeled images. ``channels``: 3 (RGB) or 1 (greyscale, for 1-channel models)."""

    samples: list[tuple[Path, int]]
    num_classes: int

    def __init__(self, transform: Callable | None, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
        self.channels = channels
        self.transform = transform if transform is not None else T.ToTensor()

    @property
    def has_labels(self) -> bool:
        return any(y >= 0 for _, y in self.samples)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        path, y = self.samples[idx]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB" if self.channels == 3 else "L")
        except OSError as e:
            raise DataError(f"cannot read image {str(path)!r} ({e}); replace or remove the file") from e
        return self.transform(img), y, idx


class ImageList(_FileDataset):
    """Lines ``path label``, or lines ``path`` alone (an unlabeled list); relative paths are resolved
    against ``root`` (default: the list's folder).

    Without a ``transform`` images become ``[0,1]`` tensors (``ToTensor``).
    """

    def __init__(self, list_file: str | os.PathLike, root: str | os.PathLike | None = None,
                 transform: Callable | None = None, num_classes: int | None = None, channels: int = 3) -> None:
        super().__init__(transform, channels)
        list_file = Path(list_file).expanduser()
        if not list_file.is_file():
            raise DataError(f"image list {str(list_file)!r} not found; pass the path of a text file with "
                            f"one 'relative/path.jpg label' per line (SHOT's data/<dataset>/<domain>_list.txt)")
        self.list_file = list_file
        self.root = Path(root).expanduser() if root is not None else list_file.parent
        rows: list[tuple[int, str, str, int | None]] = []
        for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            rows.append((lineno, raw, parts[0] if label is not None else line, label))
        labelled = [r for r in rows if r[3] is not None]
        if labelled and len(labelled) != len(rows):
            n, raw = next((r[0], r[1]) for r in rows if r[3] is None)
            raise DataError(f"{list_file}:{n}: {raw!r} has no integer label but other lines do; give every line "
                            f"'path integer_label' (e.g. 'amazon/images/bike/frame_0001.jpg 1'), or none of them "
                            f"(a list of paths alone is an unlabeled data set)")
        entries: list[tuple[int, Path, int]] = []
        for lineno, _raw, text, label in rows:
            path = Path(text).expanduser()
            entries.append((lineno, path if path.is_absolute() else self.root / path, -1 if label is None else label))
        if not entries:
            raise DataError(f"image list {str(list_file)!r} is empty; add 'path label' lines or point to the "
                            f"right list file")
        unlabeled = not labelled
        bad = [(n, y) for n, _, y in entries if not unlabeled and (y < 0 or (num_classes is not None and y >= num_classes))]
        if bad:
            n, y = bad[0]
            raise DataError(f"{list_file}:{n}: label {y} is outside [0, {num_classes if num_classes else 'inf'}) "
                            f"({len(bad)} bad line(s)); fix the list or pass the right num_classes")
        missing = [(n, p) for n, p, _ in entries if not p.is_file()]
        for n, p in missing[:1] if unlabeled else []:
            head, _, tail = str(p).rpartition(" ")
            if head and Path(head.rstrip()).is_file():
                raise DataError(f"{list_file}:{n}: cannot parse {p.name!r}: {tail!r} is not an integer label; each "
                                f"line must be 'path integer_label' (e.g. 'amazon/images/bike/frame_0001.jpg 1'), or "
                                f"the path alone in an unlabeled list")
        if missing:
            shown = "; ".join(f"line {n}: {str(p)!r}" for n, p in missing[:3])
            raise DataError(f"{len(missing)} of {len(entries)} images listed in {str(list_file)!r} are missing "
                            f"(first: {shown}); paths are resolved against root={str(self.root)!r}: pass the "
                            f"folder the list's paths are relative to as root, or copy the images there")
        self.samples = [(p, y) for _, p, y in entries]
        if unlabeled:
            self.num_classes = int(num_classes) if num_classes is not None else 0
        else:
            self.num_classes = int(num_classes) if num_classes is not None else max(y for _, y in self.samples) + 1
        log.debug("image list %s: %d images, %s", list_file, len(self.samples),
                  "unlabeled" if unlabeled else f"{self.num_classes} classes")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not p.name.startswith("."))


class ImageFolder(_FileDataset):
    """``root/<class>/**/<image>`` (classes sorted by folder name), or a flat folder ``root/<image>``:
    an unlabeled data set (``classes`` is then empty and every label -1)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, channels: int = 3) -> None:
        super().__init__(transform, channels)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {str(self.root)!r} does not exist; pass the domain folder that "
                            f"holds one sub-folder per class (e.g. office31/amazon/images), or a folder of images "
                            f"(an unlabeled target)")
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = _images_in(self.root, recursive=False)
        per_class = {c: _images_in(self.root / c, recursive=True) for c in folders}
        if loose and any(per_class.values()):
            raise DataError(f"image folder {str(self.root)!r} holds images both at its top ({loose[0].name}, ...) "
                            f"and in sub-folders; use one sub-folder per class (labelled) or only images at the top "
                            f"(unlabeled)")
        if loose:                              # a flat folder: unlabeled
            self.classes: list[str] = []
            self.class_to_idx: dict[str, int] = {}
            self.samples = [(p, -1) for p in loose]
            self.num_classes = 0
            log.debug("image folder %s: %d unlabeled images", self.root, len(self.samples))
            return
        empty = [c for c, files in per_class.items() if not files]
        if empty and len(empty) < len(folders):
            raise DataError(f"class folder {str(self.root / empty[0])!r} holds no images ({len(empty)} empty class "
                            f"folder(s)); every sub-folder is a class and shifts the label of those after it: remove "
                            f"it or add its images")
        self.classes = folders
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, i) for c, i in self.class_to_idx.items() for p in per_class[c]]
        if not self.samples:
            raise DataError(f"image folder {str(self.root)!r} holds no images (found {len(self.classes)} class "
                            f"folder(s)); expected root/<class>/<image> (or root/<image> for an unlabeled set) "
                            f"with extensions {IMAGE_EXTENSIONS}")
        self.num_classes = len(self.classes)
        log.debug("image folder %s: %d images, %d classes", self.root, len(self.samples), self.num_classes)
