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
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """SHOT's object-recognition transforms: resize to ``size`` x ``size``, random (train) or centre
    (test) crop of ``crop``, horizontal flip when training, ToTensor, Normalize."""
    ops: list = [T.Resize((size, size))]
    ops += [T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class _FileDataset(Dataset):
    """Shared loading: ``samples`` is a list of (path, label); items are ``(x, y, idx)``."""

    samples: list[tuple[Path, int]]
    num_classes: int

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform if transform is not None else T.ToTensor()

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        path, y = self.samples[idx]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {str(path)!r} ({e}); replace or remove the file") from e
        return self.transform(img), y, idx


class ImageList(_FileDataset):
    """Lines ``path label``; relative paths are resolved against ``root`` (default: the list's folder).

    Without a ``transform`` images become ``[0,1]`` tensors (``ToTensor``).
    """

    def __init__(self, list_file: str | os.PathLike, root: str | os.PathLike | None = None,
                 transform: Callable | None = None, num_classes: int | None = None) -> None:
        super().__init__(transform)
        list_file = Path(list_file).expanduser()
        if not list_file.is_file():
            raise DataError(f"image list {str(list_file)!r} not found; pass the path of a text file with "
                            f"one 'relative/path.jpg label' per line (SHOT's data/<dataset>/<domain>_list.txt)")
        self.list_file = list_file
        self.root = Path(root).expanduser() if root is not None else list_file.parent
        entries: list[tuple[int, Path, int]] = []
        for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None:
                raise DataError(f"{list_file}:{lineno}: cannot parse {raw!r}; each line must be "
                                f"'path integer_label' (e.g. 'amazon/images/bike/frame_0001.jpg 1')")
            path = Path(parts[0]).expanduser()
            entries.append((lineno, path if path.is_absolute() else self.root / path, label))
        if not entries:
            raise DataError(f"image list {str(list_file)!r} is empty; add 'path label' lines or point to the "
                            f"right list file")
        bad = [(n, y) for n, _, y in entries if y < 0 or (num_classes is not None and y >= num_classes)]
        if bad:
            n, y = bad[0]
            raise DataError(f"{list_file}:{n}: label {y} is outside [0, {num_classes if num_classes else 'inf'}) "
                            f"({len(bad)} bad line(s)); fix the list or pass the right num_classes")
        missing = [(n, p) for n, p, _ in entries if not p.is_file()]
        if missing:
            shown = "; ".join(f"line {n}: {str(p)!r}" for n, p in missing[:3])
            raise DataError(f"{len(missing)} of {len(entries)} images listed in {str(list_file)!r} are missing "
                            f"(first: {shown}); paths are resolved against root={str(self.root)!r}: pass the "
                            f"folder the list's paths are relative to as root, or copy the images there")
        self.samples = [(p, y) for _, p, y in entries]
        self.num_classes = int(num_classes) if num_classes is not None else max(y for _, y in self.samples) + 1
        log.debug("image list %s: %d images, %d classes", list_file, len(self.samples), self.num_classes)


class ImageFolder(_FileDataset):
    """``root/<class>/**/<image>``; classes sorted by folder name."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {str(self.root)!r} does not exist; pass the domain folder that "
                            f"holds one sub-folder per class (e.g. office31/amazon/images)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, i) for c, i in self.class_to_idx.items()
                        for p in sorted((self.root / c).rglob("*"))
                        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not self.samples:
            raise DataError(f"image folder {str(self.root)!r} holds no images (found {len(self.classes)} class "
                            f"folder(s)); expected root/<class>/<image> with extensions {IMAGE_EXTENSIONS}")
        self.num_classes = len(self.classes)
        log.debug("image folder %s: %d images, %d classes", self.root, len(self.samples), self.num_classes)
