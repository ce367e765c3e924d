"""torchvision's standard data sets (MNIST, Fashion-MNIST, USPS, SVHN, CIFAR) yielding ``(x, y, idx)``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from torchvision import datasets as tvd
from torchvision import transforms as T

from dfkt.data.indexed import IndexedDataset
from dfkt.errors import DataError, suggest

log = logging.getLogger(__name__)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# name -> (torchvision class, number of classes, native channels)
_SETS: dict[str, tuple[type, int, int]] = {
    "mnist": (tvd.MNIST, 10, 1),
    "fashion-mnist": (tvd.FashionMNIST, 10, 1),
    "usps": (tvd.USPS, 10, 1),
    "svhn": (tvd.SVHN, 10, 3),
    "cifar10": (tvd.CIFAR10, 10, 3),
    "cifar100": (tvd.CIFAR100, 100, 3),
}
_LAYOUT = {"mnist": "MNIST/raw/train-images-idx3-ubyte (and the other 3 IDX files)",
           "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte (and the other 3 IDX files)",
           "usps": "usps.bz2 and usps.t.bz2", "svhn": "train_32x32.mat / test_32x32.mat",
           "cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/"}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}


def list_torchvision_datasets() -> list[str]:
    return sorted(_SETS)


def default_transform(name: str, train: bool = True, size: int | None = None,
                      channels: int | None = None) -> T.Compose:
    """Digits: [Resize] [Grayscale] ToTensor Normalize(0.5, 0.5). CIFAR: ToTensor Normalize(mean/std)
    (plus RandomCrop(32, 4) and a flip when training)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key.startswith("cifar"):
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if key == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])
    native = _SETS[key][2] if key in _SETS else 1
    channels = channels or native
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}; use 1 (grayscale) or 3 (RGB)")
    ops: list = [T.Resize((size, size))] if size else []
    if channels != native:
        ops.append(T.Grayscale(num_output_channels=channels))
    return T.Compose(ops + [T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])


def torchvision_dataset(name: str, root: str | os.PathLike, train: bool = True, download: bool = False,
                        transform: Callable | None = None, size: int | None = None,
                        channels: int | None = None) -> IndexedDataset:
    """A torchvision data set wrapped to yield ``(x, y, idx)``; has ``num_classes``.

    Missing files with ``download=False`` raise :class:`DataError` naming the folder looked in.
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _SETS:
        raise DataError(f"unknown torchvision data set {name!r}.{suggest(key, list(_SETS) + list(_ALIASES))} "
                        f"Use one of: {', '.join(sorted(_SETS))}")
    cls, num_classes, _ = _SETS[key]
    root = Path(root).expanduser()
    if transform is None:
        transform = default_transform(key, train, size, channels)
    split = {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
    try:
        ds = cls(str(root), transform=transform, download=download, **split)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found"; URLError when offline
        if download:
            raise DataError(f"could not download {key} into {str(root)!r} ({e}); run on a machine with "
                            f"internet access or copy the {key} files into that folder") from e
        raise DataError(f"{key} ({'train' if train else 'test'}) not found under {str(root)!r} ({e}); pass "
                        f"download=True on a machine with internet access, or copy the {key} files there "
                        f"(expected: {root / _LAYOUT[key]})") from e
    wrapped = IndexedDataset(ds)
    wrapped.num_classes = num_classes
    log.debug("%s (%s): %d samples from %s", key, "train" if train else "test", len(ds), root)
    return wrapped
